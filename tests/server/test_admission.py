"""The admission policy's parts: the failure limiter, peer addresses, certificate names."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fedpipe.common import tokens
from fedpipe.common.config import ServerConfig
from fedpipe.server import failure_limiter
from fedpipe.server.failure_limiter import FailureLimiter
from fedpipe.server.transports.grpc import admission
from fedpipe.server.transports.grpc.admission import certificate_names, peer_host, server_options


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_address_fails_a_burst_then_once_per_window_share() -> None:
    clock = Clock()
    limiter = FailureLimiter(3, 6.0, clock=clock)  # one failure regained every 2 s
    for _ in range(3):
        assert limiter.blocked_for("10.0.0.1") == 0.0
        limiter.failed("10.0.0.1")
    assert limiter.blocked_for("10.0.0.1") == pytest.approx(2.0)
    assert limiter.blocked_for("10.0.0.2") == 0.0  # other addresses are not affected
    clock.now += 1.5
    assert limiter.blocked_for("10.0.0.1") == pytest.approx(0.5)
    clock.now += 0.5
    assert limiter.blocked_for("10.0.0.1") == 0.0
    limiter.failed("10.0.0.1")
    assert limiter.blocked_for("10.0.0.1") == pytest.approx(2.0)
    clock.now += 60
    assert limiter.blocked_for("10.0.0.1") == 0.0  # refilled up to the burst, no further
    for _ in range(3):
        limiter.failed("10.0.0.1")
    assert limiter.blocked_for("10.0.0.1") > 0


def test_the_limiter_forgets_the_oldest_addresses_beyond_its_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(failure_limiter, "MAX_TRACKED_PEERS", 2)
    limiter = FailureLimiter(1, 60.0, clock=Clock())
    for host in ("a", "b", "c"):
        limiter.failed(host)
    assert limiter.blocked_for("a") == 0.0 and limiter.blocked_for("c") > 0


def test_peer_host() -> None:
    assert peer_host("ipv4:127.0.0.1:5000") == "127.0.0.1"
    assert peer_host("ipv6:[::1]:5000") == "::1"
    assert peer_host("ipv6:%5B::1%5D:5000") == "::1"  # as gRPC writes it
    assert peer_host("unix:/tmp/sock") == "unix:/tmp/sock"


def test_certificate_names_are_the_dns_sans_else_the_common_name() -> None:
    both = {"peer_dns": [b"a", b"a.example.org"], "x509_common_name": [b"cn"]}
    assert certificate_names(both) == ["a", "a.example.org"]
    assert certificate_names({"x509_common_name": [b"cn"]}) == ["cn"]
    assert certificate_names({}) == []


def test_server_options_follow_the_config() -> None:
    options, max_rpcs = server_options(ServerConfig(hello_timeout=2.5, max_clients=7))
    assert dict(options)["grpc.max_connection_idle_ms"] == 2500
    assert dict(options)["grpc.server_handshake_timeout_ms"] == 2500
    assert "grpc.max_connection_age_ms" not in dict(options)  # a session lasts the whole run
    assert max_rpcs == 2 * 7 + admission.PENDING_TOTAL + admission.EXTRA_RPCS
    assert ("grpc.so_reuseport", 0) in options
    # a fixed receive window per stream, not one grown by bandwidth probing
    assert ("grpc.http2.bdp_probe", 0) in options
    assert dict(options)["grpc.http2.lookahead_bytes"] == 512 << 10
    wide, _ = server_options(ServerConfig(stream_window_kib=8192))
    assert dict(wide)["grpc.http2.lookahead_bytes"] == 8 << 20


async def _echo_chunks(config: ServerConfig, count: int) -> list[bytes]:
    """``count`` chunk-sized messages through a server with ``config``'s options, each echoed
    back with its first 16 bytes appended (replies larger than a chunk, too)."""
    import grpc

    from fedpipe.grpc_channel import channel_options

    options, _ = server_options(config)
    server = grpc.aio.server(options=channel_options(config.chunk_bytes) + options)

    async def echo(requests: Any, context: Any) -> Any:
        async for message in requests:
            yield message + message[:16]

    method = grpc.stream_stream_rpc_method_handler(echo)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {"E": method}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        target, client_options = f"127.0.0.1:{port}", channel_options(config.chunk_bytes)
        async with grpc.aio.insecure_channel(target, options=client_options) as channel:
            sent = [bytes([i]) * config.chunk_bytes for i in range(count)]
            call = channel.stream_stream("/t.T/E")(iter(sent), timeout=30)
            return [reply async for reply in call]
    finally:
        await server.stop(0)


def test_messages_larger_than_the_stream_window_flow_both_ways() -> None:
    """A chunk of 4 MiB (chunk_mib's default) crosses a 64 KiB receive window: HTTP/2 flow
    control moves it in window-sized steps, it is not stuck nor refused."""
    config = ServerConfig(stream_window_kib=64, chunk_mib=4)
    assert config.chunk_bytes == 64 * (config.stream_window_kib << 10)  # 64 windows a chunk
    replies = asyncio.run(asyncio.wait_for(_echo_chunks(config, 3), 60))
    assert replies == [bytes([i]) * config.chunk_bytes + bytes([i]) * 16 for i in range(3)]


@pytest.mark.parametrize("token", ["guess", ""])
def test_every_name_costs_one_scrypt_so_timing_reveals_no_name(
    monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    config = ServerConfig.model_validate(
        {"tokens": {"alice": tokens.hash_token("s3cret"), "bob": "plain"}, "max_auth_failures": 99}
    )
    credentials = admission.Credentials(config)
    calls: list[str] = []
    real = tokens._scrypt

    def counting(presented: str, *args: Any) -> bytes:
        calls.append(presented)
        return real(presented, *args)

    monkeypatch.setattr(tokens, "_scrypt", counting)
    for name in ("alice", "mallory", "bob"):  # hashed, unknown, plain among hashed ones
        calls.clear()
        with pytest.raises(admission.Refused, match="invalid or missing client token"):
            asyncio.run(credentials.check(name, token, "ipv4:10.0.0.9:1", {}))
        assert len(calls) == 1, name
    asyncio.run(credentials.check("alice", "s3cret", "ipv4:10.0.0.9:1", {}))
    asyncio.run(credentials.check("bob", "plain", "ipv4:10.0.0.9:1", {}))


def test_plain_tokens_compare_as_digests_of_one_length(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[int, int]] = []
    real = tokens.hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(tokens.hmac, "compare_digest", recording)
    assert tokens.verify_token("a-rather-long-token", "a-rather-long-token")
    assert not tokens.verify_token("x", "a-rather-long-token")
    assert not tokens.verify_token("x", "")  # a name with no token
    assert not tokens.verify_token("", "")
    assert compared == [(32, 32)] * 4


def test_pending_streams_are_capped_per_address_and_in_all() -> None:
    clock = Clock()
    pending = admission.PendingStreams(per_peer=2, total=3, clock=clock)
    levels = []
    pending.enter("10.0.0.1")
    pending.enter("10.0.0.1")
    for _ in range(2):
        with pytest.raises(admission.Refused, match=r"awaiting admission from 10\.0\.0\.1") as err:
            pending.enter("10.0.0.1")
        assert err.value.code == admission.grpc.StatusCode.RESOURCE_EXHAUSTED
        levels.append(err.value.level)
    assert levels == [admission.logging.WARNING, admission.logging.DEBUG]  # said once
    pending.enter("10.0.0.2")
    with pytest.raises(admission.Refused, match=r"awaiting admission \(3\)"):
        pending.enter("10.0.0.3")  # the total cap, though this address holds none
    pending.leave("10.0.0.1")  # admitted: it counts no more
    pending.enter("10.0.0.3")
    for host in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        pending.leave(host)
    assert len(pending) == 0
    pending.enter("10.0.0.1")
