"""A run's lifecycle under faults: server restarts, frozen and lost clients, signals."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np

from fedpipe.common.data import Dataset, load_dataset, save_dataset
from fedpipe.common.outcome import ExitCode
from tests.faults.conftest import (
    finish,
    server_config,
    spawn_client,
    spawn_server,
    wait_for_line,
)


def read_summary(tmp_path: Path) -> dict[str, object]:
    return dict(json.loads((tmp_path / "run" / "summary.json").read_text()))


def test_a_client_training_when_the_server_dies_reconnects_and_finishes(
    tmp_path: Path, client_data: list[Path], procs: list[subprocess.Popen[str]]
) -> None:
    # Long local training: the server is killed while the client trains round 2, so the
    # client's reply goes to a stream that is already gone.
    config = server_config(
        tmp_path, rounds=3, min_clients=1, eval_every=0, training={"epochs": 150, "batch_size": 16}
    )
    server = spawn_server(config)
    procs.append(server)
    client = spawn_client(config.port, "site-0", client_data[0])
    procs.append(client)
    first = wait_for_line(server, lambda r: r.get("round") == 1, 90)
    assert first is not None, (tmp_path / "server.log").read_text()
    time.sleep(min(0.3, first["seconds"] / 3))  # well inside round 2's training
    server.kill()
    server.wait(10)
    time.sleep(1.0)
    assert client.poll() is None, finish(client)[1]  # still there, reconnecting
    resumed = spawn_server(config, "--resume", name="resumed")
    procs.append(resumed)
    assert resumed.wait(120) == 0, (tmp_path / "resumed.log").read_text()
    code, out = finish(client, 60)
    assert code == ExitCode.OK, out
    assert "Traceback" not in out and "reconnecting in" in out
    summary = read_summary(tmp_path)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 3


def test_a_frozen_client_does_not_stretch_the_round_past_its_deadline(
    tmp_path: Path, client_data: list[Path], procs: list[subprocess.Popen[str]]
) -> None:
    timeout = 4.0
    config = server_config(tmp_path, rounds=3, min_clients=2, round_timeout=timeout, eval_every=1)
    server = spawn_server(config)
    procs.append(server)
    frozen = spawn_client(config.port, "frozen", client_data[0])
    procs += [frozen, spawn_client(config.port, "alive", client_data[1])]
    assert wait_for_line(server, lambda r: r.get("round") == 1, 90) is not None
    frozen.send_signal(signal.SIGSTOP)
    records = [wait_for_line(server, lambda r: "round" in r, 60) for _ in range(2)]
    frozen.send_signal(signal.SIGCONT)
    assert server.wait(60) == 0, (tmp_path / "server.log").read_text()
    stalled = [r for r in records if r is not None and "frozen" not in r["clients"]]
    assert stalled, records
    for record in stalled:
        # Training and evaluation share one deadline: the round ends at about round_timeout,
        # not after a second wait for the frozen client's evaluation (2 x round_timeout). The
        # live client's update counts; the evaluation had no time left.
        assert timeout <= record["seconds"] < timeout + 1.5, record
        assert record["clients"] == ["alive"] and "train_loss" in record
        assert "accuracy" not in record


def test_a_lost_client_does_not_stall_the_run(
    tmp_path: Path, client_data: list[Path], procs: list[subprocess.Popen[str]]
) -> None:
    config = server_config(
        tmp_path, rounds=4, min_clients=3, round_timeout=20.0, wait_timeout=60.0, eval_every=0
    )
    server = spawn_server(config)
    procs.append(server)
    clients = [spawn_client(config.port, f"site-{i}", client_data[i]) for i in range(3)]
    procs += clients
    assert wait_for_line(server, lambda r: r.get("round") == 1, 90) is not None
    clients[0].kill()
    start = time.monotonic()
    assert server.wait(60) == 0, (tmp_path / "server.log").read_text()
    # min_clients applies before round 1 only: the other rounds go on with two clients
    # instead of waiting wait_timeout (60 s) for a third.
    assert time.monotonic() - start < 15
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    assert all(r["clients"] == ["site-1", "site-2"] for r in records[2:])
    assert read_summary(tmp_path)["status"] == "completed"
    assert [finish(c)[0] for c in clients[1:]] == [0, 0]


def test_a_signal_stops_a_server_waiting_for_clients_at_once(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        config = server_config(tmp_path, min_clients=2, wait_timeout=300.0)
        server = spawn_server(config, name=sig.name, verbose=False)
        procs.append(server)
        log = tmp_path / f"{sig.name}.log"
        deadline = time.monotonic() + 30
        while "waiting for 2 client(s)" not in log.read_text():
            assert time.monotonic() < deadline and server.poll() is None, log.read_text()
            time.sleep(0.05)
        start = time.monotonic()
        server.send_signal(sig)
        code = server.wait(10)
        # At once: seconds, not the 300 s wait (a loaded CI machine needs a margin).
        assert time.monotonic() - start < 5.0, sig
        assert code == ExitCode.INTERRUPTED, log.read_text()
        summary = read_summary(tmp_path)
        assert summary["status"] == "stopped" and summary["rounds_completed"] == 0


def test_the_server_logs_its_address_and_each_client_by_default(
    tmp_path: Path, client_data: list[Path], procs: list[subprocess.Popen[str]]
) -> None:
    config = server_config(tmp_path, rounds=1, min_clients=1, eval_every=0)
    server = spawn_server(config, verbose=False)  # no -v: the default log level
    procs.append(server)
    client = spawn_client(config.port, "site-0", client_data[0])
    procs.append(client)
    assert server.wait(60) == 0
    assert finish(client)[0] == 0
    log = (tmp_path / "server.log").read_text()
    assert f"listening on 127.0.0.1:{config.port}" in log
    assert "client site-0 joined from ipv4:127.0.0.1" in log
    assert "client site-0 left (run finished)" in log


def test_a_client_busy_when_the_run_completes_is_told_and_exits_0(
    tmp_path: Path, client_data: list[Path], procs: list[subprocess.Popen[str]]
) -> None:
    # One client has 40 times the data: it is still training when the round deadline ends
    # the run, and reads the stop task only after writing its (late) reply.
    small = load_dataset(client_data[0])
    big = Dataset(np.concatenate([small.x] * 40), np.concatenate([small.y] * 40))
    config = server_config(
        tmp_path,
        rounds=1,
        min_clients=2,
        min_results=1,
        round_timeout=1.0,
        eval_every=0,
        training={"epochs": 8, "batch_size": 16},  # about 4 s for the busy client
    )
    server = spawn_server(config)
    procs.append(server)
    busy = spawn_client(config.port, "busy", save_dataset(big, tmp_path / "big"))
    procs += [busy, spawn_client(config.port, "quick", client_data[1])]
    assert server.wait(60) == 0, (tmp_path / "server.log").read_text()
    assert read_summary(tmp_path)["status"] == "completed"
    code, out = finish(busy, 60)
    assert code == ExitCode.OK, out
    assert "round 1:" in out and "the server ended the run" in out


def test_a_second_signal_abandons_the_round_under_way(
    tmp_path: Path, client_data: list[Path], procs: list[subprocess.Popen[str]]
) -> None:
    config = server_config(tmp_path, rounds=5, min_clients=2, round_timeout=120.0, eval_every=0)
    server = spawn_server(config)
    procs.append(server)
    frozen = spawn_client(config.port, "frozen", client_data[0])
    procs += [frozen, spawn_client(config.port, "alive", client_data[1])]
    assert wait_for_line(server, lambda r: r.get("round") == 1, 90) is not None
    frozen.send_signal(signal.SIGSTOP)  # round 2 would wait 120 s for it
    time.sleep(1.0)
    server.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    assert server.poll() is None  # the first signal waits for the round to end
    start = time.monotonic()
    server.send_signal(signal.SIGTERM)
    code = server.wait(30)
    assert time.monotonic() - start < 10, "the second signal must not wait for the deadline"
    assert code == ExitCode.INTERRUPTED, (tmp_path / "server.log").read_text()
    summary = read_summary(tmp_path)
    assert summary["status"] == "stopped" and summary["rounds_completed"] == 1
    assert summary["reason"] == (
        "round 2 abandoned by a second stop signal; the last checkpoint is round 1"
    )
