"""The server side of the Dask transport: client proxies whose clients live on Dask workers.

:class:`DaskFleet` places each client on a worker (round robin at first: client ``i`` of ``n``
workers on worker ``i % n``) and keeps it there: its data goes once, with its first task, and
its state stays in the worker's registry (:mod:`.worker`). The server calls each worker
through one Dask actor of the run (:class:`~.worker.WorkerCalls`, created on first use): after
its creation, a call goes from the server straight to the worker and its answer straight back,
not through the scheduler (the client connects to the workers directly, :mod:`.run`). The
clients a round sends to one worker go in one call per worker and phase (init, train,
evaluate), batched the way the
in-process vectorized mode batches a device slot's clients
(:mod:`fedpipe.server.slot_batches`): the first client of a round task on a worker opens the
batch and schedules its flush with ``loop.call_soon``, after every sampled client has
submitted. A call carries the data of the clients its worker has yet to build joined into a
few arrays (:func:`~.payloads.packed_inits`: one buffer per dtype, not two per client), and the
round's weights and aux vars once per worker, not per client; replies come back as numpy
arrays in plain containers (:mod:`.payloads`) and are handed to the round loop in
task order, so that its running sum adds them in the order the in-process transport does: same
seed, bit-identical weights. When the clients train stacked (the mode ``"auto"`` and a numpy
model), a round's training goes through the fleet's :class:`~.cohort.DaskCohort` instead: one
call per worker, one reply for the round.

A worker that dies (the scheduler's ``remove-worker`` event, or a call that cannot reach it)
fails the replies it owed: its
clients leave the round like clients past the deadline, and the round goes on if
``min_results`` others replied. Its clients go to the live workers with the fewest clients at
their next task, with their data, and start from a fresh state there: module states and aux
vars are re-initialized, as a client process that lost its state directory would be. Not its
DP-SGD accountant: each train reply brings the client's record back (the steps it ran, plain
numbers the run's settings already tell), and a client placed afresh gets it with its data, so
that its ε keeps counting every step its replies carried; steps of a reply that died with its
worker never left it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from dask.distributed import Client

from fedpipe.common.data import Dataset
from fedpipe.common.training import EvalResult, RunSetup, TrainResult
from fedpipe.common.vector import ArraySpec
from fedpipe.proto.fedpipe.v1 import secagg_pb2 as spb
from fedpipe.server.clients import ClientError, ClientProxy, RoundTask, RunOutcome
from fedpipe.server.devices import DeviceWorkers
from fedpipe.server.transports.dask.cohort import DaskCohort
from fedpipe.server.transports.dask.payloads import (
    PackedInits,
    eval_from_plain,
    packed_inits,
    plain_dataset,
    plain_summable,
    plain_vector,
    train_from_plain,
    vector_from,
)
from fedpipe.server.transports.dask.worker import (
    DP_SGD_RECORD,
    MASKED,
    Job,
    Op,
    Outcome,
    WorkerCalls,
    WorkerClients,
)

if TYPE_CHECKING:  # the secagg extra
    from fedpipe.common.secagg.messages import (
        AdvertiseKeys,
        ForwardedShares,
        Roster,
        ShareKeys,
        UnmaskRequest,
        UnmaskShares,
    )

__all__ = ["DaskClient", "DaskFleet"]

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Batch:
    """The jobs one worker got for one phase, and where each client awaits its reply."""

    op: Op
    worker: str
    round_number: int
    jobs: list[Job] = field(default_factory=list)
    replies: list[asyncio.Future[Any]] = field(default_factory=list)
    runner: asyncio.Future[None] | None = None


class DaskFleet:
    """Which Dask worker owns each simulated client, and one call per worker and phase.

    Parameters
    ----------
    client:
        An asynchronous ``dask.distributed.Client`` on this event loop.
    resources:
        Dask worker resources each task needs; clients go only to workers that have them.
    dp_sgd:
        The clients' own DP-SGD settings (:class:`~fedpipe.common.config.DpSgdConfig` as
        plain data), or None.
    stack_clients:
        Clients a worker trains stacked at once; None: each worker trains its clients one
        after another (the sequential mode), no :attr:`cohort`.
    """

    def __init__(
        self,
        client: Client,
        resources: Mapping[str, float] | None = None,
        plugins: list[str] | None = None,
        device: Any = None,
        noise_seed: int | None = None,
        *,
        dp_sgd: dict[str, Any] | None = None,
        stack_clients: int | None = None,
    ) -> None:
        self.client = client
        self.stack_clients = stack_clients
        #: The clients' cohort when they train stacked (:mod:`.cohort`).
        self.cohort = None if stack_clients is None else DaskCohort(self)
        self.dp_sgd = dp_sgd
        self.records: dict[str, Any] = {}  # client name -> its last DP-SGD record
        self.resources = dict(resources or {})
        self.plugins, self.device = list(plugins or []), device
        self.noise_seed = noise_seed
        self.plugin = f"fedpipe-sim-{uuid.uuid4().hex}"
        self.workers: list[str] = []  # live, with the resources
        self.owners: dict[str, str] = {}  # client name -> its worker
        self.load: Counter[str] = Counter()
        self._pending: dict[str, set[_Batch]] = {}
        self._actors: dict[str, asyncio.Future[Any]] = {}  # worker -> its WorkerCalls actor
        self._init_cache: dict[str, Any] = {}
        self._started = False
        self._followed: set[str] = set()  # workers whose events this fleet follows

    async def start(self, setup: RunSetup) -> None:
        """Install the run's registry on every worker (those that join later too)."""
        plugin = WorkerClients(
            setup.to_data(),
            self.plugins,
            self.device,
            self.noise_seed,
            self.dp_sgd,
            self.stack_clients,
        )
        await self.client.register_plugin(plugin, name=self.plugin)
        self._started = True
        await self._refresh()

    async def close(self) -> None:
        """Free every worker's clients (the plugin's teardown) and stop following workers."""
        if not self._started:
            return
        for worker in self._followed:
            self.client.unsubscribe_topic(worker)
        self._actors.clear()  # released: each worker drops its actor
        await self.client.unregister_worker_plugin(self.plugin)

    async def refreshed(self, task: RoundTask) -> None:
        """The live workers, asked once per round task (workers that joined since take the
        clients of those that left); every client of the task awaits the same answer."""
        refresh: asyncio.Future[None] | None = task.cache.get("dask/refresh")
        if refresh is None:
            refresh = task.cache["dask/refresh"] = asyncio.ensure_future(self._refresh())
        await asyncio.shield(refresh)

    async def _refresh(self) -> None:
        scheduler = self.client.scheduler
        assert scheduler is not None  # an open client
        info = await scheduler.identity(n_workers=-1)
        self.workers = [
            address
            for address, worker in info["workers"].items()
            if all(worker.get("resources", {}).get(k, 0) >= v for k, v in self.resources.items())
        ]
        new = set(self.workers) - self._followed
        for worker in new:
            # A worker's own topic: the scheduler's topic "all" also carries events Dask
            # cannot serialize (a "replicate" event, for one).
            self.client.subscribe_topic(worker, functools.partial(self._on_event, worker))
            self._followed.add(worker)
        if new:  # one that left before its topic was followed told no one: ask again
            again = await scheduler.identity(n_workers=-1)
            for worker in new - set(again["workers"]):
                self._lost(worker)

    def _on_event(self, worker: str, event: tuple[float, dict[str, Any]]) -> None:
        if event[1].get("action") == "remove-worker":
            self._lost(worker)

    def _lost(self, worker: str) -> None:
        """``worker`` is gone: fail what it owed this round, free its clients for others
        (said once: a call that could not reach it and the scheduler's event both tell)."""
        live = worker in self.workers
        if live:
            self.workers.remove(worker)
        self._actors.pop(worker, None)
        if worker in self._followed:
            self._followed.discard(worker)
            self.client.unsubscribe_topic(worker)
        gone = [name for name, owner in self.owners.items() if owner == worker]
        for name in gone:
            del self.owners[name]
        del self.load[worker]
        if live or gone:
            log.warning("Dask worker %s left; its %d client(s) leave this round and start again "
                        "from a fresh state on another worker", worker, len(gone))  # fmt: skip
        error = ClientError(f"its Dask worker {worker} died")
        for batch in self._pending.pop(worker, set()):
            if batch.runner is not None and batch.runner is not asyncio.current_task():
                batch.runner.cancel()
            for reply in batch.replies:
                if not reply.done():
                    reply.set_exception(error)

    def place(self, client: ClientProxy) -> tuple[str, dict[str, Any] | None]:
        """The worker of ``client``, and its data when that worker has yet to build it."""
        owner = self.owners.get(client.name)
        if owner is not None:
            return owner, None
        if not self.workers:
            wanted = f" with resources {self.resources}" if self.resources else ""
            raise ClientError(f"no Dask worker{wanted} is alive to take client {client.name}")
        owner = min(self.workers, key=lambda w: self.load[w])
        self.owners[client.name] = owner
        self.load[owner] += 1
        assert isinstance(client, DaskClient)  # the fleet's own
        return owner, {
            "train": plain_dataset(client.train_data),
            "eval": plain_dataset(client.eval_data),
            DP_SGD_RECORD: self.records.get(client.name),
        }

    def submit(
        self,
        client: DaskClient,
        op: Op,
        task: RoundTask | None,
        data: bytes | None = None,
        round_number: int = 0,
    ) -> asyncio.Future[Any]:
        """Add ``client``'s ``op`` to its worker's batch for ``task`` (``None``: the run setup,
        or a secure aggregation stage of ``round_number`` whose message is ``data``); the
        future gets the client's plain reply, or a :class:`ClientError`."""
        loop = asyncio.get_running_loop()
        cache = self._init_cache if task is None else task.cache
        worker, init = self.place(client)
        key = f"dask/{op}/{worker}"
        batch: _Batch | None = cache.get(key)
        if batch is None:
            number = round_number if task is None else task.round_number
            batch = cache[key] = _Batch(op, worker, number)
            loop.call_soon(self._flush, cache, key, task)
        reply: asyncio.Future[Any] = loop.create_future()
        batch.jobs.append((client.name, init, data))
        batch.replies.append(reply)
        return reply

    def _flush(self, cache: dict[str, Any], key: str, task: RoundTask | None) -> None:
        batch: _Batch = cache.pop(key)  # a later submission opens a new batch
        if batch.worker not in self.workers:  # it left between submission and flush
            self._pending.setdefault(batch.worker, set()).add(batch)
            self._lost(batch.worker)
            return
        self._pending.setdefault(batch.worker, set()).add(batch)
        batch.runner = asyncio.ensure_future(self._dispatch(batch, task))

    def submit_stacked(self, worker: str, jobs: list[Job], task: RoundTask) -> asyncio.Future[Any]:
        """One call: ``jobs``' clients trained stacked on ``worker``
        (:func:`~.worker.train_stacked`); the future gets its plain answer, or a
        :class:`ClientError` (the worker died, the call failed)."""
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        batch = _Batch("train_stacked", worker, task.round_number, jobs, [reply])
        self._pending.setdefault(worker, set()).add(batch)
        if worker not in self.workers:  # it left since the round's refresh
            self._lost(worker)
        else:
            batch.runner = asyncio.ensure_future(self._dispatch_stacked(batch, task))
        return reply

    async def _dispatch_stacked(self, batch: _Batch, task: RoundTask) -> None:
        [reply] = batch.replies
        try:
            names, _, inits = _wire_jobs(batch.jobs)
            shared, number = self.shared(task, "train"), batch.round_number
            answer = await self._call(batch.worker, "train_stacked", names, inits, shared, number)
            failed = set(answer.get("failures", {})) if isinstance(answer, dict) else set()
        except Exception as exc:  # the call's failure is each of its clients' failure
            log.warning("Dask call to %s failed: %s: %s", batch.worker, type(exc).__name__, exc)
            answer = ClientError(f"Dask call failed: {type(exc).__name__}: {exc}")
            failed = {name for name, _, _ in batch.jobs}
        finally:
            self._pending.get(batch.worker, set()).discard(batch)
        for name, init, _ in batch.jobs:
            if init is not None and name in failed:  # not built there: placed afresh next time
                self._unplace(name)
        if not reply.done():  # the round deadline cancelled it
            if isinstance(answer, ClientError):
                reply.set_exception(answer)
            else:
                reply.set_result(answer)

    async def _call(self, worker: str, method: str, *args: Any) -> Any:
        """``method(*args)`` of ``worker``'s :class:`~.worker.WorkerCalls` (created on first
        use); a worker this server cannot reach is lost (:meth:`_lost`)."""
        actor = self._actors.get(worker)
        if actor is None:
            actor = self._actors[worker] = asyncio.ensure_future(self._actor(worker))
        try:
            calls = await asyncio.shield(actor)
            return await getattr(calls, method)(*args)
        except OSError:  # Dask's "Unable to contact Actor's worker", a closed connection
            self._lost(worker)
            raise

    async def _actor(self, worker: str) -> Any:
        """A new :class:`~.worker.WorkerCalls` on ``worker``; none kept when it fails."""
        try:
            return await self.client.submit(
                WorkerCalls, self.plugin, workers=[worker], allow_other_workers=False,
                pure=False, actor=True,
            )  # fmt: skip
        except Exception:  # the next call tries afresh
            if self._actors.get(worker) is asyncio.current_task():
                del self._actors[worker]
            raise

    async def _dispatch(self, batch: _Batch, task: RoundTask | None) -> None:
        try:
            shared = None if task is None else self.shared(task, batch.op)
            args = (batch.op, *_wire_jobs(batch.jobs), shared, batch.round_number)
            outcomes: list[Outcome] = await self._call(batch.worker, "run_jobs", *args)
            if not isinstance(outcomes, list) or len(outcomes) != len(batch.jobs):
                raise ClientError(f"a worker answered {len(batch.jobs)} jobs with {outcomes!r}")
        except Exception as exc:  # the call's failure is each of its clients' failure
            log.warning("Dask call to %s failed: %s: %s", batch.worker, type(exc).__name__, exc)
            outcomes = [("error", f"Dask call failed: {type(exc).__name__}: {exc}")] * len(
                batch.jobs
            )
        finally:
            self._pending.get(batch.worker, set()).discard(batch)
        for (name, init, _), reply, (status, value) in zip(
            batch.jobs, batch.replies, outcomes, strict=True
        ):
            if status == "ok" and isinstance(value, dict) and value.get(DP_SGD_RECORD):
                self.records[name] = value[DP_SGD_RECORD]  # late or not, its update left
            if reply.done():  # the round deadline cancelled it
                continue
            if status == "ok":
                reply.set_result(value)
            else:
                if init is not None:  # not built there: placed afresh at its next task
                    self._unplace(name)
                reply.set_exception(ClientError(str(value)))

    def _unplace(self, name: str) -> None:
        owner = self.owners.pop(name, None)
        if owner is not None:
            self.load[owner] -= 1

    def shared(self, task: RoundTask, op: Op) -> dict[str, Any]:
        """The task's weights and aux vars (an evaluation's: the global buffers, when they
        travel) as plain data, built once per task and phase: each worker's call carries
        them."""
        key = f"dask/shared/{op}"
        payload: dict[str, Any] | None = task.cache.get(key)
        if payload is None:
            payload = task.cache[key] = {
                "weights": plain_vector(task.weights),
                "aux_vars": {k: plain_summable(v) for k, v in task.aux_vars.items()},
            }
            if op != "evaluate" and task.settings.get("dp"):  # distributed DP: clients noise
                payload["dp"] = dict(task.settings["dp"])
        return payload


def _wire_jobs(jobs: list[Job]) -> tuple[np.ndarray, list[bytes | None] | None, PackedInits]:
    """``jobs`` as a task sends them: the names as an array of str, the stage messages
    (None: no job has one) and the data of the clients to build, packed
    (:func:`~.payloads.packed_inits`)."""
    names = np.array([name for name, _, _ in jobs], dtype=str)
    messages = [data for _, _, data in jobs]
    inits = {name: init for name, init, _ in jobs if init is not None}
    return names, None if all(m is None for m in messages) else messages, packed_inits(inits)


class DaskClient(ClientProxy):
    """A simulated client trained on a Dask worker (see the module docstring); the server keeps
    its data too, to place it on another worker if its own dies."""

    def __init__(
        self, name: str, train_data: Dataset, eval_data: Dataset | None, fleet: DaskFleet
    ) -> None:
        self.name = name
        self.train_data, self.eval_data = train_data, eval_data
        self.n_train_samples = len(train_data)
        self.n_eval_samples = len(eval_data) if eval_data is not None else 0
        self.fleet = fleet
        #: This round's secure aggregation: (round, roster once shared).
        self._secure_stage: tuple[int, Roster | None] | None = None

    async def initialize(self, setup: RunSetup, specs: Mapping[str, ArraySpec]) -> None:
        await self.fleet.submit(self, "init", None)

    def cohort(self) -> DaskCohort | None:
        return self.fleet.cohort

    async def train(self, task: RoundTask) -> TrainResult:
        await self.fleet.refreshed(task)
        reply = await self._in_turn(task, self.fleet.submit(self, "train", task))
        return train_from_plain(reply)

    async def evaluate(self, task: RoundTask) -> EvalResult:
        if self.eval_data is None:
            raise ClientError(f"client {self.name} has no evaluation data")
        await self.fleet.refreshed(task)
        reply = await self._in_turn(task, self.fleet.submit(self, "evaluate", task))
        return eval_from_plain(reply)

    async def stop(self, outcome: RunOutcome) -> None:
        return None  # the fleet frees every client on the workers at once (its close)

    # ---- secure aggregation's stages (fedpipe.server.secure_rounds), as bytes: .secure -------

    async def secagg_advertise(self, round_number: int) -> AdvertiseKeys:
        from fedpipe.common.secagg.wire import keys_record

        self._secure_stage = (round_number, None)
        data = await self._stage("secagg_advertise", None, round_number)
        return self._decoded(lambda: keys_record(spb.SecAggKeys.FromString(data), self.name))

    async def secagg_share(self, roster: Roster) -> ShareKeys:
        from fedpipe.common.secagg.wire import roster_message, share_keys_record

        round_number = self._secagg_round()
        self._secure_stage = (round_number, roster)
        data = await self._stage("secagg_share", roster_message(roster, self.name), round_number)
        message = spb.SecAggShareKeys
        return self._decoded(lambda: share_keys_record(message.FromString(data), self.name, roster))

    async def train_masked(self, task: RoundTask, shares: ForwardedShares) -> TrainResult:
        from fedpipe.common.secagg.messages import MaskedInput
        from fedpipe.common.secagg.wire import forwarded_message

        self._secagg_roster()
        await self.fleet.refreshed(task)
        data = forwarded_message(shares).SerializeToString()
        reply = await self._in_turn(task, self.fleet.submit(self, "train_masked", task, data))
        result = train_from_plain(reply)
        masked = vector_from(reply.get(MASKED), f"client {self.name}'s masked input")
        return replace(result, masked=MaskedInput(self.name, masked))

    async def secagg_unmask(self, request: UnmaskRequest) -> UnmaskShares:
        from fedpipe.common.secagg.wire import unmask_request_message, unmask_shares_record

        round_number, roster = self._secagg_round(), self._secagg_roster()
        self._secure_stage = None  # one reveal per session
        data = await self._stage("secagg_unmask", unmask_request_message(request), round_number)
        message = spb.SecAggUnmaskShares
        return self._decoded(
            lambda: unmask_shares_record(message.FromString(data), self.name, roster)
        )

    async def _stage(self, stage: Op, message: Any, round_number: int) -> bytes:
        """The worker's answer to ``stage`` of round ``round_number`` (the server's ``message``
        of it), as bytes."""
        data = None if message is None else message.SerializeToString()
        reply = await self.fleet.submit(self, stage, None, data, round_number)
        if not isinstance(reply, bytes):
            raise ClientError(f"client {self.name}: a {stage} answer of {type(reply).__name__}")
        return reply

    def _decoded(self, decode: Callable[[], T]) -> T:
        """``decode()`` of a worker's stage answer; what it cannot decode fails this client."""
        try:
            return decode()
        except ValueError as exc:  # ProtocolError, and protobuf's DecodeError
            raise ClientError(f"client {self.name}: {exc}") from None

    @staticmethod
    async def _in_turn(task: RoundTask, reply: asyncio.Future[Any]) -> Any:
        turns: list[asyncio.Future[None]] = task.cache.setdefault("dask/turns", [])
        return await DeviceWorkers.in_turn(turns, reply)
