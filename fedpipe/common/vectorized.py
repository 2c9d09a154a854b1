"""Vectorized local training: the K simulated clients of a round trained at once.

Every client starts from the global weights; the engine stacks them K times (a leading client
axis), stacks each step's batches ``[K, B, ...]`` and computes all K gradients in one call of
``torch.func.vmap(torch.func.grad(loss))``, the loss being the user's ``nn.Module`` run with
``torch.func.functional_call``. Each client's own optimizer then turns its gradients into
updates (:mod:`fedpipe.common.vectorized_pipeline`). The weights never leave the module's
device during the round (CPU or CUDA: the device of the module's parameters).

Same maths as :meth:`~fedpipe.common.training.LocalTrainer.train`, client by client: the same
batches (``round_seed`` and ``Dataset.batches``), the same steps, the same updates, to float
tolerance. Clients of different sizes take different numbers of steps and their last batches
differ in size: at each step the clients that still have a batch are **grouped by batch
size**, and each group is one vmapped call on the gathered rows of the stacked weights (a
client whose batches ran out is simply not in any group, so its weights and module state stay
as they are). Grouping, not padding, keeps the user's loss exact whatever its reduction.

A model that cannot run inside ``vmap`` (in-place buffer updates such as batch norm's running
statistics, dropout, data-dependent Python control flow) is detected at the first round: the
engine logs one line saying why and trains clients one after another with their
:class:`~fedpipe.common.training.LocalTrainer`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.func import functional_call, grad_and_value, vmap

from fedpipe.common.buffers import BUFFERS_AUX
from fedpipe.common.client_job import (
    ClientJob,
    batch_schedule,
    batch_schedules,
    groups_by_batch_size,
)
from fedpipe.common.data import Dataset
from fedpipe.common.models.torch_adapter import TorchModel
from fedpipe.common.models.torch_batches import DeviceBatches
from fedpipe.common.stacked import StackedUpdates
from fedpipe.common.training import TrainResult
from fedpipe.common.vector import Vector
from fedpipe.common.vectorized_pipeline import ClientOptimizers

__all__ = ["ClientJob", "VectorizedTrainer", "batch_schedule"]

logger = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]


class VectorizedTrainer:
    """Trains the clients of a round ``max_clients`` at a time on one shared TorchModel.

    Parameters
    ----------
    model:
        The :class:`TorchModel` every client's trainer shares; its module's parameters give
        the device. Its weights are not changed.
    max_clients:
        Clients stacked at once (bounds device memory: ~3 model copies per client).
    data_budget:
        Bytes of client data kept on a non-CPU device from round to round (least recently
        used out first; a chunk's own data always fits). Default: a quarter of the device's
        memory on CUDA, unbounded elsewhere (on the CPU the tensors share the datasets'
        memory).
    """

    def __init__(
        self, model: TorchModel, max_clients: int = 1024, data_budget: int | None = None
    ) -> None:
        if max_clients < 1:
            raise ValueError(f"max_clients={max_clients}; expected at least 1")
        self.model, self.max_clients = model, max_clients
        self.device = next(model.module.parameters()).device
        self.dtype = next(model.module.parameters()).dtype
        self.fallback: str | None = None  # why clients train one after another, once known
        self._checked = False
        self._logged: set[str] = set()
        self._grad = vmap(grad_and_value(self._loss), in_dims=(0, None, 0, 0))
        budget = _default_budget(self.device) if data_budget is None else data_budget
        #: Clients' data on the device (kept on a CPU too: made in the model's dtype once).
        self.data = DeviceBatches(budget, keep_on_cpu=True)
        target = torch.int64 if model.task == "multiclass" else self.dtype
        self._place = (self.device, self.dtype, target)

    def _loss(
        self, params: Tensors, buffers: Tensors, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        out = functional_call(self.model.module, (params, buffers), (x,))
        if self.model.task == "binary":
            out = out.reshape(-1)
        return self.model.loss_fn(out, y)

    def train(
        self, jobs: Sequence[ClientJob], weights: Vector, round_number: int
    ) -> Iterator[TrainResult]:
        """Train every job from ``weights``; yield each client's result, in ``jobs`` order,
        ``max_clients`` at a time (the caller folds them as they come)."""
        placed = weights.like(self.model.get_weights(copy=False))  # on the device, once
        for start in range(0, len(jobs), self.max_clients):
            chunk = jobs[start : start + self.max_clients]
            if self.unfit(chunk, round_number) is not None:
                yield from self._sequential(chunk, weights, round_number)
            else:
                yield from self._results(chunk, *self._trained(chunk, placed, round_number))

    def train_stacked(
        self, jobs: Sequence[ClientJob], weights: Vector, round_number: int
    ) -> Iterator[StackedUpdates]:
        """Train every job (each fit: :meth:`unfit` is None) from ``weights``,
        ``max_clients`` at a time: one result per chunk, row ``k`` for the chunk's ``k``-th
        job, its updates (start minus end weights, a leading client axis) left on the
        device for the caller to add up there."""
        # on the device, once (the cohort's are the round's numpy weights: bfloat16 ones are
        # ml_dtypes arrays, which torch.as_tensor refuses)
        weights = weights.like(self.model.get_weights(copy=False))
        chunks = [jobs[at : at + self.max_clients] for at in range(0, len(jobs), self.max_clients)]
        ahead: _Plan | None = None
        for k, chunk in enumerate(chunks):
            plan = ahead if ahead is not None else _plan(batch_schedules(chunk, round_number))
            _, deltas, loss_sum, began = self._trained(chunk, weights, round_number, plan)
            schedules = plan.schedules
            n_steps = np.array([len(s) for s in schedules], dtype=np.int64)
            seen = np.array([sum(len(r) for r in s) for s in schedules], dtype=np.int64)
            # while the device trains this chunk (nothing above waited for it), the host plans
            # the next one; a failure there is raised again by that chunk, not by this one
            ahead = None
            if k + 1 < len(chunks):
                with contextlib.suppress(Exception):
                    ahead = _plan(batch_schedules(chunks[k + 1], round_number))
            yield StackedUpdates(
                updates=deltas,
                n_samples=np.array([len(job.data) for job in chunk], dtype=np.int64),
                n_steps=n_steps,
                loss_sum=loss_sum.cpu().numpy(),  # the host waits for this chunk here
                n_samples_seen=seen,
                seconds=(time.perf_counter() - began) / len(chunk),
            )

    def unfit(self, jobs: Sequence[ClientJob], round_number: int) -> str | None:
        """Why ``jobs`` cannot train vectorized (they train one after another); None when
        they can. The first call checks that the model runs inside vmap."""
        if not self._checked:
            self._check(jobs, round_number)
        return self.fallback

    # ---- fallback ----------------------------------------------------------------------------

    def _check(self, jobs: Sequence[ClientJob], round_number: int) -> None:
        """One vmapped gradient on the first batch of up to two clients: does the model run
        inside vmap? Touches no client state."""
        self._checked = True
        job = jobs[0]
        if BUFFERS_AUX in job.aux_vars:
            self.fallback = "its buffers travel (model.buffers='average'): updated per client"
            logger.warning(
                "vectorized training off, clients train one after another: %s", self.fallback
            )
            return
        rows = batch_schedule(job, round_number)[:1]
        if not rows:
            return
        x, y = self._device_data(job.data)
        picked = [rows[0]] * min(2, len(jobs))
        xb = torch.stack([x[torch.as_tensor(r, device=self.device)] for r in picked])
        yb = torch.stack([y[torch.as_tensor(r, device=self.device)] for r in picked])
        params = {n: p.detach().unsqueeze(0).expand(len(picked), *p.shape)
                  for n, p in self.model.module.named_parameters()}  # fmt: skip
        self.model.module.train()
        try:
            buffers = {n: b.clone() for n, b in self._buffers().items()}  # not the model's
            self._grad(params, buffers, xb, yb)
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[0]
            name = type(self.model.module).__name__
            self.fallback = f"model {name} cannot run inside torch.func.vmap ({reason})"
            logger.warning(
                "vectorized training off, clients train one after another: %s", self.fallback
            )

    def _sequential(
        self, jobs: Sequence[ClientJob], weights: Vector, round_number: int
    ) -> Iterator[TrainResult]:
        for job in jobs:
            yield job.trainer.train(
                job.data, weights, job.aux_vars, client=job.name, round_number=round_number
            )

    # ---- vectorized --------------------------------------------------------------------------

    def _trained(
        self,
        jobs: Sequence[ClientJob],
        weights: Vector,
        round_number: int,
        plan: _Plan | None = None,
    ) -> _Trained:
        """Every job trained from ``weights`` (on the model's device), following ``plan``
        (the jobs' round worked out on the host) when given: the schedules, each client's
        update (a row of start minus end weights, on the device), its loss sum, and when
        training began. Nothing here waits for the device (a CUDA one) once its work is
        queued."""
        start = time.perf_counter()
        for job in jobs:
            if job.aux_vars:
                job.trainer.optimizer.process_aux_var(dict(job.aux_vars))
            job.trainer.optimizer.start_round(weights)
        if plan is None:
            plan = _plan(batch_schedules(jobs, round_number))
        x_all, y_all = self._stacked_data(jobs)
        start_w = dict(weights.coefs)  # read only: the updates are start minus end
        params = {n: w.unsqueeze(0).repeat(len(jobs), *([1] * w.dim())) for n, w in start_w.items()}
        optimizers = ClientOptimizers([job.trainer.optimizer for job in jobs], params)
        if optimizers.reason is not None and optimizers.reason not in self._logged:
            self._logged.add(optimizers.reason)
            logger.info(
                "vectorized training: optimizer runs client by client: %s", optimizers.reason
            )
        loss_sum = torch.zeros(len(jobs), dtype=torch.float64, device=self.device)
        buffers = self._buffers()
        self.model.module.train()
        try:
            for t, members, sel, index in _on_device(plan, self.device):
                step = (t, members, sel, index)
                self._step(step, params, buffers, optimizers, (x_all, y_all), loss_sum)
        except BaseException:
            optimizers.restore()  # the caller trains these clients again, one by one
            raise
        optimizers.finish()
        deltas = {n: p.neg_().add_(start_w[n]) for n, p in params.items()}
        return plan.schedules, deltas, loss_sum, start

    def _step(
        self,
        step: _Step,
        params: Tensors,
        buffers: Tensors,
        optimizers: ClientOptimizers,
        data: tuple[torch.Tensor, torch.Tensor],
        loss_sum: torch.Tensor,
    ) -> None:
        """Local step ``t`` of the clients at positions ``members`` (``sel`` on the device),
        all with a batch of ``index.shape[1]`` samples, ``index[i]`` indexing client
        ``members[i]``'s data."""
        _t, members, sel, index = step
        everyone = len(members) == len(loss_sum)
        xb, yb = data[0][sel[:, None], index], data[1][sel[:, None], index]
        mine = params if everyone else {n: p.index_select(0, sel) for n, p in params.items()}
        grads, loss = self._grad(mine, buffers, xb, yb)
        updates = optimizers.updates(members, sel, grads, mine)
        for name, p in params.items():
            if everyone:
                p.add_(updates[name])
            else:
                p.index_add_(0, sel, updates[name])
        loss_sum.index_add_(0, sel, loss.detach().to(torch.float64) * index.shape[1])

    def _results(
        self,
        jobs: Sequence[ClientJob],
        schedules: list[list[np.ndarray]],
        deltas: Tensors,
        loss_sum: torch.Tensor,
        start: float,
    ) -> Iterator[TrainResult]:
        """Each client's result: its update a row of ``deltas``, left on the device."""
        losses = loss_sum.cpu().numpy()
        seconds = (time.perf_counter() - start) / len(jobs)
        for k, job in enumerate(jobs):
            updates = Vector({n: a[k] for n, a in deltas.items()})
            steps = len(schedules[k])
            yield TrainResult(
                partial=job.trainer.aggregator.prepare(
                    updates, n_samples=len(job.data), n_steps=steps
                ),
                aux_vars=job.trainer.optimizer.collect_aux_var(self.model.weight_specs()),
                n_samples=len(job.data),
                n_steps=steps,
                loss_sum=float(losses[k]),
                n_samples_seen=sum(len(r) for r in schedules[k]),
                seconds=seconds,
            )

    # ---- data --------------------------------------------------------------------------------

    def _device_data(self, data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.tensors([data], self._place)[0]

    def _stacked_data(self, jobs: Sequence[ClientJob]) -> tuple[torch.Tensor, torch.Tensor]:
        """Every client's data on the device, ``[K, n_max, ...]`` (zero-padded), each copied
        there once and kept from round to round within the data budget (:attr:`data`)."""
        xs, ys = zip(*self.data.tensors([job.data for job in jobs], self._place), strict=True)
        if len({len(x) for x in xs}) == 1:  # one batched copy kernel for many clients
            return torch.stack(xs), torch.stack(ys)
        pad = torch.nn.utils.rnn.pad_sequence
        return pad(list(xs), batch_first=True), pad(list(ys), batch_first=True)

    def _buffers(self) -> Tensors:
        return dict(self.model.module.named_buffers())


_Step = tuple[int, list[int], torch.Tensor, torch.Tensor]
#: What a chunk's training gives: the batch schedules, the updates, the loss sums, its start.
_Trained = tuple[list[list[np.ndarray]], Tensors, torch.Tensor, float]


class _Plan(NamedTuple):
    """A chunk's round worked out on the host: each client's batches (``schedules``), and
    every local step's ``(t, members, shape of its sample indices)``, all of whose members and
    indices lie in ``flat`` (one copy to the device per chunk: one per step would make the
    host wait for the GPU at every step)."""

    schedules: list[list[np.ndarray]]
    steps: list[tuple[int, list[int], tuple[int, ...]]]
    flat: np.ndarray


def _plan(schedules: list[list[np.ndarray]]) -> _Plan:
    """The steps of ``schedules``: at each ``t``, the clients that have a step ``t`` grouped
    by batch size."""
    steps, parts = [], []
    for t in range(max((len(s) for s in schedules), default=0)):
        for members in groups_by_batch_size(schedules, t):
            rows = np.stack([schedules[k][t] for k in members])
            steps.append((t, members, rows.shape))
            parts += [np.asarray(members), rows.ravel()]
    flat = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    return _Plan(schedules, steps, flat)


def _on_device(plan: _Plan, device: torch.device) -> list[_Step]:
    """Every local step of ``plan``: ``(t, members, members on the device, their sample
    indices [len(members), batch] on the device)``. On a CUDA device the indices travel from
    pinned memory, without the host waiting for the work queued before."""
    if not plan.steps:
        return []
    host = torch.from_numpy(plan.flat)
    if device.type == "cuda":
        on_device = host.pin_memory().to(device, non_blocking=True)
    else:
        on_device = host.to(device)
    steps, at = [], 0
    for t, members, shape in plan.steps:
        sel = on_device[at : at + len(members)]
        at += len(members)
        size = math.prod(shape)
        steps.append((t, members, sel, on_device[at : at + size].view(shape)))
        at += size
    return steps


def _default_budget(device: torch.device) -> int:
    """A quarter of a CUDA device's memory; no bound elsewhere (CPU tensors share the
    datasets' memory; other devices do not say how much they have)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory // 4)
    return sys.maxsize
