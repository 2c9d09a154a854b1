"""Stacked local training: the K simulated clients of a round trained at once, in numpy.

The numpy counterpart of :mod:`fedpipe.common.vectorized` (torch.func). Every client starts
from the global weights; the engine stacks them K times on a leading client axis, and each
local step computes the gradients of all clients in one call of the model's
:meth:`~fedpipe.common.models.Model.compute_stacked_gradients` (batched matmuls). Clients of
different sizes take different numbers of steps and their last batches differ in size: at
each step the clients that still have a batch are **grouped by batch size** (no padding),
each group one call on the gathered rows of the stacked weights.

Same batches as :meth:`~fedpipe.common.training.LocalTrainer.train` (``round_seed`` and
``Dataset.batches``), same steps and, for the built-in models, **the same bits**: the stacked
gradients are bit-equal to the client-by-client ones, and so are the learning-rate steps and
the updates (tested for ``softmax-regression`` and ``mlp``).

The optimizer runs stacked when it is plain SGD: a learning rate (a number or a scheduler,
each client at its own step count) and decoupled weight decay, no regularizer and no module.
Anything else (a module's state, per-client norms, aux vars, DP-SGD, a ``train_fn``, a model
with no stacked gradients) makes :func:`stacked_unfit` give the reason, and the caller trains
the clients one after another instead, saying why once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedpipe.common.client_job import ClientJob, batch_schedule, groups_by_batch_size
from fedpipe.common.data import Dataset
from fedpipe.common.models import Model
from fedpipe.common.vector import Vector

__all__ = ["StackedTrainer", "StackedUpdates", "stacked_unfit"]

Arrays = dict[str, np.ndarray]


@dataclass
class StackedUpdates:
    """What K clients' local training did, row ``k`` for ``jobs[k]``."""

    updates: Arrays  # start minus end weights, a leading client axis
    n_samples: np.ndarray  # local dataset sizes (int64)
    n_steps: np.ndarray  # (int64)
    loss_sum: np.ndarray  # sum of per-sample training losses (float64)
    n_samples_seen: np.ndarray  # (int64)
    seconds: float  # training time per client (the batch's time over K)


def stacked_unfit(model: Model, job: ClientJob) -> str | None:
    """Why ``job`` cannot train stacked on ``model``; None when it can."""
    if type(model).compute_stacked_gradients is Model.compute_stacked_gradients:
        return f"model {model.name!r} computes no stacked gradients"
    trainer, optimizer = job.trainer, job.trainer.optimizer
    if trainer.train_fn is not None:
        return "the clients train with their own train_fn"
    if trainer.dp_sgd is not None:
        return "dp_sgd clips per-sample gradients client by client"
    if not isinstance(job.data, Dataset):
        return "the clients train on their own loaders"
    if optimizer.modules:
        return f"client optimizer module {optimizer.modules[0].name!r} runs client by client"
    if optimizer.regularizers:
        name = optimizer.regularizers[0].name
        return f"client optimizer regularizer {name!r} runs client by client"
    if job.aux_vars:
        return f"the round carries aux vars ({', '.join(sorted(job.aux_vars))})"
    return None


class StackedTrainer:
    """Trains K clients at once on one shared numpy model (its weights are not changed)."""

    def __init__(self, model: Model) -> None:
        self.model = model

    def train(
        self, jobs: Sequence[ClientJob], weights: Vector, round_number: int
    ) -> StackedUpdates:
        """Train every job (each fit: :func:`stacked_unfit`) from ``weights``; their optimizers'
        step counts advance as the client-by-client loop would advance them."""
        start = time.perf_counter()
        schedules = [batch_schedule(job, round_number) for job in jobs]
        initial = weights.to_numpy().coefs
        params = {n: np.repeat(a[None], len(jobs), axis=0) for n, a in initial.items()}
        loss_sum = np.zeros(len(jobs))
        for t in range(max((len(s) for s in schedules), default=0)):
            for members in groups_by_batch_size(schedules, t):
                rows = [schedules[k][t] for k in members]
                self._step(jobs, members, rows, params, loss_sum)
        updates = {n: np.subtract(initial[n][None], p, out=p) for n, p in params.items()}
        return StackedUpdates(
            updates=updates,
            n_samples=np.array([len(job.data) for job in jobs], dtype=np.int64),
            n_steps=np.array([len(s) for s in schedules], dtype=np.int64),
            loss_sum=loss_sum,
            n_samples_seen=np.array([sum(len(r) for r in s) for s in schedules], dtype=np.int64),
            seconds=(time.perf_counter() - start) / max(len(jobs), 1),
        )

    def _step(
        self,
        jobs: Sequence[ClientJob],
        members: list[int],
        rows: list[np.ndarray],
        params: Arrays,
        loss_sum: np.ndarray,
    ) -> None:
        """One local step of the clients at positions ``members``, ``rows[i]`` the sample
        indices of ``members[i]``'s batch (all of one size): SGD as
        :meth:`~fedpipe.common.optim.Optimizer.compute_updates` does it, per client."""
        everyone = len(members) == len(jobs)
        x = np.stack([jobs[k].data.x[r] for k, r in zip(members, rows, strict=True)])
        y = np.stack([jobs[k].data.y[r] for k, r in zip(members, rows, strict=True)])
        mine = params if everyone else {n: p[members] for n, p in params.items()}
        grads, losses = self.model.compute_stacked_gradients(mine, x, y)
        optimizers = [jobs[k].trainer.optimizer for k in members]
        rates = [-optimizer.learning_rate() for optimizer in optimizers]
        for optimizer in optimizers:
            optimizer.step += 1
        decay = optimizers[0].w_decay  # one client optimizer config for the whole run
        for name, g in grads.items():
            if decay != 0.0:
                g = g + decay * mine[name]
            if len(set(rates)) == 1:
                g *= rates[0]
            else:
                g *= np.array(rates, dtype=g.dtype).reshape(-1, *([1] * (g.ndim - 1)))
            if everyone:
                params[name] += g
            else:
                params[name][members] = mine[name] + g
        loss_sum[members] += losses * x.shape[1]
