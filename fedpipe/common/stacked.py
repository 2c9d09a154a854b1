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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedpipe.common.client_job import (
    ClientJob,
    batch_schedules,
    groups_by_batch_size,
)
from fedpipe.common.data import Dataset
from fedpipe.common.models import Model
from fedpipe.common.vector import Vector

__all__ = ["StackedTrainer", "StackedUpdates", "per_client_training", "stacked_unfit"]

Arrays = dict[str, np.ndarray]


@dataclass
class StackedUpdates:
    """What K clients' local training did, row ``k`` for ``jobs[k]``."""

    updates: dict[str, Any]  # start minus end weights, a leading client axis (numpy, or
    # torch tensors on their device from the vectorized torch engine)
    n_samples: np.ndarray  # local dataset sizes (int64)
    n_steps: np.ndarray  # (int64)
    loss_sum: np.ndarray  # sum of per-sample training losses (float64)
    n_samples_seen: np.ndarray  # (int64)
    seconds: float  # training time per client (the batch's time over K)


def per_client_training(job: ClientJob) -> str | None:
    """Why ``job``'s training cannot be stacked whatever the engine (its own training
    function, DP-SGD, its own loaders); None when nothing stands in the way."""
    if job.trainer.train_fn is not None:
        return "the clients train with their own train_fn"
    if job.trainer.dp_sgd is not None:
        return "dp_sgd clips per-sample gradients client by client"
    if not isinstance(job.data, Dataset):
        return "the clients train on their own loaders"
    return None


def stacked_unfit(model: Model, job: ClientJob) -> str | None:
    """Why ``job`` cannot train stacked on ``model``; None when it can."""
    if type(model).compute_stacked_gradients is Model.compute_stacked_gradients:
        return f"model {model.name!r} computes no stacked gradients"
    reason = per_client_training(job)
    if reason is not None:
        return reason
    optimizer = job.trainer.optimizer
    if optimizer.modules:
        return f"client optimizer module {optimizer.modules[0].name!r} runs client by client"
    if optimizer.regularizers:
        name = optimizer.regularizers[0].name
        return f"client optimizer regularizer {name!r} runs client by client"
    if job.aux_vars:
        return f"the round carries aux vars ({', '.join(sorted(job.aux_vars))})"
    return None


class StackedTrainer:
    """Trains K clients at once on one shared numpy model (its weights are not changed),
    ``max_clients`` at a time (bounds memory: a few model copies and one batch per client).

    The clients' samples are copied once into one flat array (a client's rows after the
    previous client's, no padding) so that each step gathers every client's batch with one
    fancy index; a client whose data object changes is copied again.
    """

    def __init__(self, model: Model, max_clients: int = 1024) -> None:
        if max_clients < 1:
            raise ValueError(f"max_clients={max_clients}; expected at least 1")
        self.model, self.max_clients = model, max_clients
        self._rows: dict[str, tuple[Dataset, int]] = {}  # client -> (its data, first row)
        self._x: np.ndarray | None = None
        self._y: np.ndarray | None = None

    def train(
        self, jobs: Sequence[ClientJob], weights: Vector, round_number: int
    ) -> Iterator[StackedUpdates]:
        """Train every job (each fit: :func:`stacked_unfit`) from ``weights``, ``max_clients``
        at a time: one result per chunk, rows in ``jobs`` order. The optimizers' step counts
        advance as the client-by-client loop advances them."""
        initial = weights.to_numpy().coefs
        for begin in range(0, len(jobs), self.max_clients):
            yield self._chunk(jobs[begin : begin + self.max_clients], initial, round_number)

    def _chunk(
        self, jobs: Sequence[ClientJob], initial: Arrays, round_number: int
    ) -> StackedUpdates:
        start = time.perf_counter()
        schedules = batch_schedules(jobs, round_number)
        offsets = self._offsets(jobs)
        params = {n: np.repeat(a[None], len(jobs), axis=0) for n, a in initial.items()}
        loss_sum = np.zeros(len(jobs))
        for t in range(max((len(s) for s in schedules), default=0)):
            for members in groups_by_batch_size(schedules, t):
                rows = np.stack([schedules[k][t] for k in members])
                rows += offsets[members][:, None]
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
        rows: np.ndarray,
        params: Arrays,
        loss_sum: np.ndarray,
    ) -> None:
        """One local step of the clients at positions ``members``, ``rows[i]`` the rows of the
        flat data in ``members[i]``'s batch (all of one size): SGD as
        :meth:`~fedpipe.common.optim.Optimizer.compute_updates` does it, per client."""
        assert self._x is not None and self._y is not None
        everyone = len(members) == len(jobs)
        x, y = self._x[rows], self._y[rows]
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

    def _offsets(self, jobs: Sequence[ClientJob]) -> np.ndarray:
        """Each job's first row in the flat data, its samples copied there on first sight."""
        new = [job for job in jobs if self._rows.get(job.name, (None,))[0] is not job.data]
        if new:
            at = 0 if self._x is None else len(self._x)
            for job in new:
                self._rows[job.name] = (job.data, at)
                at += len(job.data)
            xs = (
                [job.data.x for job in new]
                if self._x is None
                else [self._x] + [j.data.x for j in new]
            )
            ys = (
                [job.data.y for job in new]
                if self._y is None
                else [self._y] + [j.data.y for j in new]
            )
            self._x, self._y = np.concatenate(xs), np.concatenate(ys)
        return np.array([self._rows[job.name][1] for job in jobs], dtype=np.int64)
