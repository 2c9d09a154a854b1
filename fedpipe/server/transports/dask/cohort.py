"""A round's clients on Dask workers trained stacked: one call per worker, one reply.

When the simulation's mode stacks (``mode = "auto"``, a numpy model: see
:func:`fedpipe.server.simulation.training_mode`), every :class:`~.proxy.DaskClient` of a run
has the fleet's :class:`DaskCohort`, and the round loop hands it the whole round
(:mod:`fedpipe.server.cohorts`). It places the clients as the fleet places them (data sent
once, with a client's first task), sends each worker ONE call with its clients in task order
(:func:`~.worker.train_stacked`: the worker's own
:class:`~fedpipe.common.stacked.StackedTrainer`, kept from round to round) with the round's
weights (:meth:`~.proxy.DaskFleet.shared`), and gets back the engine's chunks of plain arrays
with a leading client axis (not joined on the worker: it holds its clients' updates once). It
puts every worker's rows back in the task's client order and adds them up as the in-process
:class:`~fedpipe.server.stacked_cohort.StackedCohort` does
(:func:`~fedpipe.server.stacked_cohort.add_stacked`): the same bits as in-process, stacked or
one by one.

A worker that dies mid-round fails its clients (they are placed afresh next round); the others
fold. When the workers answer that the clients cannot train stacked (a client optimizer module,
a model with no stacked gradients such as a torch model...), nothing was trained: the cohort
declines, once for the run, and rounds go client by client (:mod:`.proxy`). The server never
builds the model to ask itself: the first round asks the workers, which hold it. A worker whose
engine raises (a client's bad data) trains its clients one at a time through it, so that only
that client fails.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedpipe.common.aggregators import Aggregator
from fedpipe.common.stacked import StackedUpdates
from fedpipe.server.clients import ClientError, ClientProxy, RoundTask
from fedpipe.server.cohorts import ClientCohort, CohortReply
from fedpipe.server.stacked_cohort import add_stacked, empty_reply
from fedpipe.server.transports.dask.worker import Job

if TYPE_CHECKING:
    from fedpipe.server.transports.dask.proxy import DaskFleet

__all__ = ["DaskCohort"]

log = logging.getLogger(__name__)

#: The per-client rows of a worker's answer, a leading client axis each.
ROWS = ("n_samples", "n_steps", "loss_sum", "n_samples_seen")


class DaskCohort(ClientCohort):
    """The Dask clients of one run (see the module docstring)."""

    def __init__(self, fleet: DaskFleet) -> None:
        super().__init__()
        self.fleet = fleet
        self.declined: str | None = None  # the workers' reason, asked once

    async def train_together(
        self, clients: Sequence[ClientProxy], task: RoundTask, aggregator: Aggregator
    ) -> CohortReply | None:
        if self.declined is not None:
            return None
        # The live workers are asked only when a client is to be placed (a worker that left
        # since fails its call through the scheduler's event, :meth:`DaskFleet._lost`).
        placed = self.fleet.workers and all(c.name in self.fleet.owners for c in clients)
        try:
            if not placed:
                await self.fleet.refreshed(task)
        except Exception as exc:  # placed on the workers known so far
            log.warning("round %d: the Dask scheduler did not list its workers (%s: %s)",
                        task.round_number, type(exc).__name__, exc)  # fmt: skip
        failures: dict[str, str] = {}
        jobs: dict[str, list[Job]] = {}
        for client in clients:
            try:
                worker, init = self.fleet.place(client)
            except ClientError as exc:
                failures[client.name] = str(exc)
                continue
            jobs.setdefault(worker, []).append((client.name, init, None))
        answers = await asyncio.gather(*(self._answer(w, j, task) for w, j in jobs.items()))
        for answer in answers:
            failures.update(answer["failures"])
        declined = [answer["declined"] for answer in answers if "declined" in answer]
        if declined:  # one config on every worker: all of them decline, and none trained
            self.declined = declined[0]
            self.decline(self.declined)
            return None
        reply = empty_reply()
        order = {client.name: k for k, client in enumerate(clients)}
        names, done = _in_task_order([a for a in answers if a["names"]], order)
        if done is not None:
            add_stacked(reply, names, done, aggregator)
        reply.failures.update(failures)
        return reply

    async def _answer(self, worker: str, jobs: list[Job], task: RoundTask) -> dict[str, Any]:
        """The worker's checked answer; its clients' failures when it died or misanswered."""
        try:
            answer = await self.fleet.submit_stacked(worker, jobs, task)
            return _checked(answer, jobs, task)
        except ClientError as exc:
            return {"names": [], "failures": {name: str(exc) for name, _, _ in jobs}}


def _checked(answer: Any, jobs: list[Job], task: RoundTask) -> dict[str, Any]:
    """``answer`` when it has the shape :func:`~.worker.train_stacked` gives."""
    sent = {name for name, _, _ in jobs}
    if not isinstance(answer, dict) or not isinstance(answer.get("failures"), dict):
        raise ClientError(f"a worker answered stacked training with {type(answer).__name__}")
    if not set(answer["failures"]) <= sent:
        raise ClientError("a worker's stacked answer names clients it was not sent")
    if "declined" in answer:
        return {"declined": str(answer["declined"]), "failures": answer["failures"]}
    names = answer.get("names")
    if not isinstance(names, list) or not set(names) <= sent or len(set(names)) != len(names):
        raise ClientError("a worker's stacked answer names clients it was not sent")
    chunks = answer.get("chunks")
    if not isinstance(chunks, list) or not all(isinstance(c, dict) for c in chunks):
        raise ClientError("a worker's stacked answer has no list of chunks")
    if sum(_rows(chunk, task) for chunk in chunks) != len(names):
        raise ClientError(f"a worker's stacked answer has no {len(names)} rows in its chunks")
    return answer


def _rows(chunk: dict[str, Any], task: RoundTask) -> int:
    """The rows of one chunk of a worker's answer, when it has the fields of
    :class:`~fedpipe.common.stacked.StackedUpdates` with one leading client axis."""
    rows = [chunk.get(key) for key in ROWS]
    size: tuple[int, ...] = rows[0].shape if isinstance(rows[0], np.ndarray) else ()
    if not all(isinstance(a, np.ndarray) and a.ndim == 1 and a.shape == size for a in rows):
        raise ClientError(f"a worker's stacked answer has no rows of {ROWS}")
    updates, weights = chunk.get("updates"), task.weights.coefs
    if (
        not isinstance(updates, dict)
        or set(updates) != set(weights)
        or not all(
            isinstance(updates[n], np.ndarray) and updates[n].shape == (*size, *np.shape(w))
            for n, w in weights.items()
        )
    ):
        raise ClientError("a worker's stacked updates are not rows of the weights")
    return int(size[0])


def _in_task_order(
    answers: list[dict[str, Any]], order: dict[str, int]
) -> tuple[list[str], StackedUpdates | None]:
    """Every worker's rows, in the task's client order (each row copied once, into a fresh
    array: the aggregator may reuse it)."""
    if not answers:
        return [], None
    names = [name for answer in answers for name in answer["names"]]
    chunks = [chunk for answer in answers for chunk in answer["chunks"]]
    ranks = np.empty(len(names), np.int64)  # row k of the joined answers goes to ranks[k]
    ranks[np.argsort([order[name] for name in names], kind="stable")] = np.arange(len(names))
    bounds = np.cumsum([0] + [len(chunk["n_samples"]) for chunk in chunks])

    def joined(field: str, name: str | None = None) -> np.ndarray:
        arrays = [c[field] if name is None else c[field][name] for c in chunks]
        out = np.empty((len(names), *arrays[0].shape[1:]), np.result_type(*arrays))
        for array, begin, end in zip(arrays, bounds[:-1], bounds[1:], strict=True):
            out[ranks[begin:end]] = array
        return out

    seconds = sum(float(c["seconds"]) * len(c["n_samples"]) for c in chunks)
    in_order = [""] * len(names)
    for name, rank in zip(names, ranks.tolist(), strict=True):
        in_order[rank] = name
    return in_order, StackedUpdates(
        updates={name: joined("updates", name) for name in chunks[0]["updates"]},
        n_samples=joined("n_samples"),
        n_steps=joined("n_steps"),
        loss_sum=joined("loss_sum"),
        n_samples_seen=joined("n_samples_seen"),
        seconds=seconds / len(names),
    )
