"""The stacked mode of the in-process simulation: numpy clients trained as one cohort.

With ``mode = "vectorized"`` and a numpy model, the simulated clients share one
:class:`StackedCohort`: the round loop hands it a round's sampled clients
(:mod:`fedpipe.server.cohorts`), it trains them all at once with a
:class:`~fedpipe.common.stacked.StackedTrainer` on a worker thread (the event loop stays
free for the round deadline) and adds their admitted partials up over the client axis.
A client whose update or loss is not finite is left out with the reason the one-by-one fold
gives. When the round cannot train stacked (:func:`~fedpipe.common.stacked.stacked_unfit`)
or the engine's first chunk raises, it declines and the clients train one after another,
unchanged; a later chunk that raises trains its clients one at a time through the engine (the
chunks before it were trained: their clients' optimizers moved on), each failing alone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from fedpipe.common.aggregators import Aggregator
from fedpipe.common.backends import ops_of
from fedpipe.common.client_job import ClientJob
from fedpipe.common.data import Dataset
from fedpipe.common.models import Model
from fedpipe.common.stacked import StackedUpdates, per_client_training, stacked_unfit
from fedpipe.server.clients import ClientProxy, RoundTask
from fedpipe.server.cohorts import ClientCohort, CohortReply

__all__ = ["StackedCohort", "add_stacked", "cohort_unfit", "empty_reply", "round_unfit"]

log = logging.getLogger(__name__)

NOT_FINITE = "rejected reply: field 'weighted_sum' holds NaN or infinite values"


class StackedCohort(ClientCohort):
    """The in-process clients of one run setup, trained by ``engine`` (a
    :class:`StackedTrainer` on one numpy model; a subclass brings another engine and overrides
    :meth:`unfit`, :meth:`offload` and :meth:`chunks`)."""

    def __init__(self, engine: Any) -> None:
        super().__init__()
        self.engine = engine
        #: One training at a time: a round the deadline cut off goes on on its thread (a
        #: thread cannot be stopped), and the next round's waits for it to end.
        self._training = threading.Lock()

    async def train_together(
        self, clients: Sequence[ClientProxy], task: RoundTask, aggregator: Aggregator
    ) -> CohortReply | None:
        jobs = [_job(client) for client in clients]
        reason = self.unfit(jobs, task)
        if reason is not None:
            self.decline(reason)
            return None
        try:
            return await self.offload(lambda: self._train(jobs, task, aggregator))
        except Exception as exc:  # one client's bad data: each trains alone, and fails alone
            log.warning(
                "round %d: stacked training of %d client(s) failed (%s: %s); they train one "
                "after another",
                task.round_number,
                len(jobs),
                type(exc).__name__,
                exc,
            )
            return None

    def unfit(self, jobs: list[ClientJob], task: RoundTask) -> str | None:
        """Why ``jobs`` cannot train together on ``task``; None when they can."""
        return cohort_unfit(self.engine.model, jobs, bool(task.settings.get("dp")))

    async def offload(self, work: Callable[[], CohortReply]) -> CohortReply:
        """``work`` off the event loop (which stays free for the round deadline)."""
        return await asyncio.to_thread(work)

    def chunks(self, jobs: list[ClientJob], task: RoundTask) -> Iterator[StackedUpdates]:
        """``jobs`` trained from the task's weights, one result per chunk of clients."""
        return self.engine.train(jobs, task.weights, task.round_number)

    def _train(self, jobs: list[ClientJob], task: RoundTask, aggregator: Aggregator) -> CohortReply:
        """On a worker thread: every chunk trained, its finite rows added to the sum (on the
        engine's device, then brought to the host). A chunk that raises (a client's bad data)
        after others were trained trains one client at a time, each failing alone, and the
        chunks after it go on: the clients trained before keep their rows (their optimizers
        moved on, momentum included). When the first chunk raises, nothing changed (the
        optimizers' step counts as they were): it raises, and the clients train one by one."""
        with self._training:
            steps = [job.trainer.optimizer.step for job in jobs]
            reply, begin = empty_reply(), 0
            while begin < len(jobs):
                try:
                    for done in self.chunks(jobs[begin:], task):
                        chunk = jobs[begin : begin + len(done.n_samples)]
                        add_stacked(reply, [job.name for job in chunk], done, aggregator)
                        begin += len(chunk)
                except Exception as exc:
                    failing = slice(begin, begin + self.engine.max_clients)
                    for job, step in zip(jobs[failing], steps[failing], strict=True):
                        job.trainer.optimizer.step = step
                    if begin == 0:
                        raise
                    log.warning("round %d: stacked training of %d client(s) failed (%s: %s); "
                                "they train one at a time", task.round_number,
                                len(jobs[failing]), type(exc).__name__, exc)  # fmt: skip
                    self._one_at_a_time(reply, jobs[failing], task, aggregator)
                    begin += len(jobs[failing])
            if reply.total is not None:
                reply.total = reply.total.to_numpy()
            return reply

    def _one_at_a_time(
        self, reply: CohortReply, jobs: list[ClientJob], task: RoundTask, aggregator: Aggregator
    ) -> None:
        """Each of ``jobs`` trained alone through the engine, added to ``reply``; one that
        raises is named in its failures, as the round loop names a client that raised."""
        for job in jobs:
            step = job.trainer.optimizer.step
            try:
                for done in self.chunks([job], task):
                    add_stacked(reply, [job.name], done, aggregator)
            except Exception as exc:
                job.trainer.optimizer.step = step
                reply.failures[job.name] = str(exc)


def _job(client: ClientProxy) -> ClientJob:
    from fedpipe.server.transports.inprocess import InProcessClient

    assert isinstance(client, InProcessClient)  # the only members of a StackedCohort
    return ClientJob(client.name, client.trainer, client.train_data)  # type: ignore[arg-type]


def cohort_unfit(model: Model, jobs: list[ClientJob], distributed_dp: bool) -> str | None:
    """Why ``jobs`` cannot train stacked on ``model`` this round; None when they can."""
    return round_unfit(jobs, distributed_dp) or stacked_unfit(model, jobs[0])


def round_unfit(jobs: list[ClientJob], distributed_dp: bool) -> str | None:
    """Why ``jobs`` cannot train together this round, whatever the engine; None when they can."""
    if distributed_dp:
        return "distributed DP noise is added client by client"
    if not all(isinstance(job.data, Dataset) for job in jobs):
        return "the clients train on their own loaders"
    return per_client_training(jobs[0])  # one run setup: every trainer configured alike


def empty_reply() -> CohortReply:
    """A cohort's reply with no client yet (:func:`add_stacked` adds them)."""
    none = np.zeros(0, np.int64)
    return CohortReply(None, [], none, none, np.zeros(0), none, 0.0)


def add_stacked(
    reply: CohortReply, names: list[str], done: StackedUpdates, aggregator: Aggregator
) -> None:
    """Add the clients ``names`` (row ``k``: ``names[k]``) whose loss and weighted update are
    finite to ``reply`` (the update as each client's prepare weighs it: one that overflows
    once weighted is rejected, as its reply would be); name the others in its failures.
    ``done.updates`` goes to the aggregator."""
    updates = aggregator.weigh_stacked(done.updates, done.n_samples.tolist())
    finite = np.isfinite(done.loss_sum)
    for stacked in updates.values():
        finite &= ops_of(stacked).finite_rows(stacked)
    rows = np.arange(len(names))
    if not finite.all():
        reply.failures.update(
            (name, NOT_FINITE) for name, ok in zip(names, finite, strict=True) if not ok
        )
        rows = np.flatnonzero(finite)
        updates = {name: stacked[_on(rows, stacked)] for name, stacked in updates.items()}
    if len(rows):
        reply.total = aggregator.admit_stacked(updates, done.n_samples[rows].tolist(), reply.total)
    reply.names += [names[k] for k in rows.tolist()]
    reply.n_samples = np.concatenate([reply.n_samples, done.n_samples[rows]])
    reply.n_steps = np.concatenate([reply.n_steps, done.n_steps[rows]])
    reply.loss_sum = np.concatenate([reply.loss_sum, done.loss_sum[rows]])
    reply.n_samples_seen = np.concatenate([reply.n_samples_seen, done.n_samples_seen[rows]])
    reply.seconds = done.seconds


def _on(rows: np.ndarray, stacked: Any) -> Any:
    """Row positions to index ``stacked`` with (a tensor on its device for torch)."""
    return rows if isinstance(stacked, np.ndarray) else ops_of(stacked).asarray(rows, stacked)
