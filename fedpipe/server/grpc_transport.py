"""The server end of the gRPC federation stream: the servicer and the gRPC client proxy."""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.message import DecodeError as ProtobufDecodeError

from fedpipe.common.codec import dtype_to_enum
from fedpipe.common.config import ServerConfig
from fedpipe.common.payload import EncodedPayload, chunk_frame, encode_payload
from fedpipe.common.reply_limits import (
    REPLY_MODEL_COPIES,
    RejectedReply,
    ReplyLimits,
    check_reply_header,
    eval_reply_limits,
    train_reply_limits,
)
from fedpipe.common.training import EvalResult, RunSetup, TrainResult
from fedpipe.common.vector import ArraySpec, Vector
from fedpipe.common.wire import (
    CHUNK_FIELD,
    PROTOCOL_VERSION,
    SESSION_METHOD,
    FrameReceiver,
    ProtocolError,
    Received,
    announced_bytes,
    eval_result_from,
    is_chunk_frame,
    settings_data,
    settings_value,
    task_state,
    train_result_from,
)
from fedpipe.proto.fedpipe.v1 import federation_pb2 as pb
from fedpipe.proto.fedpipe.v1 import tensor_pb2
from fedpipe.server.admission import Credentials, PendingStreams, Refused, peer_host
from fedpipe.server.clients import ClientError, ClientPool, ClientProxy, RoundTask, RunOutcome
from fedpipe.server.monitor import ServerMonitor
from fedpipe.server.receive_budget import ReceiveBudget, TransferFloor

if TYPE_CHECKING:  # the secagg extra
    from fedpipe.common.secagg.messages import (
        AdvertiseKeys,
        ForwardedShares,
        Roster,
        ShareKeys,
        UnmaskRequest,
        UnmaskShares,
    )

__all__ = ["FederationServicer", "GrpcClient"]

T = TypeVar("T")

log = logging.getLogger(__name__)

#: Frames queued per client before the round loop waits for the socket (backpressure).
OUTBOX_FRAMES = 4
#: Seconds a stopped session stays open for a client still busy with its last task.
STOP_GRACE = 5.0
#: Round payloads up to this size keep their chunk frames for every client of the round.
FRAME_CACHE_BYTES = 256 << 20
MAX_NAME_LENGTH = 128
#: Payload limits before a client accepted the run setup (its replies carry no tensors yet).
SETUP_PAYLOAD_BYTES = 1 << 20
SETUP_TENSORS = 64
SETUP_REPLY = ReplyLimits(SETUP_PAYLOAD_BYTES, SETUP_TENSORS)
#: A secure aggregation stage's reply carries its message, no payload.
STAGE_REPLY = ReplyLimits(0, 0)
#: Refusals that mean a credential was checked and did not prove the name.
AUTH_FAILURES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
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
        self._secagg: tuple[int, Roster | None] | None = None

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
        await self._request(
            pb.TASK_KIND_INITIALIZE,
            0,
            setup.to_data(),
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

        self._secagg = (round_number, None)
        reply = await self._stage(pb.TASK_KIND_SECAGG_ADVERTISE, round_number, None, "keys")
        return self._stage_record(lambda: keys_record(reply.keys, self.name))

    async def secagg_share(self, roster: Roster) -> ShareKeys:
        from fedpipe.common.secagg.wire import roster_message, share_keys_record

        round_number = self._secagg_round()
        self._secagg = (round_number, roster)
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
        self._secagg = None  # one reveal per session
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

    def _secagg_round(self) -> int:
        if self._secagg is None:
            raise ClientError(f"client {self.name}: no secure aggregation session")
        return self._secagg[0]

    def _secagg_roster(self) -> Roster:
        if self._secagg is None or self._secagg[1] is None:
            raise ClientError(f"client {self.name}: no secure aggregation roster")
        return self._secagg[1]

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
    frames = (chunk_frame(CHUNK_FIELD, t, o, d) for t, o, d in payload.chunks())
    if cache is None or int(payload.header.total_bytes) > FRAME_CACHE_BYTES:
        return frames
    key = f"frames/{id(payload)}"
    if key not in cache:
        cache[key] = list(frames)
    return cache[key]


class FederationServicer:
    """Admits clients on the ``Session`` stream and pumps frames between them and their
    proxies. A misbehaving client ends its own session with a logged reason; the server and
    the other sessions go on."""

    def __init__(
        self,
        pool: ClientPool,
        config: ServerConfig,
        budget: ReceiveBudget,
        monitor: ServerMonitor | None = None,
    ) -> None:
        self.pool = pool
        self.config = config
        self.budget = budget
        self.monitor = monitor or ServerMonitor(config, pool)
        self.credentials = Credentials(config)
        self.pending = PendingStreams()
        self._entering = asyncio.Lock()
        self._ended: dict[GrpcClient, asyncio.Event] = {}  # set when a session is over

    async def drained(self) -> None:
        """Wait (``STOP_GRACE`` at most) for the sessions still handing a busy client the run's
        outcome; the others are over already."""
        waits = [asyncio.ensure_future(e.wait()) for p, e in self._ended.items() if p.told]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=STOP_GRACE + 1.0)
            for wait in pending:
                wait.cancel()

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.stream_stream_rpc_method_handler(self.session)
        return grpc.method_handlers_generic_handler(
            "fedpipe.v1.Federation", {SESSION_METHOD.rsplit("/", 1)[1]: method}
        )

    async def session(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        peer = context.peer()
        host = peer_host(peer)
        try:
            self.pending.enter(host)
        except Refused as exc:
            log.log(exc.level, "refused %s: %s", peer, exc.reason)
            await context.abort(exc.code, exc.reason)
            return
        try:
            proxy = await self._admission(context, peer)
        finally:
            self.pending.leave(host)  # admitted or not, it awaits admission no more
        if proxy is None:
            return
        ended = self._ended[proxy] = asyncio.Event()
        log.info("client %s joined from %s", proxy.name, peer)
        welcome = pb.Welcome(
            protocol_version=PROTOCOL_VERSION,
            run_id=self.config.run_id,
            session_id=uuid.uuid4().hex,
            session_secret=proxy.secret,
        )
        reader: asyncio.Task[None] | None = None
        try:  # from here on, however the session ends, the client leaves the pool
            await context.write(pb.ServerMessage(welcome=welcome).SerializeToString())
            reader = asyncio.create_task(self._read(context, proxy))
            while True:
                out = await proxy.outbox.get()
                if out is None:
                    break
                # A write waits while the client reads nothing: closing the session ends it.
                writing = asyncio.ensure_future(context.write(out))
                await asyncio.wait({writing, proxy.gone}, return_when=asyncio.FIRST_COMPLETED)
                if not writing.done():
                    writing.cancel()
                    break
                writing.result()
                self.monitor.sent(len(out))
            if proxy.told:
                # A client busy with a task reads its stop task only once it has replied:
                # keep the stream until it closes its side, or the grace passes.
                await asyncio.wait({reader}, timeout=STOP_GRACE)
        finally:
            ended.set()
            del self._ended[proxy]
            if reader is not None:
                reader.cancel()
            proxy.close("session ended")
            await self.pool.remove(proxy)
            log.info("client %s left (%s)", proxy.name, proxy._closed)

    async def _admission(self, context: grpc.aio.ServicerContext, peer: str) -> GrpcClient | None:
        """Read the hello, check it and enter its client in the pool; None when refused."""
        timeout = self.config.hello_timeout
        try:
            frame = await asyncio.wait_for(context.read(), timeout)
        except TimeoutError:
            log.warning("refused %s: no hello within %.1fs", peer, timeout)
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no hello in time")
            return None
        if frame is grpc.aio.EOF:
            return None
        self.monitor.received(len(frame))
        claimed = ""
        try:
            hello = self._admit(frame)
            claimed = f" (claiming to be {hello.client_name!r})"
            auth = context.auth_context()
            await self.credentials.check(hello.client_name, hello.token, peer, auth)
            proxy = GrpcClient(hello.client_name, hello, self.config, self.budget, self.monitor)
            await self._enter(proxy, hello.session_secret)
        except Refused as exc:
            log.log(exc.level, "refused %s%s: %s", peer, claimed, exc.reason)
            if exc.code in AUTH_FAILURES:
                self.monitor.authentication_failed("grpc")
            await context.abort(exc.code, exc.reason)
            return None
        return proxy

    async def _read(self, context: grpc.aio.ServicerContext, proxy: GrpcClient) -> None:
        receiver = FrameReceiver(
            pb.ClientMessage,
            proxy.max_payload_bytes,
            accept=proxy.expects,
            spill=proxy.spills,
            spill_dir=str(self.config.output_dir),  # on disk: /tmp may be RAM
        )
        floor: TransferFloor | None = None  # from a reservation to the end of its payload
        try:
            while True:
                timeout = None if floor is None else floor.time_left()
                frame = await asyncio.wait_for(context.read(), timeout)
                if frame is grpc.aio.EOF:
                    proxy.close("client closed the stream")
                    return
                self.monitor.received(len(frame))
                receiver.max_payload_bytes = proxy.max_payload_bytes
                receiver.max_tensors = proxy.max_tensors
                if not is_chunk_frame(frame):
                    # Headers can take long to decode: off the loop, which serves the others.
                    message = await asyncio.to_thread(receiver.decode, frame)
                    if receiver.busy:  # before any reservation: this peer already holds one
                        raise ProtocolError(
                            "a new message arrived before the previous payload was complete"
                        )
                    try:
                        floor = await self._reserve(proxy, message)
                    except RejectedReply as exc:
                        receiver.skip(message)
                        proxy.refuse(message, str(exc))
                        self.monitor.reply_rejected("limits")
                        continue
                    got = await asyncio.to_thread(receiver.feed, frame, message)
                else:
                    got = receiver.feed(frame)  # one bounded copy into a preallocated array
                    if got is None and floor is not None:
                        self._keep_or_drop(proxy, receiver, floor)
                if got is not None:
                    reserved, floor = floor is not None and floor.reserved, None
                    await proxy.deliver(got, reserved)  # the budget goes with the reply
                    del got  # a model-sized reply: this loop must not keep it until next round
                elif floor is not None:
                    if floor.reserved and not receiver.assembling:  # skipped, not allocated
                        self.budget.release(proxy)
                        floor.reserved = False
                    if not receiver.busy:  # a skipped rest keeps the floor until its end
                        floor = None
        except TimeoutError:  # only a payload holding budget has a deadline
            received, nbytes, elapsed = (0, 0, 0.0) if floor is None else floor.progress()
            log.warning(
                "client %s sent %d of %d bytes in %.1fs, below min_transfer_rate_kib=%g; "
                "closing its session",
                proxy.name,
                received,
                nbytes,
                elapsed,
                self.config.min_transfer_rate_kib,
            )
            proxy.close("payload below the minimum transfer rate")
            self.monitor.reply_rejected("transfer_rate")
        except ProtocolError as exc:
            log.warning("client %s broke the protocol: %s; closing its session", proxy.name, exc)
            self.monitor.reply_rejected("protocol")
            proxy.close(f"protocol error: {exc}")
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            proxy.close(f"stream error: {exc}")
        except Exception as exc:  # MemoryError on a huge header...: end this session only
            log.exception("client %s: session failed", proxy.name)
            proxy.close(f"session failed: {type(exc).__name__}: {exc}")
        finally:
            receiver.abandon()  # a reply cut off: its spilled update goes, never folded
            if floor is not None and floor.reserved:
                self.budget.release(proxy)

    async def _reserve(self, proxy: GrpcClient, message: Any) -> TransferFloor | None:
        """Check an awaited reply's header, then wait for its share of the budget; the floor
        its transfer must keep from then on (None: nothing reserved).

        Raises
        ------
        RejectedReply
            The header is not what the reply's task expects.
        """
        awaited = proxy.awaited_payload(message)
        if awaited is None:
            return None
        limits, due = awaited
        await asyncio.to_thread(check_reply_header, message.reply.payload, limits)
        nbytes = announced_bytes(message)
        if not nbytes:
            return None
        await self.budget.acquire(proxy, nbytes)
        cfg = self.config
        rate = cfg.min_transfer_rate_kib * 1024
        return TransferFloor(nbytes, rate, cfg.transfer_grace, cfg.chunk_bytes, due=due)

    def _keep_or_drop(
        self, proxy: GrpcClient, receiver: FrameReceiver[Any], floor: TransferFloor
    ) -> None:
        """Stop receiving a payload that can no longer count while it holds budget: nobody
        awaits it any more (its round ended), or others wait and at its pace it would arrive
        after its round. Its budget goes back at once; the rest of it is skipped, at the
        floor's pace still."""
        floor.received = receiver.received_bytes
        pending = receiver.pending
        if pending is None or not floor.reserved:
            return
        if proxy.expects(pending):
            if not (self.budget.waiting and floor.behind()):
                return
            pace = floor.received / floor.elapsed / 1024
            reason = (
                f"at {pace:.1f} KiB/s its {floor.nbytes} bytes would arrive after the round "
                "ends, while other replies wait for the receive budget"
            )
        else:
            reason = ""
        remaining = receiver.skip_rest()
        self.budget.release(proxy)
        floor.reserved = False
        if reason:
            proxy.refuse(pending, reason)
            self.monitor.reply_rejected("too_slow")
        else:
            log.info(
                "client %s: reply to task %d is no longer awaited; skipping its last %d bytes",
                proxy.name,
                pending.reply.task_id,
                remaining,
            )

    async def _enter(self, proxy: GrpcClient, secret: str) -> None:
        """Put ``proxy`` in the pool: in place of a live session of its name only if it proves
        it is the same client, in a place of its own only below ``max_clients``."""
        async with self._entering:
            previous = self.pool.get(proxy.name)
            # Without credentials, only the live session's secret proves the name; a session
            # that ended frees it (a client restarted from scratch has no secret).
            if (
                isinstance(previous, GrpcClient)
                and previous._closed is None
                and not self.credentials.required
            ):
                if not (
                    previous.secret
                    and hmac.compare_digest(secret.encode(), previous.secret.encode())
                ):
                    raise Refused(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"client name {proxy.name!r} is taken by a live session; a client "
                        "reconnecting under its name presents its last session secret",
                    )
            if previous is None and len(self.pool) >= self.config.max_clients:
                raise Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the server is full: {len(self.pool)} clients connected "
                    f"(max_clients={self.config.max_clients})",
                )
            proxy.secret = secrets.token_urlsafe(32)
            await self.pool.add(proxy)
        if isinstance(previous, GrpcClient):
            previous.close("replaced by a new session of the same client")

    def _admit(self, frame: bytes) -> Any:
        message = pb.ClientMessage()
        try:
            message.ParseFromString(frame)
        except ProtobufDecodeError as exc:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"undecodable hello: {exc}") from None
        if message.WhichOneof("kind") != "hello":
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a hello")
        hello = message.hello
        if hello.protocol_version != PROTOCOL_VERSION:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {hello.protocol_version} is not supported; "
                f"this server speaks version {PROTOCOL_VERSION}",
            )
        name = hello.client_name
        if not name or len(name) > MAX_NAME_LENGTH or not name.isprintable():
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"client name {name[:MAX_NAME_LENGTH]!r} must be 1-{MAX_NAME_LENGTH} "
                "printable characters",
            )
        return hello
