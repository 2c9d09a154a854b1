"""The gRPC client proxy: the round loop's view of one client behind a gRPC session."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

from fedpipe.common.codec import dtype_to_enum
from fedpipe.common.config import ServerConfig
from fedpipe.common.framing import Received, announced_bytes, payload_frames
from fedpipe.common.payload import EncodedPayload, encode_payload
from fedpipe.common.protocol import ProtocolError
from fedpipe.common.records import (
    CHUNK_BYTES_KEY,
    eval_result_from,
    settings_data,
    settings_value,
    task_state,
    train_result_from,
)
from fedpipe.common.reply_limits import (
    REPLY_MODEL_COPIES,
    ReplyLimits,
    eval_reply_limits,
    train_reply_limits,
)
from fedpipe.common.training import EvalResult, RunSetup, TrainResult
from fedpipe.common.vector import ArraySpec, Vector
from fedpipe.proto.fedpipe.v1 import federation_pb2 as pb
from fedpipe.proto.fedpipe.v1 import tensor_pb2
from fedpipe.server.clients import ClientError, ClientProxy, RoundTask, RunOutcome
from fedpipe.server.monitor import ServerMonitor
from fedpipe.server.transports.grpc.receive_budget import ReceiveBudget, TransferFloor

if TYPE_CHECKING:  # the secagg extra
    from fedpipe.common.secagg.messages import (
        AdvertiseKeys,
        ForwardedShares,
        Roster,
        ShareKeys,
        UnmaskRequest,
        UnmaskShares,
    )

__all__ = ["GrpcClient"]

T = TypeVar("T")

log = logging.getLogger(__name__)

#: Frames queued per client before the round loop waits for the socket (backpressure).
OUTBOX_FRAMES = 4
#: Round payloads up to this size keep their chunk frames for every client of the round.
FRAME_CACHE_BYTES = 256 << 20
#: Payload limits before a client accepted the run setup (its replies carry no tensors yet).
SETUP_PAYLOAD_BYTES = 1 << 20
SETUP_TENSORS = 64
SETUP_REPLY = ReplyLimits(SETUP_PAYLOAD_BYTES, SETUP_TENSORS)
#: A secure aggregation stage's reply carries its message, no payload.
STAGE_REPLY = ReplyLimits(0, 0)
#: Task kinds as the monitor names them.
TASK_KINDS: dict[int, str] = {
    pb.TASK_KIND_INITIALIZE: "initialize",
    pb.TASK_KIND_TRAIN: "train",
    pb.TASK_KIND_TRAIN_MASKED: "train",
    pb.TASK_KIND_EVALUATE: "evaluate",
}


class GrpcClient(ClientProxy):
    """A remote client process on the other end of a ``Session`` stream."""

    #: Handed out in the Welcome: a reconnecting client proves by it that it owns the name.
    secret: str = ""

    def __init__(
        self,
        name: str,
        hello: Any,
        config: ServerConfig,
        budget: ReceiveBudget,
        monitor: ServerMonitor | None = None,
    ) -> None:
        self.name = name
        self.monitor = monitor
        self.n_train_samples = int(hello.data.n_train_samples)
        self.n_eval_samples = int(hello.data.n_eval_samples)
        self.config = config
        self.chunk_bytes = config.chunk_bytes
        self.outbox: asyncio.Queue[bytes | None] = asyncio.Queue(OUTBOX_FRAMES)
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Received[Any]]] = {}
        self._last_id = 0
        self._closed: str | None = None
        self.told = False  # the stop task is queued: the run's outcome is on its way
        #: Done once the session is closed (:meth:`close`).
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._send_lock = asyncio.Lock()
        self._sending: set[asyncio.Task[None]] = set()
        #: The round and pace of the frames going out now (None: nothing going out).
        self._unsent: tuple[int, TransferFloor] | None = None
        self.max_payload_bytes = SETUP_PAYLOAD_BYTES
        self.max_tensors = SETUP_TENSORS
        self.budget = budget
        self._holding = False  # a delivered reply the round loop still folds holds budget
        # What each awaited reply may carry, and when its round ends at the latest.
        self._expected: dict[int, tuple[ReplyLimits, float]] = {}
        self._train_limits = self._eval_limits = SETUP_REPLY
        self.specs: dict[str, ArraySpec] = {}
        self._spilling: set[int] = set()  # tasks whose reply's update is received to disk
        #: This round's secure aggregation session: its round and, from stage 1, its roster.
        self._secure_stage: tuple[int, Roster | None] | None = None

    # ---- the round loop's side ---------------------------------------------------------------

    async def initialize(self, setup: RunSetup, specs: Mapping[str, ArraySpec]) -> None:
        weight_specs = [
            tensor_pb2.TensorSpec(name=n, dtype=dtype_to_enum(s.dtype), shape=list(s.shape))
            for n, s in specs.items()
        ]
        model_bytes = sum(s.nbytes for s in specs.values())
        # A reply holds a few model-sized Vectors (partial fields, aux vars): bound it.
        configured = int(self.config.max_payload_mib * (1 << 20))
        self.max_payload_bytes = min(configured, REPLY_MODEL_COPIES * model_bytes + (64 << 20))
        self.max_tensors = REPLY_MODEL_COPIES * len(specs) + 256
        self.specs = dict(specs)
        self._train_limits = train_reply_limits(specs)
        self._eval_limits = eval_reply_limits(setup.metrics)
        # The chunk size is this transport's: it rides the setup task, not the run setup.
        await self._request(
            pb.TASK_KIND_INITIALIZE,
            0,
            {**setup.to_data(), CHUNK_BYTES_KEY: self.chunk_bytes},
            None,
            weight_specs=weight_specs,
            limits=SETUP_REPLY,
        )

    async def train(self, task: RoundTask) -> TrainResult:
        got = await self._train_request(task, pb.TASK_KIND_TRAIN, self._train_limits)

        def decode() -> TrainResult:
            result = train_result_from(settings_data(got.message.reply.info), got.payload)
            return replace(result, spilled=got.spilled)

        return self._undecodable_drops(decode)

    def spills(self, message: Any) -> str | None:
        """The payload map received to disk for ``message`` (accepted, announcing a payload):
        ``"partial"`` for a train reply the round loop folds from disk (one of at least
        ``stage_replies_from_bytes``), else None."""
        if message.reply.task_id not in self._spilling:
            return None
        return (
            "partial" if announced_bytes(message) >= self.config.stage_replies_from_bytes else None
        )

    async def _train_request(
        self, task: RoundTask, kind: int, limits: ReplyLimits, stage: tuple[str, Any] | None = None
    ) -> Received[Any]:
        payload = _round_payload(task, "train", self.chunk_bytes)
        settings = {**task.settings, "base_round": task.base_rounds.get(self.name, 0)}
        spill = task.spill_updates and kind == pb.TASK_KIND_TRAIN
        return await self._request(
            kind,
            task.round_number,
            settings,
            payload,
            cache=task.cache,
            limits=limits,
            stage=stage,
            spill=spill,
        )

    def _undecodable_drops(self, decode: Callable[[], T]) -> T:
        """``decode()`` a delivered reply; if it fails, the reply's budget goes back at once
        (the round loop never sees it, so it never releases it)."""
        try:
            return decode()
        except Exception:
            self._drop_reply()
            self._rejected("undecodable")
            raise

    async def evaluate(self, task: RoundTask) -> EvalResult:
        payload = _round_payload(task, "evaluate", self.chunk_bytes)
        got = await self._request(
            pb.TASK_KIND_EVALUATE,
            task.round_number,
            task.settings,
            payload,
            cache=task.cache,
            limits=self._eval_limits,
        )
        try:
            return eval_result_from(settings_data(got.message.reply.info), got.payload)
        except Exception:
            self._drop_reply()
            self._rejected("undecodable")
            raise

    async def stop(self, outcome: RunOutcome) -> None:
        if self._closed is not None:
            return
        task = pb.Task(
            task_id=next(self._ids),
            kind=pb.TASK_KIND_STOP,
            settings=settings_value(outcome.to_data()),
        )
        message = pb.ServerMessage(task=task)
        if self._send_lock.locked():
            self.close("run finished (the client was still receiving a payload)")
            return
        try:
            self.outbox.put_nowait(message.SerializeToString())
        except asyncio.QueueFull:
            self.close("run finished (the client is not reading)")
            return
        # A client told "stopped" reconnects anyway, as it does when it hears nothing.
        self.told = outcome.status != "stopped"
        self.close("run finished", flush=True)

    # ---- secure aggregation's stages (fedpipe.server.secure_rounds) ----------------------------

    async def secagg_advertise(self, round_number: int) -> AdvertiseKeys:
        from fedpipe.common.secagg.wire import keys_record

        self._secure_stage = (round_number, None)
        reply = await self._stage(pb.TASK_KIND_SECAGG_ADVERTISE, round_number, None, "keys")
        return self._stage_record(lambda: keys_record(reply.keys, self.name))

    async def secagg_share(self, roster: Roster) -> ShareKeys:
        from fedpipe.common.secagg.wire import roster_message, share_keys_record

        round_number = self._secagg_round()
        self._secure_stage = (round_number, roster)
        stage = ("roster", roster_message(roster, self.name))
        reply = await self._stage(pb.TASK_KIND_SECAGG_SHARE, round_number, stage, "share_keys")
        return self._stage_record(lambda: share_keys_record(reply.share_keys, self.name, roster))

    async def train_masked(self, task: RoundTask, shares: ForwardedShares) -> TrainResult:
        from fedpipe.common.secagg.messages import MaskedInput
        from fedpipe.common.secagg.partials import masked_specs
        from fedpipe.common.secagg.wire import forwarded_message

        roster = self._secagg_roster()
        specs = masked_specs(self.specs, roster.encoding.dtype.name)
        # The masked input is the reply's one Vector, of exactly these dtypes and shapes.
        limits = ReplyLimits(sum(s.nbytes for s in specs.values()), 1, specs)
        stage = ("forwarded_shares", forwarded_message(shares))
        got = await self._train_request(task, pb.TASK_KIND_TRAIN_MASKED, limits, stage)

        def decode() -> TrainResult:
            result = train_result_from(settings_data(got.message.reply.info), got.payload)
            masked = got.payload.get("masked")
            if not isinstance(masked, Vector):
                raise ClientError(f"client {self.name}: a masked train reply without 'masked'")
            return replace(result, masked=MaskedInput(self.name, masked))

        return self._undecodable_drops(decode)

    async def secagg_unmask(self, request: UnmaskRequest) -> UnmaskShares:
        from fedpipe.common.secagg.wire import unmask_request_message, unmask_shares_record

        round_number, roster = self._secagg_round(), self._secagg_roster()
        self._secure_stage = None  # one reveal per session
        stage = ("unmask_request", unmask_request_message(request))
        reply = await self._stage(pb.TASK_KIND_SECAGG_UNMASK, round_number, stage, "unmask_shares")
        return self._stage_record(
            lambda: unmask_shares_record(reply.unmask_shares, self.name, roster)
        )

    async def _stage(
        self, kind: int, round_number: int, stage: tuple[str, Any] | None, answer: str
    ) -> Any:
        """Send a stage's task; its reply, holding ``answer`` (untrusted, not decoded yet)."""
        got = await self._request(kind, round_number, {}, None, limits=STAGE_REPLY, stage=stage)
        reply = got.message.reply
        if reply.WhichOneof("secagg") != answer:
            self._rejected("undecodable")
            raise ClientError(f"client {self.name}: a secure aggregation reply without {answer}")
        return reply

    def _stage_record(self, decode: Callable[[], T]) -> T:
        try:
            return decode()
        except ProtocolError as exc:
            self._rejected("undecodable")
            raise ClientError(f"client {self.name}: {exc}") from None

    async def _request(
        self,
        kind: int,
        round_number: int,
        settings: Mapping[str, Any],
        payload: EncodedPayload | None,
        *,
        weight_specs: list[Any] | None = None,
        cache: dict[str, Any] | None = None,
        limits: ReplyLimits,
        stage: tuple[str, Any] | None = None,
        spill: bool = False,
    ) -> Received[Any]:
        if self._sending and self._closed is None:
            # The last task's frames are still going out: a client that reads nothing more
            # would pin one payload per round. It is treated as gone.
            self._not_reading("before its next task")
        if self._closed is not None:
            raise ClientError(f"client {self.name} is disconnected ({self._closed})")
        task_id = next(self._ids)
        task = pb.Task(
            task_id=task_id,
            kind=kind,  # type: ignore[arg-type]
            round=round_number,
            settings=settings_value(settings),
            weight_specs=weight_specs or [],
        )
        if payload is not None:
            task.payload.CopyFrom(payload.header)
        if stage is not None:  # a secure aggregation stage's message: (its field, itself)
            getattr(task, stage[0]).CopyFrom(stage[1])
        envelope = pb.ServerMessage(task=task).SerializeToString()
        frames = itertools.chain(
            [envelope], _chunk_frames(payload, cache) if payload is not None else []
        )
        nbytes = len(envelope) + (payload.total_bytes if payload is not None else 0)
        future: asyncio.Future[Received[Any]] = asyncio.get_running_loop().create_future()
        self._waiting[task_id] = future
        if self.monitor is not None:
            self.monitor.task_sent(TASK_KINDS.get(kind, ""), round_number)
        # An upper bound of the round's deadline (the round loop owns the exact one).
        self._expected[task_id] = (limits, time.monotonic() + self.config.round_timeout)
        if spill:
            self._spilling.add(task_id)
        self._last_id = task_id
        # The frames go out in a task of their own that the round deadline does not cancel:
        # a payload cut in two would corrupt the stream for the next task.
        sending = asyncio.create_task(self._send(frames, round_number, nbytes))
        self._sending.add(sending)
        sending.add_done_callback(self._sending.discard)
        try:
            # Neither cancels the other: a round deadline leaves the send going, a closed
            # session (which cancels the send) fails the future instead.
            await asyncio.wait({sending})
            got = await future
        finally:
            self._waiting.pop(task_id, None)
            self._expected.pop(task_id, None)
            self._spilling.discard(task_id)
        reply = got.message.reply
        if reply.error:
            self._drop_reply()
            raise ClientError(f"client {self.name}: {reply.error}")
        return got

    async def _send(self, frames: Iterable[bytes], round_number: int, nbytes: int) -> None:
        """Queue a task's frames at the pace of the receive side's floor, or close the
        session: a client that stops reading must not keep them."""
        cfg = self.config
        async with self._send_lock:  # one task's frames at a time, never interleaved
            rate = cfg.min_transfer_rate_kib * 1024
            floor = TransferFloor(nbytes, rate, cfg.transfer_grace, cfg.chunk_bytes)
            self._unsent = (round_number, floor)
            try:
                for frame in frames:
                    if self._closed is not None:
                        return
                    try:
                        await asyncio.wait_for(self.outbox.put(frame), floor.time_left())
                    except TimeoutError:
                        self._not_reading(
                            f"below min_transfer_rate_kib={cfg.min_transfer_rate_kib:g}"
                        )
                        return
                    floor.received += len(frame)
            finally:
                self._unsent = None

    def _not_reading(self, when: str) -> None:
        """Close the session of a client whose frames do not go out."""
        round_number, unsent = 0, 0
        if self._unsent is not None:
            round_number, floor = self._unsent
            unsent = floor.nbytes - floor.received
        reason = f"not reading: {unsent} bytes of round {round_number} still unsent"
        log.warning("client %s is %s (%s); closing its session", self.name, reason, when)
        self.close(reason)

    # ---- the stream's side ---------------------------------------------------------------------

    def expects(self, message: Any) -> bool:
        """Whether a reply announcing a payload is awaited (False: late, skip its chunks).

        Raises
        ------
        ProtocolError
            Not a reply, or a reply to a task this server never sent.
        """
        kind = message.WhichOneof("kind")
        if kind is None:
            raise ProtocolError("message has no kind set")
        if kind != "reply":
            raise ProtocolError(f"expected a reply, got a {kind} in the middle of a session")
        task_id = message.reply.task_id
        if not 0 < task_id <= self._last_id:
            raise ProtocolError(f"reply to task {task_id}, which was never sent")
        future = self._waiting.get(task_id)
        return future is not None and not future.done()

    def awaited_payload(self, message: Any) -> tuple[ReplyLimits, float] | None:
        """What the payload of a reply may hold and when its round ends at the latest; None
        if it has no payload or nobody awaits it (its chunks are skipped, nothing reserved).

        Raises
        ------
        ProtocolError
            As :meth:`expects`.
        """
        if not self.expects(message) or not message.reply.HasField("payload"):
            return None
        return self._expected[message.reply.task_id]

    def _rejected(self, reason: str) -> None:
        if self.monitor is not None:
            self.monitor.reply_rejected(reason)

    def refuse(self, message: Any, reason: str) -> None:
        """Fail the task awaiting a reply whose header was refused before reception."""
        task_id = message.reply.task_id
        log.warning("client %s: reply to task %d refused: %s", self.name, task_id, reason)
        future = self._waiting.get(task_id)
        if future is not None and not future.done():
            future.set_exception(ClientError(f"client {self.name}: reply refused: {reason}"))

    async def deliver(self, got: Received[Any], reserved: bool) -> None:
        """A complete reply arrived: hand it to the task waiting for it, with the receive
        budget it holds (``reserved``) until the round loop has folded it (:meth:`release`)."""
        if self.expects(got.message):
            self._holding = self._holding or reserved
            self._waiting[got.message.reply.task_id].set_result(got)
            return
        if reserved:
            self.budget.release(self)
        for spilled in got.spilled.values():
            spilled.close()
        self._rejected("late")
        log.info(
            "client %s: reply to task %d arrived after its deadline; dropped",
            self.name,
            got.message.reply.task_id,
        )

    async def release(self) -> None:
        self._drop_reply()

    def _drop_reply(self) -> None:
        """Free the budget of the delivered reply, if it holds any (idempotent)."""
        if self._holding:
            self._holding = False
            self.budget.release(self)

    def close(self, reason: str, *, flush: bool = False) -> None:
        """Fail every waiting task and let the writer end the stream: at once, or with
        ``flush`` after the frames already queued (the stop task)."""
        if self._closed is None:
            self._closed = reason
            if not flush and not self.gone.done():
                self.gone.set_result(None)
            for sending in list(self._sending):
                sending.cancel()
            self._drop_reply()
            try:
                self.outbox.put_nowait(None)
            except asyncio.QueueFull:
                asyncio.get_running_loop().create_task(self.outbox.put(None))
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ClientError(f"client {self.name}: {reason}"))


def _round_payload(task: RoundTask, kind: str, chunk_bytes: int) -> EncodedPayload:
    """Encode a round's payload once and share it between every client of the round."""
    key = f"payload/{kind}"
    if key not in task.cache:
        # an evaluate task's aux vars: the global buffers, when they travel
        task.cache[key] = encode_payload(task_state(task.weights, task.aux_vars), chunk_bytes)
    payload: EncodedPayload = task.cache[key]
    return payload


def _chunk_frames(payload: EncodedPayload, cache: dict[str, Any] | None) -> list[bytes] | Any:
    """Chunk frames of ``payload``: built once per round when small enough, else on the fly."""
    frames = payload_frames(payload)
    if cache is None or int(payload.header.total_bytes) > FRAME_CACHE_BYTES:
        return frames
    key = f"frames/{id(payload)}"
    if key not in cache:
        cache[key] = list(frames)
    return cache[key]
