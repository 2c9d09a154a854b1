"""Failed connections explained in words: what a TLS handshake failure means and what to do.

gRPC reports every failed handshake as ``UNAVAILABLE`` with OpenSSL's reason in the details
when this side refused the server. When the server refused this client (no certificate, an
expired one, one of another CA) or spoke TLS to a plaintext client, the details only say
"Socket closed"; a probe handshake with the standard library then tells which.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any

import grpc

from fedpipe.common.config import ClientConfig
from fedpipe.common.tls_files import read_certificate

__all__ = ["explain_connection_failure"]

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 5.0
#: What an HTTP/2 client sends first; a gRPC server answers with its SETTINGS frame.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


async def explain_connection_failure(exc: grpc.aio.AioRpcError, config: ClientConfig) -> str | None:
    """One sentence saying why the connection to the server failed and what to do, or None
    when it is not a TLS matter (the server is down, the network is cut...)."""
    details = exc.details() or ""
    if exc.code() != grpc.StatusCode.UNAVAILABLE or "failed to connect" not in details:
        return None
    trusted = f"tls_ca {config.tls_ca}" if config.tls_ca else "the system's CAs (no tls_ca set)"
    if "certificate has expired" in details:
        return (
            "the server's certificate has expired (or this machine's clock is wrong): the "
            "server needs a new one (`fedpipe certs`)"
        )
    if "certificate is not yet valid" in details:
        return "the server's certificate is not valid yet: is this machine's clock right?"
    if "Hostname Verification" in details:
        names = await _probe(config, verify=False)
        found = f"; its certificate is for {names}" if names else ""
        return (
            f"the server's certificate is not for {_host(config.server)!r}, the name this "
            f"client dials{found}: dial a name in the certificate, or make the server's "
            "certificate with `fedpipe certs --server-name HOST`"
        )
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return (
            f"the server's certificate is not signed by a CA this client trusts ({trusted}): "
            "set tls_ca to the ca.crt that signed it"
        )
    if "WRONG_VERSION_NUMBER" in details:
        return (
            "the server speaks plaintext, not TLS: give the server tls_cert and tls_key "
            "(`fedpipe certs` makes them), or, on a trusted network only, unset this client's "
            "tls_ca/tls_cert/tls_key and set insecure = true"
        )
    if "Socket closed" in details or "Connection reset" in details:
        return await _explain_closed(config)
    return None


async def _explain_closed(config: ClientConfig) -> str | None:
    """The server hung up during the connection: see whether it did so at TLS's end."""
    if not config.use_tls:
        if await _probe(config, verify=False) is None:
            return None
        return (
            "the server speaks TLS but this client connects in plaintext: set tls_ca (the CA "
            "of the server's certificate), and tls_cert/tls_key if it asks for client "
            "certificates"
        )
    if await _probe(config, verify=True) != "closed":
        return None
    if config.tls_cert is None:
        return (
            "the server closed the connection after the TLS handshake: it requires a client "
            "certificate (mutual TLS); set tls_cert and tls_key (`fedpipe certs` makes them)"
        )
    return (
        f"the server refused this client's certificate ({config.tls_cert}) after the TLS "
        "handshake: it is expired or not signed by the CA the server trusts "
        "(its tls_client_ca); ask the server's operator for a certificate "
        "(`fedpipe certs --add-client NAME`)"
    )


async def _probe(config: ClientConfig, *, verify: bool) -> str | None:
    """A TLS handshake of our own with the server. With ``verify``: "closed" when the server
    hung up right after it, before its first HTTP/2 frame. Without: the names of the
    server's certificate ("" when unknown) if it speaks TLS at all. None otherwise."""
    try:
        return await asyncio.wait_for(
            asyncio.to_thread(_handshake, config, verify), PROBE_TIMEOUT + 1
        )
    except (OSError, ValueError, TimeoutError) as exc:
        log.debug("TLS probe of %s failed: %s", config.server, exc)
        return None


def _handshake(config: ClientConfig, verify: bool) -> str | None:
    host, _, port = config.server.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_alpn_protocols(["h2"])
    if verify:
        if config.tls_ca is not None:
            context.load_verify_locations(cafile=config.tls_ca)
        else:
            context.load_default_certs()
        if config.tls_cert is not None and config.tls_key is not None:
            context.load_cert_chain(config.tls_cert, config.tls_key)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname=host.strip("[]")) as tls:
            if not verify:
                return _names(tls.getpeercert(binary_form=True))
            # TLS 1.3 checks the client's certificate after the client's side is done: a
            # refusal shows as the connection closing before the server's SETTINGS frame.
            try:
                tls.sendall(HTTP2_PREFACE)
                first = tls.recv(9)
            except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
                return "closed"
            return "closed" if first == b"" else None


def _names(der: Any) -> str:
    info = read_certificate(der) if der else None
    return ", ".join(map(repr, info.names)) if info is not None else ""


def _host(server: str) -> str:
    return server.rpartition(":")[0].strip("[]")
