"""A private certificate authority for one federation: its CA, the server's certificate and
one certificate per client, each client's name in its certificate (the name the server admits
it under).

Needs the optional ``cryptography`` package (``pip install 'fedpipe[certs]'``). Keys are ECDSA
P-256 (what every TLS stack speaks), unencrypted PEM, created with mode 0600; certificates
are PEM, mode 0644. Files are never overwritten unless asked.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_DAYS",
    "CertificateError",
    "Issued",
    "Written",
    "add_clients",
    "issue",
    "make_ca",
    "make_pki",
    "usage_text",
]

#: The CA outlives the certificates it signs: clients may join for years (``--add-client``).
CA_DAYS = 3650
#: Validity starts a little in the past: a peer whose clock is slightly behind still accepts.
CLOCK_SKEW = dt.timedelta(minutes=5)
#: RFC 5280's upper bound of a common name.
MAX_NAME = 64
_CLIENT_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")

Role = Literal["server", "client"]
PrivateKey = ec.EllipticCurvePrivateKey


class CertificateError(ValueError):
    """A certificate cannot be made as asked; the message says which name or file and why."""


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: PrivateKey


@dataclass(frozen=True)
class Written:
    """A file written: its path, what it is, and whether it is a secret (a private key)."""

    path: Path
    what: str
    secret: bool


def make_ca(common_name: str, days: int, *, now: dt.datetime | None = None) -> Issued:
    """A self-signed CA certificate that may sign end-entity certificates only."""
    now = now or dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    usage = _key_usage(cert_sign=True)
    cert = (
        _builder(name, name, key.public_key(), now, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def issue(
    ca: Issued, names: Sequence[str], role: Role, days: int, *, now: dt.datetime | None = None
) -> Issued:
    """A certificate for ``names`` (subject alternative names; the first is also the common
    name) signed by ``ca``: for TLS servers or TLS clients, as ``role`` says.

    Raises
    ------
    CertificateError
        A name is not a valid host name (client: letters, digits, ``.``, ``_``, ``-``) or IP
        address, or the certificate would outlive the CA.
    """
    now = now or dt.datetime.now(dt.UTC)
    if not names:
        raise CertificateError(f"a {role} certificate needs at least one name")
    sans = [_server_name(n) if role == "server" else _client_name(n) for n in names]
    ends = now + dt.timedelta(days=days)
    if ends > ca.cert.not_valid_after_utc:
        raise CertificateError(
            f"{days} days would outlive the CA (valid until "
            f"{ca.cert.not_valid_after_utc:%Y-%m-%d}): ask for fewer days or make a new CA"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    # Names are checked by their SANs; the CN only labels the certificate for people.
    common = names[0] if len(names[0]) <= MAX_NAME else f"fedpipe {role}"
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])
    purpose = (
        ExtendedKeyUsageOID.SERVER_AUTH if role == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    )
    ca_key_id = x509.SubjectKeyIdentifier.from_public_key(ca.key.public_key())
    cert = (
        _builder(subject, ca.cert.subject, key.public_key(), now, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_id),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(cert, key)


def make_pki(
    out: Path,
    server_names: Sequence[str],
    clients: Sequence[str],
    *,
    days: int = 365,
    force: bool = False,
    ca_name: str = "fedpipe CA",
) -> list[Written]:
    """Write a new CA (``ca.crt``, ``ca.key``), the server's certificate (``server.crt``,
    ``server.key``) and one per client (``clients/NAME.crt``, ``clients/NAME.key``) in ``out``.

    Every name is checked and every target looked at before anything is written.
    """
    _check_days(days)
    if not server_names:
        raise CertificateError("give the server's host names (--server-name HOST)")
    ca = make_ca(ca_name, max(CA_DAYS, days))
    files: list[tuple[Path, Issued, str]] = [
        (out / "ca", ca, "CA"),
        (out / "server", issue(ca, server_names, "server", days), "server"),
    ]
    files += _client_files(out, ca, clients, days)
    return _write_all(files, force)


def add_clients(
    out: Path, clients: Sequence[str], *, days: int = 365, force: bool = False
) -> list[Written]:
    """Certificates for more clients, signed by the CA already in ``out`` (``ca.crt``,
    ``ca.key`` from :func:`make_pki`), written to ``out/clients/``."""
    _check_days(days)
    ca = load_ca(out)
    return _write_all(_client_files(out, ca, clients, days), force)


def load_ca(out: Path) -> Issued:
    """The CA certificate and key of ``out``."""
    try:
        cert = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
        key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise CertificateError(
            f"{exc.filename}: no CA there; make one first with "
            "`fedpipe certs --out DIR --server-name HOST --client NAME`"
        ) from None
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"{out}/ca.crt or ca.key is not a readable PEM ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise CertificateError(f"{out}/ca.key is not the key of {out}/ca.crt")
    return Issued(cert, key)


def _client_files(
    out: Path, ca: Issued, clients: Sequence[str], days: int
) -> list[tuple[Path, Issued, str]]:
    if not clients:
        raise CertificateError("give at least one client name (--client NAME)")
    if len(set(clients)) != len(clients):
        raise CertificateError(f"a client name is given twice: {list(clients)}")
    return [(out / "clients" / n, issue(ca, [n], "client", days), f"client {n!r}") for n in clients]


def _write_all(files: Iterable[tuple[Path, Issued, str]], force: bool) -> list[Written]:
    files = list(files)
    # Not with_suffix: a client name may hold dots (``bob.example.org``).
    targets = [Path(f"{base}{s}") for base, _, _ in files for s in (".crt", ".key")]
    existing = [str(p) for p in targets if p.exists() or p.is_symlink()]
    if existing and not force:
        raise CertificateError(
            f"{', '.join(existing)} already exist: not overwritten (--force replaces them)"
        )
    written = []
    for base, issued, what in files:
        base.parent.mkdir(parents=True, exist_ok=True)
        cert = issued.cert.public_bytes(serialization.Encoding.PEM)
        key = issued.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_file(Path(f"{base}.crt"), cert, 0o644)
        write_file(Path(f"{base}.key"), key, 0o600)
        written.append(Written(Path(f"{base}.crt"), f"{what} certificate", secret=False))
        written.append(Written(Path(f"{base}.key"), f"{what} key", secret=True))
    return written


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` created with ``mode`` (never wider, whatever the umask); an existing
    file is replaced atomically by a new one, so a key is never readable by others, even
    for a moment."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it: before any byte is written
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    now: dt.datetime,
    days: int,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _server_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    labels = name.removeprefix("*.").split(".")
    if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise CertificateError(
            f"server name {name!r} is neither an IP address nor a host name (labels of "
            "letters, digits and '-', separated by '.'; '*.' may start a wildcard)"
        )
    return x509.DNSName(name)


def _client_name(name: str) -> x509.GeneralName:
    if len(name) > MAX_NAME or not _CLIENT_NAME.fullmatch(name):
        raise CertificateError(
            f"client name {name!r}: expected 1 to {MAX_NAME} letters, digits, '.', '_' or "
            "'-', starting and ending with a letter or digit (it is the client's --name)"
        )
    return x509.DNSName(name)


def _check_days(days: int) -> None:
    if days < 1:
        raise CertificateError(f"days={days}; expected at least 1")


def usage_text(out: Path, server: bool, clients: Sequence[str]) -> str:
    """What to paste in the server's and each client's config to use the files of ``out``."""
    out = out.resolve()
    lines = []
    if server:
        lines += [
            "server config (mutual TLS: only clients with a certificate of this CA get in):",
            f'  tls_cert = "{out / "server.crt"}"',
            f'  tls_key = "{out / "server.key"}"',
            f'  tls_client_ca = "{out / "ca.crt"}"',
        ]
    for name in clients:
        lines += [
            f"client {name!r} (copy ca.crt and clients/{name}.crt/.key to its machine):",
            f'  name = "{name}"',
            f'  tls_ca = "{out / "ca.crt"}"',
            f'  tls_cert = "{out / "clients" / f"{name}.crt"}"',
            f'  tls_key = "{out / "clients" / f"{name}.key"}"',
        ]
    lines.append(
        f"keep {out / 'ca.key'} private (offline if you can): it is only needed to add "
        "clients (fedpipe certs --out DIR --add-client NAME)"
    )
    return "\n".join(lines)
