"""The gRPC ``Session`` stream: admits clients and pumps frames between them and their proxies."""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import uuid
from typing import Any

import grpc
from google.protobuf.message import DecodeError as ProtobufDecodeError

from fedpipe.common.client_name import BadClientName, check_client_name
from fedpipe.common.config import ServerConfig
from fedpipe.common.framing import FrameReceiver, announced_bytes, is_chunk_frame
from fedpipe.common.protocol import PROTOCOL_VERSION, ProtocolError
from fedpipe.common.reply_limits import (
    RejectedReply,
    check_reply_header,
)
from fedpipe.grpc_channel import SERVICE_NAME, SESSION_METHOD
from fedpipe.proto.fedpipe.v1 import federation_pb2 as pb
from fedpipe.server.clients import ClientPool
from fedpipe.server.monitor import ServerMonitor
from fedpipe.server.transports.grpc.admission import Credentials, PendingStreams, Refused, peer_host
from fedpipe.server.transports.grpc.proxy import GrpcClient
from fedpipe.server.transports.grpc.receive_budget import ReceiveBudget, TransferFloor

__all__ = ["FederationServicer"]

log = logging.getLogger(__name__)

#: Seconds a stopped session stays open for a client still busy with its last task.
STOP_GRACE = 5.0
#: Refusals that mean a credential was checked and did not prove the name.
AUTH_FAILURES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


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
            SERVICE_NAME, {SESSION_METHOD.rsplit("/", 1)[1]: method}
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
                del out, writing  # nor the last frame sent (a chunk of a large model's)
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
                # Not held through the next read: a session would keep its last chunk (up to
                # chunk_mib) from one round to the next.
                del frame
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
        try:
            check_client_name(hello.client_name)
        except BadClientName as exc:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        return hello
