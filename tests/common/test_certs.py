"""``fedpipe certs``: a CA, the server's certificate for its host names, one certificate per
client under its own name, keys that only their owner can read, nothing overwritten."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpipe.cli import main
from fedpipe.common import certs
from fedpipe.common.config import ClientConfig, ServerConfig
from fedpipe.common.outcome import ExitCode


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def sans(cert: x509.Certificate) -> list[Any]:
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


def common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def purposes(cert: x509.Certificate) -> list[Any]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


@pytest.fixture
def wide_umask() -> Any:
    """A umask that would leave new files world-writable: modes must not depend on it."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_a_ca_signs_a_server_certificate_for_its_names_and_one_per_client(
    tmp_path: Path, wide_umask: None
) -> None:
    written = certs.make_pki(
        tmp_path, ["fl.example.org", "10.0.0.5"], ["hospital-a", "lab.example.org"], days=30
    )
    names = sorted(str(w.path.relative_to(tmp_path)) for w in written)
    assert names == sorted(
        ["ca.crt", "ca.key", "server.crt", "server.key"]
        + [f"clients/{n}.{s}" for n in ("hospital-a", "lab.example.org") for s in ("crt", "key")]
    )
    for item in written:  # keys for their owner only, certificates readable by all
        assert mode(item.path) == (0o600 if item.secret else 0o644), item.path
        assert item.secret == item.path.name.endswith(".key")
    ca = load(tmp_path / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = load(tmp_path / "server.crt")
    server.verify_directly_issued_by(ca)
    # Exactly the names given: no localhost or 127.0.0.1 unless asked for.
    assert sans(server) == [
        x509.DNSName("fl.example.org"),
        x509.IPAddress(ipaddress.ip_address("10.0.0.5")),
    ]
    assert purposes(server) == [ExtendedKeyUsageOID.SERVER_AUTH]
    for name in ("hospital-a", "lab.example.org"):
        client = load(tmp_path / "clients" / f"{name}.crt")
        client.verify_directly_issued_by(ca)
        # The server admits a client under its certificate's DNS SAN (or CN): its --name.
        assert sans(client) == [x509.DNSName(name)] and common_name(client) == name
        assert purposes(client) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    other = certs.make_ca("another CA", 10)
    with pytest.raises(ValueError):
        server.verify_directly_issued_by(other.cert)


def test_certificates_last_the_days_asked_and_the_ca_outlives_them(tmp_path: Path) -> None:
    before = dt.datetime.now(dt.UTC)
    certs.make_pki(tmp_path, ["localhost"], ["alice"], days=7)
    after = dt.datetime.now(dt.UTC)
    for path in (tmp_path / "server.crt", tmp_path / "clients" / "alice.crt"):
        cert = load(path)
        assert before + dt.timedelta(days=7) - dt.timedelta(seconds=1) <= cert.not_valid_after_utc
        assert cert.not_valid_after_utc <= after + dt.timedelta(days=7)
        # Valid from a few minutes back: a peer whose clock lags a little still accepts it.
        assert cert.not_valid_before_utc <= before - dt.timedelta(minutes=4)
    ca = load(tmp_path / "ca.crt")
    assert ca.not_valid_after_utc >= before + dt.timedelta(days=certs.CA_DAYS - 1)


def test_existing_files_are_kept_unless_forced(tmp_path: Path) -> None:
    certs.make_pki(tmp_path, ["localhost"], ["alice"])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.*")}
    with pytest.raises(certs.CertificateError, match=r"already exist: not overwritten \(--force"):
        certs.make_pki(tmp_path, ["localhost"], ["alice", "bob"])
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.*")} == before  # not even bob's
    assert not (tmp_path / "clients" / "bob.crt").exists()
    certs.make_pki(tmp_path, ["localhost"], ["alice"], force=True)
    for path, old in before.items():
        assert path.read_bytes() != old
        assert mode(path) == (0o600 if path.suffix == ".key" else 0o644)
    assert not list(tmp_path.rglob(".*.tmp"))


def test_keys_are_created_with_their_mode_not_narrowed_after_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    created: dict[str, int] = {}
    real_open = os.open

    def recording_open(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        created[Path(path).name] = mode
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(os, "open", recording_open)
    certs.make_pki(tmp_path, ["localhost"], ["alice"])
    keys = {name: m for name, m in created.items() if ".key." in name}
    assert len(keys) == 3 and set(keys.values()) == {0o600}, created


def test_a_client_joins_later_under_the_same_ca(tmp_path: Path) -> None:
    certs.make_pki(tmp_path, ["localhost"], ["alice"])
    written = certs.add_clients(tmp_path, ["carol"], days=10)
    assert [w.path for w in written] == [
        tmp_path / "clients" / f"carol.{s}" for s in ("crt", "key")
    ]
    load(tmp_path / "clients" / "carol.crt").verify_directly_issued_by(load(tmp_path / "ca.crt"))
    with pytest.raises(certs.CertificateError, match="already exist"):
        certs.add_clients(tmp_path, ["alice"])
    with pytest.raises(certs.CertificateError, match="would outlive the CA"):
        certs.add_clients(tmp_path, ["dave"], days=certs.CA_DAYS + 1)
    with pytest.raises(certs.CertificateError, match="no CA there; make one first"):
        certs.add_clients(tmp_path / "elsewhere", ["dave"])


@pytest.mark.parametrize(
    ("servers", "clients", "message"),
    [
        (["localhost"], ["bad name"], "client name 'bad name': expected 1 to 64 letters"),
        (["localhost"], ["../x"], "client name '../x'"),
        (["localhost"], ["a" * 65], "expected 1 to 64"),
        (["localhost"], ["alice", "alice"], "given twice"),
        (["localhost"], [], "at least one client name"),
        ([], ["alice"], "--server-name HOST"),
        (["not a host!"], ["alice"], "server name 'not a host!' is neither an IP address"),
        (["-bad.example.org"], ["alice"], "neither an IP address nor a host name"),
    ],
)
def test_names_that_cannot_be_in_a_certificate_are_refused_before_any_file(
    tmp_path: Path, servers: list[str], clients: list[str], message: str
) -> None:
    with pytest.raises(certs.CertificateError, match=message.replace("(", r"\(")):
        certs.make_pki(tmp_path / "out", servers, clients)
    assert not (tmp_path / "out").exists()


def test_the_command_prints_the_files_and_config_lines_that_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pki"
    args = ["certs", "--out", str(out), "--server-name", "127.0.0.1", "--client", "alice"]
    assert main([*args, "--days", "3"]) == ExitCode.OK
    text = capsys.readouterr().out
    assert f"wrote {out / 'ca.key'} (0600): CA key" in text
    assert f"wrote {out / 'clients' / 'alice.crt'} (0644): client 'alice' certificate" in text
    # The printed lines, pasted into configs, give a server and a client that validate.
    blocks = text.split("\nclient 'alice' (copy")
    server_lines = [ln for ln in blocks[0].splitlines() if ln.startswith("  ")]
    client_lines = [ln for ln in blocks[1].splitlines() if ln.startswith("  ")]
    server = ServerConfig.model_validate(tomllib.loads("\n".join(server_lines)))
    assert server.tls_client_ca == (out / "ca.crt").resolve()
    client = ClientConfig.model_validate(
        {**tomllib.loads("\n".join(client_lines)), "dataset": "digits"}
    )
    assert client.name == "alice" and client.tls_cert == (out / "clients/alice.crt").resolve()
    assert main(args) == ExitCode.USAGE
    assert "already exist: not overwritten (--force replaces them)" in capsys.readouterr().err
    assert main(["certs", "--out", str(out), "--add-client", "bob"]) == ExitCode.OK
    assert "client 'bob'" in capsys.readouterr().out
    assert main(["certs", "--out", str(out), "--add-client", "x", "--client", "y"]) == 2
    assert "--add-client uses the CA in --out; give it alone" in capsys.readouterr().err


def test_without_cryptography_the_command_says_how_to_install_it(tmp_path: Path) -> None:
    # A fresh interpreter where importing cryptography fails as if it were not installed.
    code = (
        "import sys; sys.modules['cryptography'] = None; from fedpipe.cli import main; "
        f"sys.exit(main(['certs', '--out', {str(tmp_path)!r}, '--server-name', 'localhost', "
        "'--client', 'a']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == ExitCode.USAGE
    assert done.stderr == (
        "fedpipe certs: needs the 'cryptography' package: pip install 'fedpipe[certs]'\n"
    )
    assert not list(tmp_path.iterdir())
