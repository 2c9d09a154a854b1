"""Who may see the status page: holders of the status token, and the sessions it opened.

The token is presented as ``Authorization: Bearer <token>`` or once as ``?token=<token>``,
which opens a session: a random cookie (never the token itself), kept by this process only.
Tokens compare in constant time; a stored hash (``fedpipe hash-token``) costs one scrypt,
off the event loop. Wrong tokens are rate-limited per peer address, as client hellos are.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict

from fedpipe.common.config import ServerConfig, read_token_file
from fedpipe.common.tokens import is_hashed, verify_token
from fedpipe.server.failure_limiter import FailureLimiter

__all__ = ["StatusAuth", "TokenRateLimited", "load_status_token"]

#: Sessions kept at once; the oldest is forgotten beyond (its browser asks for the token again).
MAX_SESSIONS = 256
#: Seconds a session lasts.
SESSION_SECONDS = 12 * 3600.0


class TokenRateLimited(Exception):
    """This peer presented too many wrong tokens lately; ``wait`` seconds until it may retry."""

    def __init__(self, host: str, wait: float) -> None:
        super().__init__(f"too many wrong tokens from {host}; try again in {wait:.0f}s")
        self.wait = wait


def load_status_token(config: ServerConfig) -> str:
    """The status token (or its hash): ``status_token``, else the first line of
    ``status_token_file``.

    Raises
    ------
    ConfigError
        The file cannot be read or is empty.
    """
    if config.status_token or config.status_token_file is None:
        return config.status_token
    return read_token_file(config.status_token_file, "status_token_file", "the status token")


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


class StatusAuth:
    """Checks status tokens and the session cookies they opened."""

    def __init__(
        self, stored: str, limiter: FailureLimiter, cookie_name: str, *, secure: bool = False
    ) -> None:
        self.stored = stored
        self.limiter = limiter
        self.cookie_name = cookie_name
        self.secure = secure  # HTTPS: the browser never sends the cookie in clear
        self._sessions: OrderedDict[bytes, float] = OrderedDict()  # digest -> expiry
        self._hashing = asyncio.Semaphore(1)

    async def token_matches(self, presented: str, host: str) -> bool:
        """Whether ``presented`` is the status token; a wrong one counts against ``host``.

        Raises
        ------
        TokenRateLimited
            ``host`` failed too often lately: nothing is checked.
        """
        self._check_rate(host)
        if is_hashed(self.stored):
            async with self._hashing:
                self._check_rate(host)
                ok = await asyncio.to_thread(verify_token, presented, self.stored)
        else:
            # Digests of equal length: the comparison says nothing of the token's length.
            ok = hmac.compare_digest(_digest(presented), _digest(self.stored))
        if not ok:
            self.limiter.failed(host)
        return ok

    def _check_rate(self, host: str) -> None:
        wait = self.limiter.blocked_for(host)
        if wait > 0:
            raise TokenRateLimited(host, wait)

    def open_session(self) -> str:
        """A new session; returns its ``Set-Cookie`` value."""
        value = secrets.token_urlsafe(32)
        self._sessions[_digest(value)] = time.monotonic() + SESSION_SECONDS
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        cookie = f"{self.cookie_name}={value}; Path=/; HttpOnly; SameSite=Strict"
        return cookie + "; Secure" if self.secure else cookie

    def has_session(self, cookie_header: str) -> bool:
        """Whether the ``Cookie`` header carries a live session of this server."""
        for part in cookie_header.split(";"):
            name, _, value = part.strip().partition("=")
            if name != self.cookie_name or not value:
                continue
            # A lookup by the value's digest: the attacker controls neither side of a compare.
            expiry = self._sessions.get(_digest(value))
            if expiry is not None and expiry > time.monotonic():
                return True
        return False
