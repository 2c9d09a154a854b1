"""Checks of the TLS files a server or client is given, before any connection: a key that is
not the certificate's, a certificate out of its validity period, a CA file with no CA in it.

The network library itself would only say "Failed to bind to address" (server) or fail every
handshake (client). The key check uses the standard library; dates, names and purposes need
the optional ``cryptography`` package and are skipped without it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from fedpipe.common.config import ClientConfig, ConfigError, ServerConfig, is_loopback

__all__ = ["CertificateInfo", "check_client_files", "check_server_files", "read_certificate"]

log = logging.getLogger(__name__)

#: A certificate this close to its end is announced at start.
EXPIRY_WARNING = dt.timedelta(days=14)


@dataclass(frozen=True)
class CertificateInfo:
    """What a certificate says about itself."""

    names: list[str]  #: subject alternative names (DNS names and IP addresses)
    not_before: dt.datetime
    not_after: dt.datetime
    is_ca: bool
    #: "server"/"client" as its extended key usage allows; None: any purpose.
    purposes: frozenset[str] | None


def check_server_files(config: ServerConfig, *, now: dt.datetime | None = None) -> None:
    """Raise :class:`ConfigError` if the server's TLS files cannot serve: unreadable, a key
    that is not the certificate's, a certificate out of date or not for servers, a client CA
    out of date. Warn when the certificate does not name ``host``."""
    if config.tls_cert is None or config.tls_key is None:
        return
    _check_pair(config.tls_cert, config.tls_key, "tls_cert", "tls_key")
    info = _checked_dates(config.tls_cert, "tls_cert", now)
    if info is not None:
        if info.purposes is not None and "server" not in info.purposes:
            raise ConfigError(
                f"tls_cert {config.tls_cert} is not a server certificate (its extended key "
                "usage lacks serverAuth): clients will refuse it; make one with `fedpipe certs`"
            )
        if not _names_match(info.names, config.host):
            log.warning(
                "tls_cert %s is for %s, not for host %r: clients must dial one of those names",
                config.tls_cert,
                ", ".join(map(repr, info.names)) or "no name",
                config.host,
            )
    if config.tls_client_ca is not None:
        _check_ca(config.tls_client_ca, "tls_client_ca", now)


def check_client_files(config: ClientConfig, *, now: dt.datetime | None = None) -> None:
    """Raise :class:`ConfigError` if the client's TLS files cannot work: unreadable, a key
    that is not the certificate's, a certificate out of date, a CA file without a CA."""
    if config.tls_cert is not None and config.tls_key is not None:
        _check_pair(config.tls_cert, config.tls_key, "tls_cert", "tls_key")
        _checked_dates(config.tls_cert, "tls_cert", now)
    if config.tls_ca is not None:
        _check_ca(config.tls_ca, "tls_ca", now)


def read_certificate(data: bytes) -> CertificateInfo | None:
    """The first certificate of ``data`` (PEM, or DER); None without ``cryptography``."""
    try:
        from cryptography import x509
    except ModuleNotFoundError:
        return None
    if b"-----BEGIN" in data:
        cert = x509.load_pem_x509_certificate(data)
    else:
        cert = x509.load_der_x509_certificate(data)
    extensions = {ext.oid: ext.value for ext in cert.extensions}
    san = extensions.get(x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    names = [str(n.value) for n in san] if isinstance(san, x509.SubjectAlternativeName) else []
    basic = extensions.get(x509.oid.ExtensionOID.BASIC_CONSTRAINTS)
    usage = extensions.get(x509.oid.ExtensionOID.EXTENDED_KEY_USAGE)
    purposes = None
    if isinstance(usage, x509.ExtendedKeyUsage):
        known = {
            x509.oid.ExtendedKeyUsageOID.SERVER_AUTH: "server",
            x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH: "client",
        }
        purposes = frozenset(known[oid] for oid in usage if oid in known)
    return CertificateInfo(
        names=names,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        is_ca=isinstance(basic, x509.BasicConstraints) and basic.ca,
        purposes=purposes,
    )


def _check_pair(cert: Path, key: Path, cert_field: str, key_field: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise ConfigError(
                f"{key_field} {key} is not the key of {cert_field} {cert}: give the .key "
                "file written together with that certificate"
            ) from None
        raise ConfigError(
            f"{cert_field} {cert} / {key_field} {key}: not a PEM certificate and its "
            f"unencrypted PEM key ({exc.reason or exc})"
        ) from None


def _check_ca(path: Path, field: str, now: dt.datetime | None) -> None:
    try:
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:
        raise ConfigError(f"{field} {path}: no PEM certificate in it ({exc.reason})") from None
    info = _checked_dates(path, field, now)
    if info is not None and not info.is_ca:
        raise ConfigError(
            f"{field} {path} is not a CA certificate: give the ca.crt that signed the peer's "
            "certificate (`fedpipe certs` writes it)"
        )


def _checked_dates(path: Path, field: str, now: dt.datetime | None) -> CertificateInfo | None:
    info = read_certificate(path.read_bytes())
    if info is None:
        log.debug("%s %s: dates not checked ('cryptography' is not installed)", field, path)
        return None
    now = now or dt.datetime.now(dt.UTC)
    if now > info.not_after:
        raise ConfigError(
            f"{field} {path} expired on {info.not_after:%Y-%m-%d %H:%M} UTC: make a new one "
            "(`fedpipe certs`)"
        )
    if now < info.not_before:
        raise ConfigError(
            f"{field} {path} is valid only from {info.not_before:%Y-%m-%d %H:%M} UTC: "
            "is this machine's clock right?"
        )
    if info.not_after - now < EXPIRY_WARNING:
        log.warning("%s %s expires on %s UTC", field, path, f"{info.not_after:%Y-%m-%d %H:%M}")
    return info


def _names_match(names: list[str], host: str) -> bool:
    """Whether a client dialing ``host`` would accept a certificate for ``names``; a wildcard
    address (``0.0.0.0``) cannot be judged and counts as a match."""
    host = host.strip("[]").lower()
    try:
        if ipaddress.ip_address(host).is_unspecified:
            return True
    except ValueError:
        pass
    aliases = {host, "localhost", "127.0.0.1", "::1"} if is_loopback(host) else {host}
    for name in (n.lower() for n in names):
        if name in aliases:
            return True
        if name.startswith("*.") and host.endswith(name[1:]) and host.count(".") == name.count("."):
            return True
    return False
