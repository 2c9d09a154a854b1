"""Mutual TLS with certificates made by ``fedpipe certs``, and every way TLS can fail told in
words: real ``fedpipe server`` and ``fedpipe client`` processes on loopback.

A TLS failure is retried like an unreachable server (the fix is often on the server's side: a
renewed certificate, a corrected CA file), with the explanation logged at each attempt; the
client gives up after ``retry_timeout`` (exit 1). A client whose own certificate cannot work
(expired, not its key) stops at start (exit 2).
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from fedpipe.common import certs
from fedpipe.common.outcome import ExitCode
from fedpipe.server.simulation import free_port
from tests.faults.conftest import (
    finish,
    server_config,
    spawn_client,
    spawn_server,
    wait_for_line,
)

#: Short retries: each failing client gives up within seconds.
RETRIES = ("--set", "retry_initial=0.3", "--set", "retry_max=1.0", "--set", "retry_timeout=6.0")
PAST = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)


def fedpipe_certs(*args: str) -> str:
    """Run ``fedpipe certs`` as a user would; its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "fedpipe", "certs", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def write_pair(base: Path, issued: certs.Issued) -> None:
    """``base.crt`` and ``base.key``, for certificates ``fedpipe certs`` would not make."""
    base.with_name(base.name + ".crt").write_bytes(
        issued.cert.public_bytes(serialization.Encoding.PEM)
    )
    key = serialization.PrivateFormat.PKCS8
    base.with_name(base.name + ".key").write_bytes(
        issued.key.private_bytes(serialization.Encoding.PEM, key, serialization.NoEncryption())
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ours/``: the federation's CA, a server certificate for 127.0.0.1 and localhost,
    alice and bob; ``other/``: another CA with its own alice; ``odd/``: certificates of our
    CA that are expired or for another host name."""
    root = tmp_path_factory.mktemp("pki")
    out = fedpipe_certs(
        "--out", str(root / "ours"), "--server-name", "127.0.0.1", "--server-name", "localhost",
        "--client", "alice", "--client", "bob", "--days", "2",
    )  # fmt: skip
    assert 'tls_client_ca = "' in out
    fedpipe_certs(
        "--out", str(root / "other"), "--server-name", "127.0.0.1", "--client", "alice"
    )  # fmt: skip
    ca = certs.load_ca(root / "ours")
    (root / "odd").mkdir()
    write_pair(
        root / "odd" / "expired-server", certs.issue(ca, ["127.0.0.1"], "server", 2, now=PAST)
    )
    write_pair(root / "odd" / "expired-alice", certs.issue(ca, ["alice"], "client", 2, now=PAST))
    write_pair(root / "odd" / "elsewhere", certs.issue(ca, ["fl.example.org"], "server", 2))
    return root


def wait_for_text(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in {path} within {timeout}s")


def tls(pki: Path, ca: str = "ours/ca.crt", who: str | None = "ours/clients/alice") -> list[str]:
    args = ["--tls-ca", str(pki / ca)]
    if who is not None:
        args += ["--tls-cert", str(pki / f"{who}.crt"), "--tls-key", str(pki / f"{who}.key")]
    return args


def mutual_tls(pki: Path, cert: str = "ours/server") -> dict[str, Path]:
    return {
        "tls_cert": pki / f"{cert}.crt",
        "tls_key": pki / f"{cert}.key",
        "tls_client_ca": pki / "ours" / "ca.crt",
    }


@pytest.fixture
def expired_server(pki: Path) -> Iterator[int]:
    """A gRPC server presenting an expired certificate (a fedpipe server refuses to start with
    one, but one started before its certificate expired goes on presenting it)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pair = (
        (pki / "odd/expired-server.key").read_bytes(),
        (pki / "odd/expired-server.crt").read_bytes(),
    )
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([pair]))
    server.start()
    yield port
    server.stop(0)


def test_a_federation_with_certificates_from_fedpipe_certs_completes(
    tmp_path: Path, pki: Path, client_data: list[Path], procs: list[subprocess.Popen[str]]
) -> None:
    config = server_config(tmp_path, rounds=2, min_clients=2, eval_every=0, **mutual_tls(pki))
    server = spawn_server(config)
    procs.append(server)
    clients = [
        spawn_client(config.port, name, data, *tls(pki, who=f"ours/clients/{name}"))
        for name, data in zip(("alice", "bob"), client_data, strict=False)
    ]
    procs += clients
    record = wait_for_line(server, lambda r: r.get("round") == 2, 120)
    assert record is not None and record["clients"] == ["alice", "bob"]
    for proc in clients:
        code, out = finish(proc, timeout=60)
        assert code == ExitCode.OK, out
    assert server.wait(timeout=30) == ExitCode.OK


def test_each_tls_failure_is_told_in_words_and_retried_until_retry_timeout(
    tmp_path: Path,
    pki: Path,
    client_data: list[Path],
    procs: list[subprocess.Popen[str]],
    expired_server: int,
) -> None:
    keep_waiting = {"min_clients": 4, "wait_timeout": 120.0, "eval_every": 0}
    servers = {
        "mtls": server_config(tmp_path / "mtls", **keep_waiting, **mutual_tls(pki)),
        "elsewhere": server_config(
            tmp_path / "elsewhere", **keep_waiting, **mutual_tls(pki, "odd/elsewhere")
        ),
        "plain": server_config(tmp_path / "plain", **keep_waiting),
    }
    for config in servers.values():
        procs.append(spawn_server(config))
    for name in servers:  # a client that finds no server at first says so, not the TLS matter
        wait_for_text(tmp_path / name / "server.log", "listening on", 60)
    port = {name: config.port for name, config in servers.items()}
    port["expired"] = expired_server
    data = client_data[0]
    cases = {
        "wrong CA": (
            port["mtls"],
            tls(pki, ca="other/ca.crt"),
            "the server's certificate is not signed by a CA this client trusts (tls_ca ",
        ),
        "no client certificate": (
            port["mtls"],
            tls(pki, who=None),
            "it requires a client certificate (mutual TLS); set tls_cert and tls_key",
        ),
        "certificate of another CA": (
            port["mtls"],
            tls(pki, who="other/clients/alice"),
            "the server refused this client's certificate (",
        ),
        "plaintext client": (
            port["mtls"],
            [],
            "the server speaks TLS but this client connects in plaintext: set tls_ca",
        ),
        "host name mismatch": (
            port["elsewhere"],
            tls(pki),
            "the server's certificate is not for '127.0.0.1', the name this client dials; "
            "its certificate is for 'fl.example.org'",
        ),
        "plaintext server": (port["plain"], tls(pki), "the server speaks plaintext, not TLS"),
        "expired server certificate": (
            port["expired"],
            tls(pki),
            "the server's certificate has expired (or this machine's clock is wrong)",
        ),
    }
    started = {
        case: spawn_client(where, "alice", data, *args, *RETRIES)
        for case, (where, args, _) in cases.items()
    }
    procs += started.values()
    for case, proc in started.items():
        code, out = finish(proc, timeout=90)
        sentence = cases[case][2]
        assert code == ExitCode.FAILED, (case, out)
        assert out.count(sentence) >= 2, (case, out)  # at each attempt, and when giving up
        assert "gave up reaching" in out, (case, out)
        assert "failed to connect to all addresses" not in out, (case, out)
    log = (tmp_path / "elsewhere" / "server.log").read_text()
    assert "is for 'fl.example.org', not for host '127.0.0.1'" in log
    if os.environ.get("GRPC_VERBOSITY", "").upper() in ("", "INFO", "DEBUG"):
        # The server cannot tell its code about failed handshakes; gRPC's core logs them.
        log = (tmp_path / "mtls" / "server.log").read_text()
        assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in log  # no client certificate
        assert "CERTIFICATE_VERIFY_FAILED" in log  # a certificate of another CA


def test_a_client_whose_own_certificate_expired_stops_at_start(
    pki: Path, client_data: list[Path]
) -> None:
    proc = spawn_client(free_port(), "alice", client_data[0], *tls(pki, who="odd/expired-alice"))
    code, out = finish(proc, timeout=60)
    assert code == ExitCode.USAGE, out
    assert "expired-alice.crt expired on" in out and "make a new one (`fedpipe certs`)" in out


def test_a_server_with_an_expired_or_mismatched_certificate_refuses_to_start(
    tmp_path: Path, pki: Path
) -> None:
    for files, message in (
        (mutual_tls(pki, "odd/expired-server"), "expired-server.crt expired on"),
        (
            {**mutual_tls(pki), "tls_key": pki / "ours/clients/bob.key"},
            "bob.key is not the key of tls_cert",
        ),
    ):
        server = spawn_server(server_config(tmp_path, **files))
        assert server.wait(timeout=60) == ExitCode.USAGE
        log = (tmp_path / "server.log").read_text()
        assert message in log and "listening on" not in log
