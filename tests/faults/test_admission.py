"""Admission limits against hostile peers: a full server, password guessing, silent sockets and
a flood of hellos. A real server process; the peers speak the protocol (or not) by hand.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import grpc

from fedpipe.common.framing import FrameReceiver, envelope_frames
from fedpipe.common.payload import encode_payload
from fedpipe.common.records import settings_value, weights_from
from fedpipe.common.tokens import hash_token
from fedpipe.grpc_channel import SESSION_METHOD
from fedpipe.proto.fedpipe.v1 import federation_pb2 as pb
from tests.faults.conftest import server_config, spawn_server, wait_for_line
from tests.faults.test_identity import (
    Session,
    hello_frame,
    needs_openssl,
    refusal,
    server_log,
    wait_for_log,
)
from tests.integration.test_adversarial import train_info, train_state
from tests.integration.test_tls import pki  # noqa: F401 (a fixture)


async def started(config: object, procs: list[subprocess.Popen[str]]) -> Path:
    """Spawn the server of ``config``; its log once it listens."""
    procs.append(spawn_server(config))  # type: ignore[arg-type]
    log = server_log(config)
    await asyncio.to_thread(wait_for_log, log, "listening on", 30)
    return log


async def test_max_clients_refuses_a_new_client_but_not_a_reconnecting_one(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    config = server_config(tmp_path, min_clients=2, max_clients=2, wait_timeout=60.0)
    log = await started(config, procs)
    a, b, c, again = (Session(config.port) for _ in range(4))
    try:
        welcome = await a.hello("a")
        await b.hello("b")
        exc = await refusal(c, "c")
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
        assert exc.details() == "the server is full: 2 clients connected (max_clients=2)"
        assert "(claiming to be 'c'): the server is full" in log.read_text()
        # A client reconnecting under its name (its old session still open) gets back in.
        await again.hello("a", secret=welcome.session_secret)
        assert await a.ended(5.0)
    finally:
        for session in (a, b, c, again):
            await session.close()


REFUSED = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL}


async def guess(channel: grpc.aio.Channel, token: str) -> tuple[grpc.StatusCode, str]:
    """One hello as ``alice`` with ``token`` on a new stream: the status it ends with."""
    call = channel.stream_stream(SESSION_METHOD)()
    try:
        await call.write(hello_frame("alice", token=token))
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        pass  # refused before the hello was read (too many streams awaiting admission)
    code = await call.code()
    details = await call.details()
    call.cancel()
    return code, details


async def test_failed_authentications_are_rate_limited_per_address(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    # 5 failures at once, then one every 2 s.
    tokens = {"alice": "tok-alice"}
    config = server_config(
        tmp_path, min_clients=1, tokens=tokens, max_auth_failures=5, auth_failure_window=10.0
    )
    log = await started(config, procs)
    codes: Counter[grpc.StatusCode] = Counter()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{config.port}") as channel:
        start = time.monotonic()
        while time.monotonic() - start < 3.0 and sum(codes.values()) < 100_000:
            code, details = await guess(channel, f"guess-{sum(codes.values())}")
            codes[code] += 1
        elapsed = time.monotonic() - start
        answered = codes[grpc.StatusCode.UNAUTHENTICATED]
        print(f"{answered} guesses answered, {sum(codes.values())} made in {elapsed:.1f}s")
        assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert answered <= 5 + elapsed / 2 + 1, codes
        assert details.startswith("too many failed authentications from 127.0.0.1; try again")
        # While the address cools down nothing is checked, the right token neither...
        assert (await guess(channel, "tok-alice"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Each checked guess is logged with its peer; the unchecked ones once for all.
    text = log.read_text()
    checked = [line for line in text.splitlines() if "DEBUG" not in line]
    assert sum("refused ipv4:127.0.0.1:" in line for line in checked) == answered, text
    assert text.count("127.0.0.1 failed to authenticate too often") >= 1, text
    # ...and once it has, the right token gets in.
    await asyncio.sleep(2.5)
    session = Session(config.port)
    try:
        await session.hello("alice", token="tok-alice")
    finally:
        await session.close()


async def test_concurrent_guesses_at_a_hashed_token_cost_a_bounded_number_of_hashes(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    tokens = {"alice": hash_token("tok-alice")}
    config = server_config(
        tmp_path, min_clients=1, tokens=tokens, max_auth_failures=5, auth_failure_window=60.0
    )
    await started(config, procs)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{config.port}") as channel:
        await channel.channel_ready()
        answers = await asyncio.gather(*(guess(channel, f"guess-{i}") for i in range(40)))
    codes = Counter(code for code, _ in answers)
    # Guesses waiting for a hash check are re-checked against the limit first.
    assert codes[grpc.StatusCode.UNAUTHENTICATED] <= 5 + 2, codes
    # The rest are refused. A refusal racing the hello's write can reach the client as a reset
    # stream (INTERNAL, which no server handler returns; an exception there reads UNKNOWN).
    refused = codes[grpc.StatusCode.RESOURCE_EXHAUSTED] + codes[grpc.StatusCode.INTERNAL]
    assert refused >= 33 and set(codes) <= REFUSED | {grpc.StatusCode.UNAUTHENTICATED}, codes


def closed_within(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the server closes ``sock`` (None: still open after ``timeout``)."""
    start = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - start < timeout:
        try:
            if not sock.recv(1 << 16):
                return time.monotonic() - start
        except TimeoutError:
            continue
        except ConnectionError:
            return time.monotonic() - start
    return None


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS, SETTINGS_ACK = bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]), bytes([0, 0, 0, 4, 1, 0, 0, 0, 0])


async def test_connections_that_never_say_hello_are_closed_within_the_deadline(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    config = server_config(tmp_path, min_clients=1, hello_timeout=1.0)
    await started(config, procs)
    address = ("127.0.0.1", config.port)
    # A TCP connection that sends nothing, and a polite HTTP/2 one that opens no stream.
    with socket.create_connection(address) as raw, socket.create_connection(address) as h2:
        h2.sendall(PREFACE + SETTINGS)
        h2.settimeout(5.0)
        assert h2.recv(9)[3] == 4, "the server's first frame is its SETTINGS"
        h2.sendall(SETTINGS_ACK)
        waits = await asyncio.gather(
            asyncio.to_thread(closed_within, raw, 10.0), asyncio.to_thread(closed_within, h2, 10.0)
        )
    print(f"closed after {waits[0]}s (raw) and {waits[1]}s (HTTP/2)")
    assert all(w is not None and w < 1.0 + 5.0 for w in waits), waits


@needs_openssl
async def test_a_tls_connection_that_never_handshakes_is_closed_within_the_deadline(
    tmp_path: Path,
    pki: Path,  # noqa: F811
    procs: list[subprocess.Popen[str]],
) -> None:
    tls = {"tls_cert": pki / "server.crt", "tls_key": pki / "server.key"}
    config = server_config(tmp_path, min_clients=1, hello_timeout=1.0, **tls)
    await started(config, procs)
    with socket.create_connection(("127.0.0.1", config.port)) as raw:
        wait = await asyncio.to_thread(closed_within, raw, 10.0)
    assert wait is not None and wait < 1.0 + 5.0, wait


async def flood_peer(port: int, name: str, seen: Counter[str], go: asyncio.Event) -> None:
    """Say hello as ``name``; if welcomed, wait for ``go``, then take the setup and the
    weights and reply honestly until the run stops."""
    session = Session(port)
    try:
        try:
            await session.hello(name)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.INTERNAL and "Internal error from Core" in str(
                exc.details()
            ):
                # grpc/grpc#36066: a refusal that ends the stream while the client's hello is
                # still being written reaches an asyncio client as this INTERNAL, not as the
                # server's status. The server refused it all the same.
                code = grpc.StatusCode.RESOURCE_EXHAUSTED
            seen[f"refused: {code.name}"] += 1
            if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                seen[f"why: {exc.details()}"] += 1
            return
        seen["welcomed"] += 1
        await go.wait()  # hold the place until every hello of the flood was answered
        receiver = FrameReceiver(pb.ServerMessage, 1 << 30)
        while (frame := await session.call.read()) is not grpc.aio.EOF:
            got = receiver.feed(frame)
            if got is None or got.message.WhichOneof("kind") != "task":
                continue
            task = got.message.task
            reply = pb.ClientMessage(reply=pb.Reply(task_id=task.task_id))
            payload = None
            if task.kind == pb.TASK_KIND_INITIALIZE:
                seen["setup"] += 1
            elif task.kind == pb.TASK_KIND_TRAIN:
                seen["weights"] += 1
                payload = encode_payload(train_state(weights_from(got.payload)), 1 << 16)
                reply.reply.info.CopyFrom(settings_value(train_info()))
                reply.reply.payload.CopyFrom(payload.header)
            else:
                return
            for out in envelope_frames(reply, payload):
                await session.call.write(out)
    finally:
        await session.close()


async def test_a_flood_of_hellos_gets_setup_and_weights_only_up_to_max_clients(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    n = 100
    config = server_config(
        tmp_path, rounds=2, min_clients=3, max_clients=3, eval_every=0, round_timeout=20.0
    )
    await started(config, procs)
    server = procs[-1]
    seen: Counter[str] = Counter()
    go = asyncio.Event()
    flood = [asyncio.create_task(flood_peer(config.port, f"flood-{i}", seen, go)) for i in range(n)]
    deadline = time.monotonic() + 60
    while sum(v for k, v in seen.items() if k == "welcomed" or k.startswith("refused")) < n:
        assert time.monotonic() < deadline, seen
        assert not any(t.done() and t.exception() for t in flood), seen
        await asyncio.sleep(0.05)
    go.set()
    await asyncio.wait_for(asyncio.gather(*flood), 60)
    print(dict(seen))
    # Round 2 would set up and train whoever joined during round 1: nobody else got in.
    assert seen["welcomed"] == 3 and seen["setup"] == 3 and seen["weights"] == 2 * 3, seen
    assert seen["refused: RESOURCE_EXHAUSTED"] == n - 3, seen
    record = await asyncio.to_thread(wait_for_line, server, lambda r: r.get("round") == 2, 30)
    assert record is not None and record["replied"] == 3, record
