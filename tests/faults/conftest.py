"""Fault tests: real server and client processes, real signals, loopback only.

Every process a test starts is killed at the end whatever happened; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedpipe.common.config import ServerConfig
from tests.integration.conftest import client_data, finish, server_config, spawn_client

__all__ = [
    "client_data",
    "finish",
    "server_config",
    "spawn_client",
    "spawn_server",
    "wait_for_line",
]

ENV = dict(os.environ, PYTHONUNBUFFERED="1")


def spawn_server(
    config: ServerConfig,
    *extra: str,
    name: str = "server",
    verbose: bool = True,
    log_dir: Path | None = None,
    module: str = "fedpipe",
) -> subprocess.Popen[str]:
    """A real ``fedpipe server`` process with ``config`` (written as JSON next to its run);
    ``python -m module``: fedpipe's command line.

    Its stdout carries one JSON object per round (``--progress json``); its log goes to
    ``<log_dir or output_dir/..>/<name>.log``.
    """
    folder = Path(config.output_dir).parent if log_dir is None else log_dir
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(config.model_dump_json())
    log = open(folder / f"{name}.log", "a")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            module,
            *(["-v"] if verbose else []),
            "server",
            "--config",
            str(path),
            "--progress",
            "json",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=ENV,
    )
    log.close()
    return proc


def wait_for_line(
    proc: subprocess.Popen[str], predicate: Any, timeout: float
) -> dict[str, Any] | None:
    """Read ``proc``'s JSON progress lines until ``predicate(record)``; None at EOF/timeout."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    os.set_blocking(proc.stdout.fileno(), True)
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            return None
        if line.startswith("{"):
            record = json.loads(line)
            if predicate(record):
                return record
    return None


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts: SIGCONT'ed and killed at the end whatever happened."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pass
