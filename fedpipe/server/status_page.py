"""The live status page (``status_port``): connected clients, the round and its phase, and a
curve per metric, refreshed every second from ``/api/status``.

The page is three files of this package (``static/``: HTML, script, style) served from memory.
It loads nothing from anywhere else (its Content-Security-Policy forbids it) and draws its
curves as inline SVG. It is served over HTTPS with the server's certificate when the server
has one.
"""

from __future__ import annotations

import json
import logging
import ssl
from functools import partial
from pathlib import Path

from fedpipe.common.config import ServerConfig
from fedpipe.common.outcome import RunError
from fedpipe.server.failure_limiter import FailureLimiter
from fedpipe.server.monitor import ServerMonitor
from fedpipe.server.status_auth import StatusAuth, load_status_token
from fedpipe.server.status_http import Response, Route, StatusHttpServer

__all__ = ["StatusPage", "status_routes"]

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")

#: Path -> (file in ``static/``, its content type).
ASSETS = {
    "/": ("status.html", "text/html; charset=utf-8"),
    "/status.js": ("status.js", "text/javascript; charset=utf-8"),
    "/status.css": ("status.css", "text/css; charset=utf-8"),
}


def status_routes(monitor: ServerMonitor) -> dict[str, Route]:
    """The page's files and its JSON endpoint."""
    routes: dict[str, Route] = {
        path: partial(Response, 200, (STATIC / name).read_bytes(), kind)
        for path, (name, kind) in ASSETS.items()
    }

    def status() -> Response:
        body = json.dumps(monitor.snapshot(), allow_nan=False).encode()
        return Response(200, body, "application/json")

    routes["/api/status"] = status
    return routes


class StatusPage:
    """The status page's server, listening until :meth:`close`."""

    def __init__(self, server: StatusHttpServer, url: str) -> None:
        self.server = server
        self.url = url

    @classmethod
    async def start(cls, config: ServerConfig, monitor: ServerMonitor) -> StatusPage:
        """Serve the page on ``config.status_host:config.status_port``.

        Raises
        ------
        ConfigError
            The token file cannot be read.
        RunError
            The port cannot be opened, or the TLS files do not load.
        """
        assert config.status_port is not None
        host = config.status_host
        try:
            tls = _tls_context(config)
        except OSError as exc:  # ssl.SSLError included
            raise RunError(f"cannot serve the status page over HTTPS: {exc}") from None
        limiter = FailureLimiter(config.max_auth_failures, config.auth_failure_window)
        auth = StatusAuth(load_status_token(config), limiter, "", secure=tls is not None)
        server = StatusHttpServer(
            status_routes(monitor),
            auth,
            request_timeout=config.hello_timeout,
            on_auth_failure=partial(monitor.authentication_failed, "status"),
        )
        try:
            port = await server.start(host, config.status_port, tls)
        except OSError as exc:
            raise RunError(
                f"cannot serve the status page on {host}:{config.status_port}: {exc}"
            ) from None
        # Browsers share cookies between the ports of a host: one name per server.
        auth.cookie_name = f"fedpipe_status_{port}"
        url = f"{'https' if tls else 'http'}://{_url_host(host)}:{port}/"
        log.info("status page on %s (open it once as %s?token=<status token>)", url, url)
        return cls(server, url)

    async def close(self) -> None:
        await self.server.close()


def _tls_context(config: ServerConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
