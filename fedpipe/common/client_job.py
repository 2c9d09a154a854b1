"""One simulated client's task in a round, and the batches it draws: what the engines that
train many clients at once (:mod:`fedpipe.common.vectorized` with torch,
:mod:`fedpipe.common.stacked` with numpy) share, free of torch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedpipe.common.data import Dataset
from fedpipe.common.seed_states import generators
from fedpipe.common.summable import Summable
from fedpipe.common.training import LocalTrainer, round_seed

__all__ = ["ClientJob", "batch_schedule", "batch_schedules", "groups_by_batch_size"]


@dataclass
class ClientJob:
    """One client's task in a round: its trainer (optimizer and state), data and aux vars."""

    name: str
    trainer: LocalTrainer
    data: Dataset
    aux_vars: Mapping[str, Summable] = field(default_factory=dict)


def batch_schedule(job: ClientJob, round_number: int) -> list[np.ndarray]:
    """The sample indices of each of the client's steps this round (see
    :func:`batch_schedules`)."""
    return batch_schedules([job], round_number)[0]


def batch_schedules(jobs: Sequence[ClientJob], round_number: int) -> list[list[np.ndarray]]:
    """Each client's sample indices of each of its steps this round, in the order
    :meth:`LocalTrainer.train` draws them: the round's seed, then per epoch the permutation
    and the slices of ``Dataset.batches(shuffle=True)``, from the same generator (the
    generators of all clients seeded at once: :mod:`fedpipe.common.seed_states`)."""
    seeds = [round_seed(job.trainer.setup.seed, job.name, round_number) for job in jobs]
    return [_schedule(job, rng) for job, rng in zip(jobs, generators(seeds), strict=True)]


def _schedule(job: ClientJob, rng: np.random.Generator) -> list[np.ndarray]:
    cfg, n = job.trainer.training, len(job.data)
    stop = n - n % cfg.batch_size if cfg.drop_remainder else n
    steps: list[np.ndarray] = []
    for _ in range(cfg.epochs):
        order = rng.permutation(n)
        for start in range(0, stop, cfg.batch_size):
            steps.append(order[start : start + cfg.batch_size])
            if cfg.max_steps is not None and len(steps) >= cfg.max_steps:
                return steps
    return steps


def groups_by_batch_size(schedules: list[list[np.ndarray]], t: int) -> list[list[int]]:
    """Positions of the clients that have a step ``t``, grouped by that step's batch size."""
    groups: dict[int, list[int]] = {}
    for k, steps in enumerate(schedules):
        if t < len(steps):
            groups.setdefault(len(steps[t]), []).append(k)
    return list(groups.values())
