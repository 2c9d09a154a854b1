"""A client's name is bound to what it can prove: its certificate, its token, or the secret of
the session it is reconnecting to. Real server and client processes on loopback.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from fedpipe.common.outcome import ExitCode
from fedpipe.common.protocol import PROTOCOL_VERSION
from fedpipe.common.tokens import hash_token, verify_token
from fedpipe.grpc_channel import SESSION_METHOD
from fedpipe.proto.fedpipe.v1 import federation_pb2 as pb
from tests.faults.conftest import finish, server_config, spawn_server, wait_for_line
from tests.integration.test_tls import openssl, pki  # noqa: F401 (pki: a fixture)

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


# ---- helpers shared with test_admission ------------------------------------------------------


def hello_frame(name: str, *, token: str = "", secret: str = "") -> bytes:
    hello = pb.Hello(
        protocol_version=PROTOCOL_VERSION,
        client_name=name,
        token=token,
        session_secret=secret,
        data=pb.DataSummary(n_train_samples=100),
    )
    return pb.ClientMessage(hello=hello).SerializeToString()


class Session:
    """One raw ``Session`` stream on a channel of its own: says hello, reads the answer."""

    def __init__(self, port: int) -> None:
        # A subchannel of its own: a separate connection, as a separate process would have.
        options = [("grpc.use_local_subchannel_pool", 1)]
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
        self.call: Any = self.channel.stream_stream(SESSION_METHOD)()
        self.reading: asyncio.Future[Any] | None = None

    async def hello(self, name: str, *, token: str = "", secret: str = "") -> pb.Welcome:
        """The Welcome; raises ``grpc.aio.AioRpcError`` when refused."""
        await self.call.write(hello_frame(name, token=token, secret=secret))
        frame = await self.call.read()
        if frame is grpc.aio.EOF:
            await self.call.wait_for_connection()  # raises the refusal's status
            raise AssertionError("stream ended without a status")
        message = pb.ServerMessage.FromString(frame)
        assert message.WhichOneof("kind") == "welcome", message
        return message.welcome

    async def ended(self, timeout: float) -> bool:
        """True if the server ends this stream within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            # A read cancelled by a timeout would cancel the whole call: keep it pending.
            if self.reading is None:
                self.reading = asyncio.ensure_future(self.call.read())
            done, _ = await asyncio.wait({self.reading}, timeout=deadline - time.monotonic())
            if not done:
                return False
            reading, self.reading = self.reading, None
            try:
                if reading.result() is grpc.aio.EOF:
                    return True
            except grpc.aio.AioRpcError:
                return True

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


async def refusal(session: Session, name: str, **kwargs: str) -> grpc.aio.AioRpcError:
    """The error a refused hello gets (fails the test if the hello is welcomed)."""
    try:
        await session.hello(name, **kwargs)
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError(f"the hello as {name!r} was welcomed")


def wait_for_log(path: Path, text: str, timeout: float, count: int = 1) -> str:
    """The log's text once ``text`` occurs ``count`` times in it (AssertionError on timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text() if path.exists() else ""
        if content.count(text) >= count:
            return content
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not {count} time(s) in {path} within {timeout}s")


def start_client(
    tmp_path: Path,
    name: str,
    port: int,
    data: Path,
    *args: str,
    env: dict[str, str] | None = None,
    config: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    """A real ``fedpipe client`` process configured by a TOML file (retries kept short)."""
    lines = [
        f'server = "127.0.0.1:{port}"',
        f'name = "{name}"',
        f'data = "{data}"',
        "retry_initial = 0.2",
        "retry_max = 0.5",
        "retry_timeout = 5.0",
    ]
    lines += [f'{key} = "{value}"' for key, value in (config or {}).items()]
    path = tmp_path / f"{name}-{len(list(tmp_path.glob(f'{name}-*.toml')))}.toml"
    path.write_text("\n".join(lines) + "\n")
    return subprocess.Popen(
        [sys.executable, "-m", "fedpipe", "-v", "client", "--config", str(path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
    )


def wait_for_output(proc: subprocess.Popen[str], text: str, timeout: float) -> None:
    """Read ``proc``'s output until a line holds ``text`` (AssertionError at EOF or timeout;
    the lines read are gone from what :func:`finish` returns)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if text in line:
            return
    raise AssertionError(f"{text!r} not in the output of {proc.args} within {timeout}s")


def server_log(config: Any) -> Path:
    return Path(config.output_dir).parent / "server.log"


# ---- mutual TLS -------------------------------------------------------------------------------


def client_cert(pki: Path, name: str, san: str | None) -> dict[str, str]:  # noqa: F811
    """A client certificate for CN=``name`` (with ``san``, e.g. ``DNS:x``) signed by the CA."""
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(
        "req",
        *key,
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={name}",
        cwd=pki,
    )
    ext = ["-extfile", f"{name}.ext"] if san else []
    if san:
        (pki / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", *ext, cwd=pki,
    )  # fmt: skip
    return {
        "tls_ca": str(pki / "ca.crt"),
        "tls_cert": str(pki / f"{name}.crt"),
        "tls_key": str(pki / f"{name}.key"),
    }


@needs_openssl
def test_a_certificate_admits_only_its_own_name(
    tmp_path: Path,
    pki: Path,  # noqa: F811
    client_data: list[Path],
    procs: list[subprocess.Popen[str]],
) -> None:
    alice = client_cert(pki, "alice", "DNS:alice,DNS:alice.example.org")
    carol = client_cert(pki, "carol", None)  # no SAN: its common name is its name
    config = server_config(
        tmp_path,
        rounds=1,
        min_clients=2,
        eval_every=0,
        tls_cert=pki / "server.crt",
        tls_key=pki / "server.key",
        tls_client_ca=pki / "ca.crt",
    )
    server = spawn_server(config)
    procs.append(server)
    # Alice's certificate claiming Bob's name: refused for good, with the reason.
    impostor = start_client(tmp_path, "bob", config.port, client_data[0], config=alice)
    procs.append(impostor)
    code, out = finish(impostor, timeout=60)
    assert code == ExitCode.REFUSED, out
    assert "the client certificate is for 'alice' or 'alice.example.org', not 'bob'" in out
    log = wait_for_log(server_log(config), "claiming to be 'bob'", 10)
    assert "refused ipv4:127.0.0.1:" in log and "a certificate admits only its own name" in log
    # Each certificate under its own name (a DNS SAN; a CN without SAN) trains.
    good = [
        start_client(tmp_path, "alice.example.org", config.port, client_data[1], config=alice),
        start_client(tmp_path, "carol", config.port, client_data[2], config=carol),
    ]
    procs += good
    record = wait_for_line(server, lambda r: r.get("round") == 1, 90)
    assert record is not None and record["clients"] == ["alice.example.org", "carol"]
    for proc in good:
        code, out = finish(proc, timeout=60)
        assert code == 0, out


# ---- no credentials: the session secret -------------------------------------------------------


async def test_without_credentials_a_live_session_is_replaced_only_by_its_owner(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    config = server_config(tmp_path, min_clients=3, wait_timeout=60.0)
    procs.append(spawn_server(config))
    log = server_log(config)
    await asyncio.to_thread(wait_for_log, log, "listening on", 30)
    first = Session(config.port)
    welcome = await first.hello("alice")
    assert len(welcome.session_secret) >= 32
    try:
        # Someone else under the same name, without or with a wrong secret: refused.
        for secret in ("", "not-the-secret", welcome.session_secret[:-1], "s\u00e9cret"):
            other = Session(config.port)
            exc = await refusal(other, "alice", secret=secret)
            await other.close()
            assert exc.code() == grpc.StatusCode.ALREADY_EXISTS, exc
            assert "'alice' is taken by a live session" in str(exc.details())
        assert not await first.ended(1.0), "an impostor's hello evicted the live session"
        assert "(claiming to be 'alice'): client name 'alice' is taken" in log.read_text()
        # The owner, reconnecting with its secret, replaces its old session.
        second = Session(config.port)
        renewed = await second.hello("alice", secret=welcome.session_secret)
        assert renewed.session_secret not in ("", welcome.session_secret)
        assert await first.ended(5.0), "the replaced session was left open"
        # Once that session has ended (the client died), the name is free for anyone.
        await second.close()
        third = Session(config.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                await third.hello("alice")
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.ALREADY_EXISTS, exc
                assert time.monotonic() < deadline, "a dead session kept its name"
                await third.close()
                await asyncio.sleep(0.2)
                third = Session(config.port)
        await third.close()
    finally:
        await first.close()


class CuttableProxy:
    """A TCP relay to the server. :meth:`cut` resets the client side of every relayed
    connection and leaves the server side open and silent: a network cut the server cannot
    see until its keepalive gives up (30 s)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.relays: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter, list[Any]]] = []
        self.half_open: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        pumps = [
            asyncio.create_task(_pump(reader, up_writer)),
            asyncio.create_task(_pump(up_reader, writer)),
        ]
        self.relays.append((writer, up_writer, pumps))

    def cut(self) -> None:
        for writer, up_writer, pumps in self.relays:
            for pump in pumps:
                pump.cancel()
            writer.transport.abort()
            self.half_open.append(up_writer)
        self.relays.clear()

    async def close(self) -> None:
        self.cut()
        for writer in self.half_open:
            writer.transport.abort()
        self.server.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    writer.transport.abort()


async def test_a_client_reconnecting_after_a_network_cut_replaces_its_half_open_session(
    tmp_path: Path, client_data: list[Path], procs: list[subprocess.Popen[str]]
) -> None:
    config = server_config(tmp_path, rounds=1, min_clients=2, eval_every=0)
    server = spawn_server(config)
    procs.append(server)
    log = server_log(config)
    await asyncio.to_thread(wait_for_log, log, "listening on", 30)
    proxy = CuttableProxy(config.port)
    port = await proxy.start()
    try:
        alice = start_client(tmp_path, "alice", port, client_data[0])
        procs.append(alice)
        await asyncio.to_thread(wait_for_log, log, "client alice joined", 60)
        # The cut comes once her welcome (its session secret) reached her: a cut before it
        # leaves her no secret, and the server must then wait out her old session.
        await asyncio.to_thread(wait_for_output, alice, "joined run", 30)
        proxy.cut()
        # Alice reconnects at once; the server still holds her old session (it cannot know
        # the network is cut for 30 s): her session secret proves the new one is hers.
        await asyncio.to_thread(wait_for_log, log, "client alice joined", 15, 2)
        text = await asyncio.to_thread(
            wait_for_log, log, "alice left (replaced by a new session of the same client)", 5
        )
        assert "refused" not in text, text
        impostor = Session(config.port)
        exc = await refusal(impostor, "alice")
        await impostor.close()
        assert exc.code() == grpc.StatusCode.ALREADY_EXISTS, exc
        bob = start_client(tmp_path, "bob", config.port, client_data[1])
        procs.append(bob)
        record = await asyncio.to_thread(wait_for_line, server, lambda r: r.get("round") == 1, 90)
        assert record is not None and record["clients"] == ["alice", "bob"]
        for proc in (alice, bob):
            code, out = await asyncio.to_thread(finish, proc, 60)
            assert code == 0, out
    finally:
        await proxy.close()


# ---- tokens ----------------------------------------------------------------------------------


def test_hash_token_prints_a_salted_hash_of_the_token_it_reads_on_stdin() -> None:
    def hash_of(text: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "fedpipe", "hash-token"]
        return subprocess.run(command, input=text, capture_output=True, text=True, timeout=60)

    first, second, empty = hash_of("tok-alice\n"), hash_of("tok-alice\n"), hash_of("")
    assert first.returncode == 0, first.stderr
    stored, again = first.stdout.strip(), second.stdout.strip()
    assert stored.startswith("scrypt$n=16384,r=8,p=1$") and "tok-alice" not in stored
    assert stored != again, "the same token hashed twice must differ (a random salt)"
    assert verify_token("tok-alice", stored) and verify_token("tok-alice", again)
    assert not verify_token("tok-alicE", stored) and not verify_token("", stored)
    assert empty.returncode == 2 and "no token given" in empty.stderr


def test_hashed_and_plain_tokens_read_from_a_file_or_the_environment_admit_only_their_client(
    tmp_path: Path, client_data: list[Path], procs: list[subprocess.Popen[str]]
) -> None:
    tokens = {"alice": hash_token("tok-alice"), "bob": "tok-bob"}
    config = server_config(tmp_path, rounds=1, min_clients=2, eval_every=0, tokens=tokens)
    server = spawn_server(config)
    procs.append(server)
    alice_file, bob_file = tmp_path / "alice.token", tmp_path / "bob.token"
    alice_file.write_text("tok-alice\n")
    bob_file.write_text("tok-bob\n")
    # Another client's token, from the environment or a file: refused for good.
    wrong = [
        start_client(
            tmp_path, "alice", config.port, client_data[0], env={"FEDPIPE_TOKEN": "tok-bob"}
        ),
        start_client(tmp_path, "bob", config.port, client_data[1], "--token-file", str(alice_file)),
    ]
    procs += wrong
    for proc in wrong:
        code, out = finish(proc, timeout=60)
        assert code == ExitCode.REFUSED and "invalid or missing client token" in out, out
    # Each its own: Alice's (hashed on the server) from her config's token_file, Bob's
    # (plain on the server) from $FEDPIPE_TOKEN. Neither appears on the command line.
    alice = start_client(
        tmp_path, "alice", config.port, client_data[0], config={"token_file": str(alice_file)}
    )
    bob = start_client(
        tmp_path, "bob", config.port, client_data[1], env={"FEDPIPE_TOKEN": "tok-bob"}
    )
    procs += [alice, bob]
    for proc in (alice, bob):
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert b"tok-" not in cmdline, cmdline
    record = wait_for_line(server, lambda r: r.get("round") == 1, 90)
    assert record is not None and record["clients"] == ["alice", "bob"]
    for proc in (alice, bob):
        code, out = finish(proc, timeout=60)
        assert code == 0, out
