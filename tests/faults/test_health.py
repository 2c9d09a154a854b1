"""`fedpipe health` against real server processes: what Docker's HEALTHCHECK and the
Kubernetes probes of deploy/ run. Exit 0 when the server is serving; otherwise non-zero and
one line that says why."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.faults.conftest import server_config, spawn_server
from tests.integration.test_tls import pki  # noqa: F401 (a fixture)


def health(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedpipe", "health", "--timeout", "5", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )


def wait_listening(proc: subprocess.Popen[str], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited: {log.read_text()[-2000:]}"
        if log.exists() and "listening on" in log.read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"server not listening after {timeout}s")


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_health_is_0_while_the_server_serves_and_1_with_one_line_when_none_listens(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    config = server_config(tmp_path, min_clients=1, wait_timeout=120.0)
    address = f"127.0.0.1:{config.port}"
    before = health("--server", address)
    assert before.returncode == 1 and before.stdout == ""
    assert one_line(before).startswith(f"fedpipe health: {address}: UNAVAILABLE: ")

    procs.append(server := spawn_server(config))
    wait_listening(server, tmp_path / "server.log")
    serving = health("--server", address)
    assert (serving.returncode, serving.stdout, serving.stderr) == (0, f"{address}: SERVING\n", "")

    server.kill()
    server.wait(timeout=10)
    after = health("--server", address)
    assert after.returncode == 1 and "UNAVAILABLE" in one_line(after)


def test_health_over_mutual_tls_needs_the_ca_and_a_client_certificate(
    tmp_path: Path,
    procs: list[subprocess.Popen[str]],
    pki: Path,  # noqa: F811
) -> None:
    config = server_config(
        tmp_path,
        min_clients=1,
        wait_timeout=120.0,
        tls_cert=str(pki / "server.crt"),
        tls_key=str(pki / "server.key"),
        tls_client_ca=str(pki / "ca.crt"),
    )
    procs.append(server := spawn_server(config))
    wait_listening(server, tmp_path / "server.log")
    ca, cert, key = (str(pki / f) for f in ("ca.crt", "clients/client.crt", "clients/client.key"))
    for host in ("127.0.0.1", "localhost"):  # the names in the server's certificate
        ok = health(
            "--server",
            f"{host}:{config.port}",
            "--tls-ca",
            ca,
            "--tls-cert",
            cert,
            "--tls-key",
            key,
        )
        assert ok.returncode == 0 and ok.stdout == f"{host}:{config.port}: SERVING\n", ok.stderr
    address = f"127.0.0.1:{config.port}"
    for argv in (
        ["--tls-ca", ca],  # no client certificate: the handshake fails
        ["--tls-cert", cert, "--tls-key", key],  # the server's CA is not trusted
        [],  # plaintext to a TLS port
    ):
        refused = health("--server", address, *argv)
        assert refused.returncode == 1, argv
        assert one_line(refused).startswith(f"fedpipe health: {address}: UNAVAILABLE: "), argv
    half = health("--server", address, "--tls-ca", ca, "--tls-cert", cert)
    assert half.returncode == 2
    assert (
        one_line(half)
        == "fedpipe health: --tls-cert and --tls-key go together: give both or neither"
    )
    missing = health("--server", address, "--tls-ca", str(tmp_path / "nowhere.crt"))
    assert missing.returncode == 2 and "nowhere.crt" in one_line(missing)


def test_health_times_out_on_a_server_that_does_not_answer(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    config = server_config(tmp_path, min_clients=1, wait_timeout=120.0)
    procs.append(server := spawn_server(config))
    wait_listening(server, tmp_path / "server.log")
    os.kill(server.pid, signal.SIGSTOP)  # the port is open, nothing answers
    start = time.monotonic()
    stuck = health("--server", f"127.0.0.1:{config.port}", "--timeout", "2")
    assert time.monotonic() - start < 30
    assert stuck.returncode == 1 and "DEADLINE_EXCEEDED" in one_line(stuck)
