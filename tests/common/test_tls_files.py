"""TLS files that cannot work are refused at start, with the file and the reason."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from fedpipe.common import certs
from fedpipe.common.config import ClientConfig, ConfigError, ServerConfig
from fedpipe.common.tls_files import check_client_files, check_server_files

PAST = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    certs.make_pki(out, ["127.0.0.1", "localhost"], ["alice", "bob"], days=30)
    ca = certs.load_ca(out)
    write(out / "expired", certs.issue(ca, ["127.0.0.1"], "server", 2, now=PAST))
    write(out / "expired-client", certs.issue(ca, ["alice"], "client", 2, now=PAST))
    return out


def write(base: Path, issued: certs.Issued) -> None:
    base.with_name(base.name + ".crt").write_bytes(
        issued.cert.public_bytes(serialization.Encoding.PEM)
    )
    key = issued.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    base.with_name(base.name + ".key").write_bytes(key)


def server(
    pki: Path, cert: str = "server.crt", key: str = "server.key", **kw: object
) -> ServerConfig:
    return ServerConfig.model_validate(
        {"tls_cert": pki / cert, "tls_key": pki / key, "tls_client_ca": pki / "ca.crt", **kw}
    )


def client(pki: Path, **files: str) -> ClientConfig:
    return ClientConfig.model_validate(
        {"dataset": "digits", **{k: str(pki / v) for k, v in files.items()}}
    )


def test_good_files_pass(pki: Path, caplog: pytest.LogCaptureFixture) -> None:
    check_server_files(server(pki))
    check_client_files(
        client(pki, tls_ca="ca.crt", tls_cert="clients/alice.crt", tls_key="clients/alice.key")
    )
    assert not caplog.records


@pytest.mark.parametrize(
    ("cert", "key", "message"),
    [
        ("server.crt", "clients/alice.key", "tls_key .*alice.key is not the key of tls_cert"),
        ("expired.crt", "expired.key", r"tls_cert .*expired.crt expired on \d{4}-\d\d-\d\d"),
        ("clients/bob.crt", "clients/bob.key", "is not a server certificate .*serverAuth"),
        ("ca.key", "server.key", "not a PEM certificate and its unencrypted PEM key"),
    ],
)
def test_server_files_that_cannot_serve_stop_it_before_the_port_opens(
    pki: Path, cert: str, key: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        check_server_files(server(pki, cert, key))


def test_a_client_ca_that_is_no_ca_is_refused(pki: Path) -> None:
    config = server(pki, tls_client_ca=pki / "clients" / "alice.crt")
    with pytest.raises(ConfigError, match=r"tls_client_ca .*alice.crt is not a CA certificate"):
        check_server_files(config)


def test_a_certificate_not_yet_valid_points_at_the_clock(pki: Path) -> None:
    with pytest.raises(ConfigError, match=r"valid only from .* is this machine's clock right"):
        check_server_files(server(pki), now=PAST)


def test_a_server_certificate_for_other_names_than_host_is_announced(
    pki: Path, caplog: pytest.LogCaptureFixture
) -> None:
    check_server_files(server(pki, host="10.1.2.3", insecure=False))
    assert "is for '127.0.0.1', 'localhost', not for host '10.1.2.3'" in caplog.text
    assert "clients must dial one of those names" in caplog.text
    caplog.clear()
    check_server_files(server(pki, host="0.0.0.0"))  # every address: nothing to judge
    assert not caplog.records


def test_a_certificate_about_to_expire_is_announced(
    pki: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    check_server_files(server(pki), now=dt.datetime.now(dt.UTC) + dt.timedelta(days=25))
    assert "tls_cert" in caplog.text and "expires on" in caplog.text


def test_a_client_with_its_own_certificate_expired_stops_at_start(pki: Path) -> None:
    config = client(
        pki, tls_ca="ca.crt", tls_cert="expired-client.crt", tls_key="expired-client.key"
    )
    with pytest.raises(ConfigError, match=r"tls_cert .*expired-client.crt expired on"):
        check_client_files(config)
    config = client(pki, tls_ca="ca.crt", tls_cert="clients/alice.crt", tls_key="clients/bob.key")
    with pytest.raises(ConfigError, match=r"bob.key is not the key of tls_cert .*alice.crt"):
        check_client_files(config)
    with pytest.raises(ConfigError, match=r"tls_ca .*server.key: no PEM certificate in it"):
        check_client_files(client(pki, tls_ca="server.key"))
