"""The status page's HTTP server against hostile and broken requests, on loopback.

Each request is a raw byte string on its own connection, as a browser, a scanner or an
attacker would send it; each answer is checked for its status code, its headers and how fast
it came. The real server process with a federation running is tested in
tests/faults/test_status_page.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from fedpipe.common.tokens import hash_token
from fedpipe.server import status_http
from fedpipe.server.failure_limiter import FailureLimiter
from fedpipe.server.status_auth import StatusAuth
from fedpipe.server.status_http import MAX_CONNECTIONS, Response, StatusHttpServer

TOKEN = "tok-123-secret"
TIMEOUT = 1.0  # the request timeout of these servers
PAGE = b"<!doctype html><title>status</title>"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float


@dataclass
class Served:
    port: int
    server: StatusHttpServer
    failures: list[int]


async def start(stored: str = TOKEN, max_failures: int = 10) -> Served:
    failures: list[int] = []
    auth = StatusAuth(stored, FailureLimiter(max_failures, 60.0), "fedpipe_status_test")
    routes = {"/": lambda: Response(200, PAGE, "text/html"), "/api/status": lambda: Response(200)}
    server = StatusHttpServer(
        routes, auth, request_timeout=TIMEOUT, on_auth_failure=lambda: failures.append(1)
    )
    port = await server.start("127.0.0.1", 0)
    return Served(port, server, failures)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    served = await start()
    yield served
    await served.server.close()


async def send(port: int, raw: bytes, *, pace: float = 0.0, wait: float = 10.0) -> Answer:
    """Send ``raw`` (a byte every ``pace`` seconds if set) and read the whole answer."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def write() -> None:
        for start in range(0, len(raw), 1 if pace else len(raw) or 1):
            writer.write(raw[start : start + 1] if pace else raw)
            await writer.drain()
            await asyncio.sleep(pace)

    sending = asyncio.ensure_future(write())
    try:
        data = await asyncio.wait_for(reader.read(), wait)
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)  # a reset once answered: fine
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return Answer(int(lines[0].split()[1]), headers, body, time.monotonic() - started)


def get(path: str = "/", *headers: str) -> bytes:
    return "\r\n".join([f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""]).encode()


BEARER = f"Authorization: Bearer {TOKEN}"


async def test_without_the_token_every_path_is_401(served: Served) -> None:
    for path in ("/", "/api/status", "/nope", "/?token="):
        answer = await send(served.port, get(path))
        assert answer.status == 401, path
        assert answer.headers["WWW-Authenticate"] == 'Bearer realm="fedpipe status"'
        assert b"?token=" in answer.body and PAGE not in answer.body
    assert served.failures == []  # asking without a token is no guess


async def test_the_bearer_token_opens_the_page_and_a_wrong_one_is_counted(served: Served) -> None:
    ok = await send(served.port, get("/", BEARER))
    assert (ok.status, ok.body) == (200, PAGE)
    assert ok.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert ok.headers["Cache-Control"] == "no-store"
    wrong = await send(served.port, get("/", f"Authorization: Bearer {TOKEN}x"))
    assert wrong.status == 401 and b"wrong status token" in wrong.body
    assert served.failures == [1]


async def test_a_token_in_the_address_becomes_a_session_cookie(served: Served) -> None:
    answer = await send(served.port, get(f"/api/status?token={TOKEN}"))
    assert answer.status == 303
    assert answer.headers["Location"] == "/api/status"  # the token leaves the address bar
    cookie = answer.headers["Set-Cookie"]
    assert TOKEN not in cookie
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    session = cookie.split(";")[0]
    assert (await send(served.port, get("/", f"Cookie: other=1; {session}"))).status == 200
    forged = session.split("=")[0] + "=" + "A" * 43
    assert (await send(served.port, get("/", f"Cookie: {forged}"))).status == 401
    assert (await send(served.port, get(f"/?token={TOKEN[:-1]}"))).status == 401
    assert served.failures == [1]
    elsewhere = await send(served.port, get(f"//evil.example/x?token={TOKEN}"))
    assert (elsewhere.status, elsewhere.headers["Location"]) == (303, "/")


async def test_a_hashed_token_is_checked_as_well() -> None:
    served = await start(hash_token(TOKEN))
    try:
        assert (await send(served.port, get("/", BEARER))).status == 200
        assert (await send(served.port, get("/", "Authorization: Bearer nope"))).status == 401
    finally:
        await served.server.close()


async def test_guessing_peers_are_slowed_down() -> None:
    served = await start(max_failures=3)
    try:
        for _ in range(3):
            assert (await send(served.port, get("/", "Authorization: Bearer guess"))).status == 401
        blocked = await send(served.port, get("/", BEARER))  # even the right token, for now
        assert blocked.status == 429
        assert int(blocked.headers["Retry-After"]) >= 1
    finally:
        await served.server.close()


@pytest.mark.parametrize(
    "raw, status",
    [
        (b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi", 405),
        (b"HEAD / HTTP/1.1\r\n\r\n", 405),
        (b"DELETE /api/status HTTP/1.1\r\n\r\n", 405),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET http://elsewhere/ HTTP/1.1\r\n\r\n", 400),
        (b"GET /\x01 HTTP/1.1\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # a TLS hello
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX-A: a\x00b\r\n\r\n", 400),
        (b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 100 + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + b"X-Long: " + b"b" * 4000 + b"\r\n" * 1 + b"\r\n", 401),
        (b"GET / HTTP/1.1\r\n" + (b"X-Long: " + b"b" * 4000 + b"\r\n") * 9 + b"\r\n", 431),
        (b"GET /?" + b"&".join(b"a=%d" % i for i in range(50)) + b" HTTP/1.1\r\n\r\n", 400),
    ],
    ids=[
        "post",
        "head",
        "delete",
        "http2",
        "absolute-url",
        "control-in-path",
        "tls-hello",
        "header-without-colon",
        "nul-in-header",
        "huge-request-line",
        "huge-header",
        "too-many-headers",
        "one-long-header-is-fine",
        "head-too-large",
        "too-many-query-fields",
    ],
)
async def test_malformed_requests_get_their_status_at_once(
    served: Served, raw: bytes, status: int
) -> None:
    answer = await send(served.port, raw)
    assert answer.status == status, answer.body
    assert answer.seconds < TIMEOUT  # answered, not timed out
    if status == 405:
        assert answer.headers["Allow"] == "GET"
    assert PAGE not in answer.body


@pytest.mark.parametrize(
    "path",
    [
        "/../../../../etc/passwd",
        "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/..%2f..%2f..%2fpyproject.toml",
        "/static/../status_http.py",
        "//etc/passwd",
        "/status.html",
        "/api/status/../../etc/passwd",
    ],
)
async def test_no_path_reaches_the_file_system(served: Served, path: str) -> None:
    answer = await send(served.port, get(path, BEARER))
    assert answer.status == 404
    assert b"root:" not in answer.body and b"import" not in answer.body


async def test_a_slow_loris_gets_408_and_others_are_served_meanwhile(served: Served) -> None:
    loris = asyncio.ensure_future(send(served.port, get("/", BEARER), pace=0.1))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    ok = await send(served.port, get("/", BEARER))
    assert ok.status == 200 and time.monotonic() - started < TIMEOUT
    slow = await loris
    assert slow.status == 408
    assert TIMEOUT <= slow.seconds < TIMEOUT + 2.0


async def test_a_peer_that_opens_and_says_nothing_is_closed_in_time(served: Served) -> None:
    answer = await send(served.port, b"")
    assert answer.status == 408 and answer.seconds < TIMEOUT + 2.0


async def test_connections_beyond_the_limit_get_503_and_the_server_recovers(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(status_http, "MAX_CONNECTIONS", 4)
    assert MAX_CONNECTIONS >= 4
    idle = [await asyncio.open_connection("127.0.0.1", served.port) for _ in range(4)]
    await asyncio.sleep(0.2)
    try:
        assert (await send(served.port, get("/", BEARER))).status == 503
    finally:
        for _, writer in idle:
            writer.close()
    await asyncio.sleep(0.2)
    assert (await send(served.port, get("/", BEARER))).status == 200


async def test_a_peer_that_hangs_up_mid_request_does_not_end_the_server(served: Served) -> None:
    for partial in (b"GE", b"GET / HTTP/1.1\r\nHost: x", b"GET / HTTP/1.1\r\n"):
        _, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(partial)
        await writer.drain()
        writer.close()
    await asyncio.sleep(0.1)
    assert (await send(served.port, get("/", BEARER))).status == 200
