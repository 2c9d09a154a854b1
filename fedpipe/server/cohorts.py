"""Clients that train a round together: one reply for many clients, folded at once.

A transport whose clients can train as a group (the in-process simulation's stacked mode,
:mod:`fedpipe.server.stacked_cohort`) gives them a shared :class:`ClientCohort`. When every
sampled client of a round has the same cohort, the round loop hands it the whole round
(:func:`train_cohort`): the cohort trains them, admits and adds up their partials with
:meth:`~fedpipe.common.aggregators.Aggregator.admit_stacked`, and answers one
:class:`CohortReply`; no per-client reply crosses the event loop. Every per-client record
the round loop keeps (``clients.jsonl``, the sampler's losses, base rounds, failures) is
still written client by client from the reply's rows.

The round goes client by client instead (the cohort declines, saying why once) whenever a
server feature needs each reply on its own: update validation, client-level DP, secure
aggregation, an aggregator with no stacked form, aux vars in the task.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fedpipe.common.aggregators import Aggregator
from fedpipe.common.half import is_float_dtype, numpy_dtype
from fedpipe.common.summable import Summable
from fedpipe.common.vector import ArraySpec
from fedpipe.server.client_log import RoundClients
from fedpipe.server.clients import ClientProxy, RoundTask

if TYPE_CHECKING:
    from fedpipe.server.rounds import FederatedRun, _Fold

__all__ = ["ClientCohort", "CohortReply", "train_cohort"]

log = logging.getLogger(__name__)


@dataclass
class CohortReply:
    """A round of a cohort: the admitted sum of the folded clients' partials and, row by
    row in task order, what each folded client did; ``failures`` names the others."""

    total: Summable | None
    names: list[str]
    n_samples: np.ndarray
    n_steps: np.ndarray
    loss_sum: np.ndarray
    n_samples_seen: np.ndarray
    seconds: float  # each client's training time, as the cohort measured it
    failures: dict[str, str] = field(default_factory=dict)


class ClientCohort(ABC):
    """Clients of one transport that can train a round together."""

    def __init__(self) -> None:
        self._said: set[str] = set()

    @abstractmethod
    async def train_together(
        self, clients: Sequence[ClientProxy], task: RoundTask, aggregator: Aggregator
    ) -> CohortReply | None:
        """Train ``clients`` on ``task``; None when they cannot train together (then nothing
        changed: the round goes client by client)."""

    def decline(self, reason: str) -> None:
        """Say once per reason why rounds go client by client."""
        if reason not in self._said:
            self._said.add(reason)
            log.info("stacked training off, clients train one after another: %s", reason)


async def train_cohort(
    run: FederatedRun, sampled: list[ClientProxy], task: RoundTask, deadline: float, start: float
) -> tuple[_Fold, RoundClients] | None:
    """The round of ``sampled`` by their shared cohort; None when it goes client by client."""
    from fedpipe.server.rounds import _Fold

    cohort = sampled[0].cohort() if sampled else None
    if cohort is None or any(c.cohort() is not cohort for c in sampled[1:]):
        return None
    reason = _per_client_feature(run, task)
    if reason is not None:
        cohort.decline(reason)
        return None
    clients = RoundClients(task.round_number, [c.name for c in sampled])
    folded = _Fold(run.aggregator, run.optimizer, run.specs)
    try:
        async with asyncio.timeout_at(deadline):
            reply = await cohort.train_together(sampled, task, run.aggregator)
    except TimeoutError:
        log.warning("round deadline (%.1fs) passed; no reply from the stacked clients",
                    run.config.round_timeout)  # fmt: skip
        clients.failed(dict.fromkeys(clients.lines, "no reply before the round deadline"))
        return folded, clients
    if reply is None:
        return None
    _fold_reply(run, folded, clients, reply, time.perf_counter() - start)
    return folded, clients


def _per_client_feature(run: FederatedRun, task: RoundTask) -> str | None:
    if run.validation is not None:
        return "update validation judges each reply on its own"
    if run.privacy is not None:
        return "client-level DP clips each reply on its own"
    if not run.aggregator.stacks:
        return f"aggregator {run.aggregator.name!r} folds each reply on its own"
    if task.aux_vars:
        return f"the round carries aux vars ({', '.join(sorted(task.aux_vars))})"
    return None


def _fold_reply(
    run: FederatedRun, folded: _Fold, clients: RoundClients, reply: CohortReply, seconds: float
) -> None:
    """The reply into the round's sum and records, as the one-by-one fold would put it."""
    if reply.total is not None:  # summed in float32 for a half-precision model, as start does
        wide = {n: ArraySpec(s.shape, _accumulated(s.dtype)) for n, s in run.specs.items()}
        run.aggregator.validate(reply.total, wide)
        folded.total = run.aggregator.start(reply.total.accumulator(copy=False))
    folded.names = list(reply.names)
    folded.count = len(reply.names)
    folded.seen = int(reply.n_samples_seen.sum())
    for loss in reply.loss_sum.tolist():  # in client order, as the fold adds them
        folded.loss_sum += loss
    rows = zip(
        reply.names,
        reply.loss_sum.tolist(),
        reply.n_samples.tolist(),
        reply.n_samples_seen.tolist(),
        reply.n_steps.tolist(),
        strict=True,
    )
    for name, loss_sum, n_samples, seen, steps in rows:
        clients.replied(name, loss_sum / max(seen, 1), n_samples, seen, steps, seconds,
                        reply.seconds)  # fmt: skip
    clients.failed(reply.failures)


def _accumulated(dtype: str) -> str:
    """The dtype a round's sum of arrays of ``dtype`` is kept in."""
    kind = numpy_dtype(dtype)
    return "float32" if is_float_dtype(kind) and kind.itemsize < 4 else dtype
