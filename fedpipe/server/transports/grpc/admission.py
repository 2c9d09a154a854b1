"""Who may open a gRPC session: credentials bound to the client's name, failed authentications
rate-limited per peer address, and the gRPC server options that bound connections and streams.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import urllib.parse
from typing import Any

import grpc

from fedpipe.common.config import ServerConfig
from fedpipe.common.tokens import dummy_hash, is_hashed, verify_token
from fedpipe.server.failure_limiter import MAX_TRACKED_PEERS, FailureLimiter

__all__ = [
    "Credentials",
    "PendingStreams",
    "Refused",
    "peer_host",
    "server_options",
]

log = logging.getLogger(__name__)

#: Streams one connection may hold open. A client process needs one session (plus a health
#: check); a process speaking for many clients multiplexes their sessions on one connection.
STREAMS_PER_CONNECTION = 100
#: Streams not admitted yet (no hello, or its credentials in checking) one peer address may
#: hold, and all addresses together; more are refused at once, so that silent streams cannot
#: take the RPC slots of the clients. Admitted sessions do not count.
PENDING_PER_PEER = 4
PENDING_TOTAL = 64
#: RPCs beyond the sessions and the pending streams: health checks, and streams being refused.
EXTRA_RPCS = 64
#: Seconds between two warnings about one address's refused streams (the rest go to debug).
PENDING_WARN_INTERVAL = 60.0
#: scrypt checks run at once: a flood of hellos must not take every core.
CONCURRENT_HASH_CHECKS = 2


class Refused(Exception):
    """A hello the server refuses: the status code and the reason the client is told."""

    def __init__(self, code: grpc.StatusCode, reason: str, *, level: int = logging.WARNING) -> None:
        super().__init__(reason)
        self.code, self.reason, self.level = code, reason, level


def server_options(config: ServerConfig) -> tuple[list[tuple[str, Any]], int]:
    """gRPC server options that close silent connections and bound streams, and the most
    RPCs served at once (``grpc.aio.server(maximum_concurrent_rpcs=...)``).

    A connection must finish its TLS handshake within ``hello_timeout``; one with no stream
    open for that long (a raw socket that sends nothing included) is closed. No option
    bounds a connection's age: a session lasts the whole run, its transfers included.
    """
    deadline_ms = max(1, int(config.hello_timeout * 1000))
    options: list[tuple[str, Any]] = [
        ("grpc.server_handshake_timeout_ms", deadline_ms),
        ("grpc.max_connection_idle_ms", deadline_ms),
        ("grpc.max_concurrent_streams", STREAMS_PER_CONNECTION),
        # gRPC sets SO_REUSEPORT by default: a second server on the same port would then
        # share it (and this run's clients) instead of failing to start.
        ("grpc.so_reuseport", 0),
        # Receive windows stay fixed at stream_window_kib (as grpc-java and grpc-go keep
        # theirs fixed, at 1 MiB) instead of growing with the measured bandwidth-delay product (to
        # megabytes per stream on loopback): a reply waiting for the receive budget waits in
        # its sender, not in this process's memory.
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", config.stream_window_kib << 10),
    ]
    # Room for every session twice (a reconnecting client's old session may not have ended)
    # and every pending stream: the pending caps bite first, never gRPC's global limit.
    return options, 2 * config.max_clients + PENDING_TOTAL + EXTRA_RPCS


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``, which
    gRPC writes percent-encoded: ``ipv6:%5B::1%5D:5``)."""
    kind, _, rest = peer.partition(":")
    rest = urllib.parse.unquote(rest)
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


class PendingStreams:
    """Counts the streams awaiting admission per peer address and in all."""

    def __init__(
        self, per_peer: int = PENDING_PER_PEER, total: int = PENDING_TOTAL, *, clock: Any = None
    ) -> None:
        self.per_peer, self.total = per_peer, total
        self.clock = clock or time.monotonic
        self._count: dict[str, int] = {}
        self._warned: dict[str, float] = {}

    def __len__(self) -> int:
        return sum(self._count.values())

    def enter(self, host: str) -> None:
        """Count a new stream from ``host``; :class:`Refused` when a cap is reached."""
        held = self._count.get(host, 0)
        if held >= self.per_peer or len(self) >= self.total:
            raise Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many connections awaiting admission from {host}"
                if held >= self.per_peer
                else f"too many connections awaiting admission ({len(self)})",
                level=self._level(host),
            )
        self._count[host] = held + 1

    def leave(self, host: str) -> None:
        """The stream from ``host`` was admitted, refused or ended."""
        held = self._count.pop(host, 0) - 1
        if held > 0:
            self._count[host] = held

    def _level(self, host: str) -> int:
        # A flood must not fill the log: one warning per address and interval.
        now = self.clock()
        if now - self._warned.get(host, -math.inf) < PENDING_WARN_INTERVAL:
            return logging.DEBUG
        self._warned[host] = now
        while len(self._warned) > MAX_TRACKED_PEERS:
            self._warned.pop(next(iter(self._warned)))
        return logging.WARNING


class Credentials:
    """Checks that a hello's credentials prove its name: the client certificate's names
    under mutual TLS, the name's token when tokens are configured."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.limiter = FailureLimiter(config.max_auth_failures, config.auth_failure_window)
        self._hashing = asyncio.Semaphore(CONCURRENT_HASH_CHECKS)
        hashed = [t for t in config.tokens.values() if is_hashed(t)]
        # Checked for names with no hashed token, so that every hello costs one scrypt:
        # the response time must not tell which names exist.
        self._dummy = dummy_hash(hashed[0]) if hashed else None

    @property
    def required(self) -> bool:
        """Whether a credential proves each name (else a session secret must)."""
        return bool(self.config.tokens) or self.config.tls_client_ca is not None

    async def check(self, name: str, token: str, peer: str, auth: dict[str, list[bytes]]) -> None:
        """Raise :class:`Refused` unless the credentials admit ``name``.

        ``auth`` is the call's ``context.auth_context()``.
        """
        if not self.required:
            return
        host = peer_host(peer)
        self._check_rate(host)
        if self.config.tls_client_ca is not None:
            names = certificate_names(auth)
            if name not in names:
                self.limiter.failed(host)
                raise Refused(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"the client certificate is for {' or '.join(map(repr, names)) or 'no name'}"
                    f", not {name!r}: a certificate admits only its own name",
                )
        if self.config.tokens and not await self._token_matches(name, token, host):
            self.limiter.failed(host)
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "invalid or missing client token")

    def _check_rate(self, host: str) -> None:
        wait = self.limiter.blocked_for(host)
        if wait > 0:
            raise Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many failed authentications from {host}; try again in {wait:.0f}s",
                level=logging.DEBUG,  # a guessing peer must not fill the log: said once above
            )

    async def _token_matches(self, name: str, token: str, host: str) -> bool:
        stored = self.config.tokens.get(name, "")
        if self._dummy is None:  # plain tokens only: digests compared, as fast for any name
            return verify_token(token, stored)
        async with self._hashing:
            self._check_rate(host)  # failures may have piled up while this hello waited
            return await asyncio.to_thread(self._verify_hashed, token, stored)

    def _verify_hashed(self, token: str, stored: str) -> bool:
        """One scrypt whatever ``stored`` and ``token`` are: against the name's hash, else
        the dummy's (a name with no token, or a plain one); an empty token is checked too."""
        assert self._dummy is not None
        hashed = is_hashed(stored)
        matched = verify_token(token or "-", stored if hashed else self._dummy)
        return bool(token) and matched if hashed else verify_token(token, stored)


def certificate_names(auth: dict[str, list[bytes]]) -> list[str]:
    """The names a client certificate proves: its DNS subject alternative names, else its
    common name (RFC 6125: a certificate with DNS SANs is not identified by its CN)."""
    values = auth.get("peer_dns") or auth.get("x509_common_name") or []
    return [v.decode("utf-8", "replace") for v in values]
