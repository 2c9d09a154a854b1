"""A real ``fedpipe server`` with its status page and /metrics on, and real client processes:
what the status page, Prometheus and browser tests watch.

Its run has far more rounds than a test waits for: a test watches it run, then stops it with
SIGTERM (exit 130, ``summary.json`` says ``stopped``), so that it never ends on its own in the
middle of a check. Nothing is piped: a pipe nobody reads would stall a long run once full.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpipe.common.outcome import ExitCode
from fedpipe.server.simulation import free_port
from tests.faults.conftest import finish, server_config, spawn_server

CLIENTS = ("hospital-a", "hospital-b", "lab-c")
STATUS_TOKEN = "status-token-for-tests-0123456789"


@dataclass
class Federation:
    server: subprocess.Popen[str]
    clients: list[subprocess.Popen[str]]
    run_dir: Path
    status_port: int
    metrics_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.status_port}/"

    def status(self) -> dict[str, Any]:
        """``/api/status`` with the token as a bearer header."""
        request = urllib.request.Request(
            self.url + "api/status", headers={"Authorization": f"Bearer {STATUS_TOKEN}"}
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            return dict(json.loads(reply.read()))

    def records(self) -> list[dict[str, Any]]:
        """``metrics.jsonl``'s complete lines."""
        path = self.run_dir / "metrics.jsonl"
        text = path.read_text() if path.exists() else ""
        return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]

    def wait_for_round(self, number: int, timeout: float = 120) -> list[dict[str, Any]]:
        """The records once round ``number`` is in ``metrics.jsonl``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.server.poll() is None, "the server exited"
            records = self.records()
            if records and records[-1]["round"] >= number:
                return records
            time.sleep(0.05)
        raise AssertionError(f"round {number} not recorded within {timeout}s")

    def stop(self) -> int:
        """SIGTERM the server; returns its exit code (130 once a round ran). The clients, told
        the server stopped, would wait for it to come back: they are stopped too."""
        self.server.send_signal(signal.SIGTERM)
        code, _ = finish(self.server, timeout=60)
        for client in self.clients:
            client.send_signal(signal.SIGTERM)
            finish(client, timeout=30)
        return code


def start_monitored_federation(
    tmp_path: Path,
    client_data: list[Path],
    procs: list[subprocess.Popen[str]],
    **overrides: Any,
) -> Federation:
    """Start the server (status page and /metrics on, token from a file) and three clients;
    returns once round 1 is recorded."""
    token_file = tmp_path / "status.token"
    token_file.write_text(STATUS_TOKEN + "\n")
    token_file.chmod(0o600)
    settings: dict[str, Any] = {
        "rounds": 100_000,
        "min_clients": len(CLIENTS),
        "status_port": free_port(),
        "status_token_file": str(token_file),
        "metrics_port": free_port(),
        "hello_timeout": 3.0,  # also the status page's request timeout
    }
    config = server_config(tmp_path, **(settings | overrides))
    procs.append(server := spawn_server(config, "--progress", "none"))
    assert config.status_port is not None and config.metrics_port is not None
    wait_for_port(config.status_port, server)
    clients = [
        spawn_logged_client(config.port, name, data, tmp_path / f"{name}.log")
        for name, data in zip(CLIENTS, client_data, strict=False)
    ]
    procs.extend(clients)
    run_dir = Path(config.output_dir)
    federation = Federation(server, clients, run_dir, config.status_port, config.metrics_port)
    federation.wait_for_round(1)
    return federation


def spawn_logged_client(port: int, name: str, data: Path, log: Path) -> subprocess.Popen[str]:
    """A real ``fedpipe client`` process logging to ``log``."""
    argv = ["--server", f"127.0.0.1:{port}", "--name", name, "--data", str(data)]
    argv += ["--eval-fraction", "0.2", "--threads", "1"]
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fedpipe", "client", *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )


def wait_for_port(port: int, server: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, "the server exited before it served"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port} after {timeout}s")


def assert_stopped(federation: Federation, code: int) -> None:
    assert code == ExitCode.INTERRUPTED
    summary = json.loads((federation.run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped"


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample ``/metrics`` on ``port`` shows, by name and labels (needs
    prometheus-client's parser: callers skip without it)."""
    from prometheus_client import parser

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in parser.text_string_to_metric_families(text)
        for s in family.samples
    }


def fedpipe_samples(port: int) -> Samples:
    """The samples fedpipe itself exports (not the process collector's)."""
    return {k: v for k, v in scrape(port).items() if k[0].startswith("fedpipe_")}
