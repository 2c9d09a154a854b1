"""A minimal HTTP/1.1 server for the status page, on asyncio streams.

Everything it reads is untrusted. Only GET; a request line and each header line of at most
``MAX_LINE`` bytes, a head of at most ``MAX_HEAD`` bytes in ``MAX_HEADERS`` lines, all sent
within ``request_timeout`` (a slow sender gets 408); ``MAX_CONNECTIONS`` at once (then 503);
one request per connection. Every path needs the status token (:mod:`status_auth`): without
it, 401. Routes are a fixed table of pages held in memory, so no path reaches the file system.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from fedpipe.server.status_auth import StatusAuth, TokenRateLimited

__all__ = ["HttpError", "Request", "Response", "StatusHttpServer", "read_request"]

log = logging.getLogger(__name__)

MAX_LINE = 8192
MAX_HEAD = 32768
MAX_HEADERS = 64
MAX_CONNECTIONS = 32
MAX_QUERY_FIELDS = 16
#: Seconds to hand a response to a peer that reads slowly.
WRITE_TIMEOUT = 10.0
#: After the response, what a peer still sends is read and dropped (at most this much, this
#: long) so that closing does not reset the connection before it has read the response.
LINGER_BYTES = 1 << 20
LINGER_SECONDS = 1.0

#: Headers of every response: nothing cached, sniffed, framed or loaded from elsewhere.
SECURITY_HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    #: Lower-case names; a repeated header's values joined.
    headers: dict[str, str]


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)

    def encode(self) -> bytes:
        phrase = HTTPStatus(self.status).phrase
        lines = [
            f"HTTP/1.1 {self.status} {phrase}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Connection: close",
            *(f"{name}: {value}" for name, value in (*SECURITY_HEADERS, *self.headers)),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


class HttpError(Exception):
    """A request refused with ``status``; the message says why (to the peer and the log)."""

    def __init__(self, status: int, message: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, list(headers)

    def response(self) -> Response:
        body = f"{self.status} {HTTPStatus(self.status).phrase}: {self.message}\n"
        return Response(self.status, body.encode(), headers=self.headers)


Route = Callable[[], Response]


async def read_request(reader: asyncio.StreamReader) -> Request:
    """Read and check one request head (its body, if any, is never read).

    Raises
    ------
    HttpError
        400, 405, 414, 431 or 505: what is wrong with it.
    asyncio.IncompleteReadError
        The peer closed the connection first.
    """
    line = await _read_line(reader, 414, "request line")
    parts = line.split(" ")
    if len(parts) != 3:
        raise HttpError(400, "expected a request line 'GET /path HTTP/1.1'")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise HttpError(505, f"HTTP version {version[:16]!r} is not served; use HTTP/1.1")
    if method != "GET":
        raise HttpError(405, f"method {method[:16]!r}: this page is read-only", [("Allow", "GET")])
    # Printable ASCII without spaces only: nothing that could split a header when echoed.
    if not target.startswith("/") or not all(32 < ord(c) < 127 for c in target):
        raise HttpError(400, "expected a path starting with '/' in printable ASCII")
    headers: dict[str, str] = {}
    size = 0
    for _ in range(MAX_HEADERS + 1):
        line = await _read_line(reader, 431, "header line")
        if not line:
            break
        size += len(line)
        if size > MAX_HEAD:
            raise HttpError(431, f"the request head is over {MAX_HEAD} bytes")
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or not name.isprintable():
            raise HttpError(400, "a header line is not 'Name: value'")
        key, value = name.lower(), value.strip()
        if key in headers:
            value = headers[key] + ("; " if key == "cookie" else ", ") + value
        headers[key] = value
    else:
        raise HttpError(431, f"more than {MAX_HEADERS} header lines")
    split = urlsplit(target)
    try:
        query = parse_qs(split.query, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:
        raise HttpError(400, f"more than {MAX_QUERY_FIELDS} query fields") from None
    return Request(method, split.path, query, headers)


async def _read_line(reader: asyncio.StreamReader, status: int, what: str) -> str:
    try:
        raw = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise HttpError(status, f"a {what} is over {MAX_LINE} bytes") from None
    text = raw.rstrip(b"\r\n").decode("latin-1")
    if any(c in text for c in "\r\n\0"):
        raise HttpError(400, f"a {what} holds a control character")
    return text


class StatusHttpServer:
    """Serves ``routes`` (path -> page) to holders of the status token.

    ``on_auth_failure`` is called for each wrong token (the monitor counts them).
    """

    def __init__(
        self,
        routes: Mapping[str, Route],
        auth: StatusAuth,
        *,
        request_timeout: float,
        on_auth_failure: Callable[[], None] = lambda: None,
    ) -> None:
        self.routes = dict(routes)
        self.auth = auth
        self.request_timeout = request_timeout
        self.on_auth_failure = on_auth_failure
        self._connections = 0
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> int:
        """Listen on ``host:port``; returns the port (``port`` 0: a free one)."""
        self._server = await asyncio.start_server(
            self._connection,
            host,
            port,
            limit=MAX_LINE,
            ssl=tls,
            ssl_handshake_timeout=self.request_timeout if tls else None,
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        address = writer.get_extra_info("peername")
        host = str(address[0]) if isinstance(address, tuple) else str(address)
        peer = f"{host}:{address[1]}" if isinstance(address, tuple) else host
        try:
            response: Response | None
            if self._connections >= MAX_CONNECTIONS:
                log.warning("status page: %s refused: %d connections open", peer, MAX_CONNECTIONS)
                response = HttpError(503, "too many connections; try again").response()
            else:
                self._connections += 1
                try:
                    response = await self._answer(reader, host, peer)
                finally:
                    self._connections -= 1
            if response is not None:
                await self._send(reader, writer, response)
        except (ConnectionError, TimeoutError, ssl.SSLError) as exc:
            log.info("status page: %s: connection lost: %s", peer, exc or type(exc).__name__)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError, ssl.SSLError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _answer(self, reader: asyncio.StreamReader, host: str, peer: str) -> Response | None:
        """The response to the connection's request; None if the peer left first."""
        try:
            async with asyncio.timeout(self.request_timeout):
                request = await read_request(reader)
        except TimeoutError:
            log.info("status page: %s sent no full request in %.1fs", peer, self.request_timeout)
            return HttpError(408, f"no full request within {self.request_timeout:g}s").response()
        except HttpError as exc:
            log.info("status page: refused %s: %d %s", peer, exc.status, exc.message)
            return exc.response()
        except asyncio.IncompleteReadError:
            return None
        refused = await self._authorize(request, host, peer)
        if refused is not None:
            return refused
        route = self.routes.get(request.path)
        if route is None:
            return HttpError(404, "no such page").response()
        try:
            return route()
        except Exception:  # a bug in a page must not end the server: logged with its traceback
            log.exception("status page: %s failed", request.path)
            return HttpError(500, "the page failed; see the server's log").response()

    async def _authorize(self, request: Request, host: str, peer: str) -> Response | None:
        """None when the request may be served; else the response it gets instead."""
        if self.auth.has_session(request.headers.get("cookie", "")):
            return None
        scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
        in_query = request.query.get("token", [])
        from_header = scheme.lower() == "bearer" and bool(bearer.strip())
        if from_header:
            presented = bearer.strip()
        elif in_query:
            presented = in_query[-1]
        else:
            return _unauthorized("the status token is required")
        try:
            matches = await self.auth.token_matches(presented, host)
        except TokenRateLimited as exc:
            log.info("status page: refused %s: %s", peer, exc)
            retry = [("Retry-After", str(max(1, round(exc.wait))))]
            return HttpError(429, str(exc), retry).response()
        if not matches:
            log.warning("status page: refused %s: wrong status token", peer)
            self.on_auth_failure()
            return _unauthorized("wrong status token")
        if from_header:
            return None
        # A token in the address: trade it for a session cookie, and drop it from the address.
        cookie = self.auth.open_session()
        back = request.path if request.path in self.routes else "/"  # never another site
        return Response(303, headers=[("Location", back), ("Set-Cookie", cookie)])

    async def _send(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, response: Response
    ) -> None:
        writer.write(response.encode())
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.drain()
        if not writer.can_write_eof():
            return
        writer.write_eof()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LINGER_SECONDS):
                dropped = 0
                while dropped < LINGER_BYTES and (chunk := await reader.read(65536)):
                    dropped += len(chunk)


def _unauthorized(message: str) -> Response:
    hint = (
        f"{message}: open the page once as /?token=<status token> (a session cookie is set), "
        "or send 'Authorization: Bearer <status token>'"
    )
    return HttpError(401, hint, [("WWW-Authenticate", 'Bearer realm="fedpipe status"')]).response()
