"""The stacked mode of the in-process simulation: numpy clients trained as one cohort.

With ``mode = "vectorized"`` and a numpy model, the simulated clients share one
:class:`StackedCohort`: the round loop hands it a round's sampled clients
(:mod:`fedpipe.server.cohorts`), it trains them all at once with a
:class:`~fedpipe.common.stacked.StackedTrainer` on a worker thread (the event loop stays
free for the round deadline) and adds their admitted partials up over the client axis.
A client whose update or loss is not finite is left out with the reason the one-by-one fold
gives. When the round cannot train stacked (:func:`~fedpipe.common.stacked.stacked_unfit`)
or the engine raises, it declines and the clients train one after another, unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence

import numpy as np

from fedpipe.common.aggregators import Aggregator
from fedpipe.common.client_job import ClientJob
from fedpipe.common.data import Dataset
from fedpipe.common.models import Model
from fedpipe.common.stacked import StackedTrainer, StackedUpdates, stacked_unfit
from fedpipe.server.clients import ClientProxy, RoundTask
from fedpipe.server.cohorts import ClientCohort, CohortReply

__all__ = ["StackedCohort", "add_stacked", "cohort_unfit", "empty_reply"]

log = logging.getLogger(__name__)

NOT_FINITE = "rejected reply: field 'weighted_sum' holds NaN or infinite values"


class StackedCohort(ClientCohort):
    """The in-process clients of one run setup, on one numpy model."""

    def __init__(self, model: Model, max_clients: int = 1024) -> None:
        super().__init__()
        self.engine = StackedTrainer(model, max_clients)
        #: One training at a time: a round the deadline cut off goes on on its thread (a
        #: thread cannot be stopped), and the next round's waits for it to end.
        self._training = threading.Lock()

    async def train_together(
        self, clients: Sequence[ClientProxy], task: RoundTask, aggregator: Aggregator
    ) -> CohortReply | None:
        jobs = [_job(client) for client in clients]
        reason = cohort_unfit(self.engine.model, jobs, bool(task.settings.get("dp")))
        if reason is not None:
            self.decline(reason)
            return None
        try:
            return await asyncio.to_thread(self._train, jobs, task, aggregator)
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

    def _train(self, jobs: list[ClientJob], task: RoundTask, aggregator: Aggregator) -> CohortReply:
        """On a worker thread: every chunk trained, its finite rows added to the sum; on an
        error, the optimizers' step counts as they were."""
        with self._training:
            steps = [job.trainer.optimizer.step for job in jobs]
            try:
                reply, begin = empty_reply(), 0
                for done in self.engine.train(jobs, task.weights, task.round_number):
                    chunk = jobs[begin : begin + len(done.n_samples)]
                    begin += len(chunk)
                    add_stacked(reply, [job.name for job in chunk], done, aggregator)
                return reply
            except Exception:
                for job, step in zip(jobs, steps, strict=True):
                    job.trainer.optimizer.step = step
                raise


def _job(client: ClientProxy) -> ClientJob:
    from fedpipe.server.transports.inprocess import InProcessClient

    assert isinstance(client, InProcessClient)  # the only members of a StackedCohort
    return ClientJob(client.name, client.trainer, client.train_data)  # type: ignore[arg-type]


def cohort_unfit(model: Model, jobs: list[ClientJob], distributed_dp: bool) -> str | None:
    """Why ``jobs`` cannot train stacked on ``model`` this round; None when they can."""
    if distributed_dp:
        return "distributed DP noise is added client by client"
    if not all(isinstance(job.data, Dataset) for job in jobs):
        return "the clients train on their own loaders"
    return stacked_unfit(model, jobs[0])


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
        finite &= np.isfinite(stacked.reshape(len(names), -1)).all(axis=1)
    rows = np.arange(len(names))
    if not finite.all():
        reply.failures.update(
            (name, NOT_FINITE) for name, ok in zip(names, finite, strict=True) if not ok
        )
        rows = np.flatnonzero(finite)
        updates = {name: stacked[rows] for name, stacked in updates.items()}
    if len(rows):
        reply.total = aggregator.admit_stacked(updates, done.n_samples[rows].tolist(), reply.total)
    reply.names += [names[k] for k in rows.tolist()]
    reply.n_samples = np.concatenate([reply.n_samples, done.n_samples[rows]])
    reply.n_steps = np.concatenate([reply.n_steps, done.n_steps[rows]])
    reply.loss_sum = np.concatenate([reply.loss_sum, done.loss_sum[rows]])
    reply.n_samples_seen = np.concatenate([reply.n_samples_seen, done.n_samples_seen[rows]])
    reply.seconds = done.seconds
