"""One server per port and per run directory: a second one exits at once with one clear line,
and the first one's files and clients are untouched. Real server processes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from fedpipe.common.outcome import ExitCode
from fedpipe.server.simulation import free_port
from tests.faults.conftest import finish, server_config, spawn_client, spawn_server
from tests.faults.test_identity import server_log, wait_for_log


def refused_line(proc: subprocess.Popen[str], log: Path) -> str:
    """The one line a server that could not start printed (it must exit 1 within 60s)."""
    assert proc.wait(timeout=60) == ExitCode.FAILED
    text = log.read_text()
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if line.startswith("fedpipe server: ")]
    assert len(lines) == 1, text
    return lines[0]


def test_a_second_server_on_the_same_port_or_run_directory_refuses_to_start(
    tmp_path: Path, procs: list[subprocess.Popen[str]], client_data: list[Path]
) -> None:
    config = server_config(tmp_path / "a", rounds=2, min_clients=1)
    first = spawn_server(config)
    procs.append(first)
    wait_for_log(server_log(config), "listening on", 30)
    run_dir = Path(config.output_dir)
    # What a second server's start-up would delete as a crashed write's leftover.
    leftover = run_dir / ".model.npz.tmp-999999"
    leftover.write_bytes(b"partial")

    same_port = config.model_copy(update={"output_dir": str(tmp_path / "b" / "run")})
    second = spawn_server(same_port, name="same-port", verbose=False)
    procs.append(second)
    line = refused_line(second, tmp_path / "b" / "same-port.log")
    assert line.startswith(f"fedpipe server: port {config.port} is in use"), line

    same_dir = config.model_copy(update={"port": free_port()})
    third = spawn_server(same_dir, name="same-dir", verbose=False, log_dir=tmp_path / "c")
    procs.append(third)
    line = refused_line(third, tmp_path / "c" / "same-dir.log")
    assert line.startswith(
        f"fedpipe server: the run directory {run_dir} is in use by another run "
        f"(process {first.pid})"
    ), line
    assert leftover.exists()

    # The first server never noticed: a client joins it and the run completes.
    client = spawn_client(config.port, "only", client_data[0])
    procs.append(client)
    rc, out = finish(first, 120)
    assert rc == ExitCode.OK, out
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert finish(client, 30)[0] == ExitCode.OK
