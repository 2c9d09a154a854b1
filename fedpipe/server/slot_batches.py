"""Vectorized mode of the in-process simulation: the clients of a round that share a device
slot, trained in one call of that slot's :class:`~fedpipe.common.vectorized.VectorizedTrainer`.

Each client submits its job and awaits its own reply. The first submission of a round task on
a slot opens the slot's batch and schedules its flush with ``loop.call_soon``. The round loop
starts every sampled client's coroutine before it awaits anything (``asyncio.ensure_future``
in one go) and a client submits without awaiting first, so the flush runs after every
client's submission: one engine call per slot and round. Nothing waits for a client that
never submits (one that failed before, or a round loop that starts clients in waves): the
flush never counts, at worst a batch is smaller. The sampled names in the task would instead
make a slot wait for a client that raised before submitting.

The flush queues the engine on the slot's worker thread; each client's reply is handed to the
event loop as the engine yields it. If the engine raises, the clients it had not answered yet
train one after another, each on its own: a client's failure fails that client only. A reply
whose client was cancelled at the round deadline is dropped; the thread finishes its work and
the next task of that slot queues behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from fedpipe.common.training import TrainResult
from fedpipe.common.vector import Vector
from fedpipe.common.vectorized import ClientJob, VectorizedTrainer
from fedpipe.server.clients import RoundTask
from fedpipe.server.devices import DeviceWorkers

__all__ = ["submit"]

log = logging.getLogger(__name__)


@dataclass
class _Batch:
    """The jobs a slot got for one round task, and where each client awaits its reply."""

    jobs: list[ClientJob] = field(default_factory=list)
    replies: list[asyncio.Future[TrainResult]] = field(default_factory=list)


def submit(
    task: RoundTask,
    slot: int,
    job: ClientJob,
    engine: VectorizedTrainer,
    weights: Vector,
    workers: DeviceWorkers,
) -> asyncio.Future[TrainResult]:
    """Add ``job`` to ``slot``'s batch for ``task`` (``weights``: the task's weights on the
    slot's device); the future gets the client's reply or its error."""
    loop = asyncio.get_running_loop()
    key = f"inprocess/batch-{slot}"
    batch: _Batch | None = task.cache.get(key)
    if batch is None:
        batch = task.cache[key] = _Batch()
        loop.call_soon(_flush, task, key, slot, engine, weights, workers)
    reply: asyncio.Future[TrainResult] = loop.create_future()
    batch.jobs.append(job)
    batch.replies.append(reply)
    return reply


def _flush(
    task: RoundTask,
    key: str,
    slot: int,
    engine: VectorizedTrainer,
    weights: Vector,
    workers: DeviceWorkers,
) -> None:
    batch: _Batch = task.cache.pop(key)  # a later submission opens a new batch
    loop = asyncio.get_running_loop()
    workers.start(
        slot,
        lambda: _train(loop, batch, engine, weights, task.round_number),
        lambda error: _fail_all(loop, batch, error),
    )


def _train(
    loop: asyncio.AbstractEventLoop,
    batch: _Batch,
    engine: VectorizedTrainer,
    weights: Vector,
    round_number: int,
) -> None:
    """On the slot's thread: the batch's replies, handed to ``loop`` one by one."""
    answered = 0
    try:
        for result in engine.train(batch.jobs, weights, round_number):
            _hand_over(loop, batch.replies[answered], result)
            answered += 1
    except Exception as exc:  # one client's bad data must not fail its batch: retried alone
        log.warning(
            "round %d: vectorized training of %d client(s) failed (%s: %s); they train one "
            "after another",
            round_number,
            len(batch.jobs) - answered,
            type(exc).__name__,
            exc,
        )
        for job, reply in zip(batch.jobs[answered:], batch.replies[answered:], strict=True):
            try:
                one = job.trainer.train(
                    job.data, weights, job.aux_vars, client=job.name, round_number=round_number
                )
            except Exception as error:  # the client's own failure, raised where it awaits
                _hand_over(loop, reply, error)
            else:
                _hand_over(loop, reply, one)


def _fail_all(loop: asyncio.AbstractEventLoop, batch: _Batch, error: BaseException) -> None:
    """The slot could not run the batch: every client not answered yet gets ``error``."""
    for reply in batch.replies:
        _hand_over(loop, reply, error)


def _hand_over(
    loop: asyncio.AbstractEventLoop,
    reply: asyncio.Future[TrainResult],
    outcome: TrainResult | BaseException,
) -> None:
    # The loop is closed when the run ended while this thread trained: nobody awaits.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_settle, reply, outcome)


def _settle(reply: asyncio.Future[TrainResult], outcome: TrainResult | BaseException) -> None:
    if reply.done():  # cancelled or answered already
        return
    if isinstance(outcome, BaseException):
        reply.set_exception(outcome)
    else:
        reply.set_result(outcome)
