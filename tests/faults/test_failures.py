"""A failed run is never reported as success: exit codes, summary.json, what clients are told."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedpipe.common.data import Dataset, load_dataset, save_dataset
from fedpipe.common.outcome import ExitCode
from fedpipe.common.records import settings_data
from fedpipe.proto.fedpipe.v1 import federation_pb2 as pb
from fedpipe.server.checkpoint import load_checkpoint
from tests.faults.conftest import (
    finish,
    server_config,
    spawn_client,
    spawn_server,
    wait_for_line,
)
from tests.integration.conftest import RawClient


def summary_of(run: Path) -> dict[str, object]:
    return dict(json.loads((run / "summary.json").read_text()))


def wait_listening(port: int, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"server not listening on {port} (exit {proc.poll()})")


async def test_a_run_in_which_no_client_replies_fails_and_clients_are_told(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    config = server_config(tmp_path, rounds=3, min_clients=1, round_timeout=2.0)
    server = spawn_server(config)
    procs.append(server)
    await asyncio.to_thread(wait_listening, config.port, server)
    mute = RawClient(config.port)  # joins, accepts the setup, never answers a round
    try:
        await mute.hello("mute")
        task = await mute.next_task()
        assert task.kind == pb.TASK_KIND_INITIALIZE
        await mute.send(pb.ClientMessage(reply=pb.Reply(task_id=task.task_id)).SerializeToString())
        assert (await mute.next_task()).kind == pb.TASK_KIND_TRAIN
        stop = await asyncio.wait_for(mute.next_task(), 30)
    finally:
        await mute.close()
    assert stop.kind == pb.TASK_KIND_STOP
    told = settings_data(stop.settings)
    assert told["status"] == "failed" and "round 1: too few results" in told["reason"]
    code = await asyncio.to_thread(server.wait, 30)
    log = (tmp_path / "server.log").read_text()
    assert code == ExitCode.FAILED, log
    assert "run failed: round 1: too few results (0 of 1 sampled client(s) replied" in log
    summary = summary_of(tmp_path / "run")
    assert summary["status"] == "failed" and summary["reason"] == told["reason"]
    assert summary["rounds_completed"] == 0


def test_a_client_whose_data_does_not_fit_exits_non_zero_and_the_server_says_why(
    tmp_path: Path, client_data: list[Path], procs: list[subprocess.Popen[str]]
) -> None:
    good = load_dataset(client_data[1])
    narrow = save_dataset(Dataset(good.x[:, :32].copy(), good.y), tmp_path / "narrow")
    config = server_config(tmp_path, rounds=2, min_clients=2, eval_every=0)
    server = spawn_server(config)
    procs.append(server)
    bad = spawn_client(config.port, "narrow", narrow)
    procs += [bad, spawn_client(config.port, "good", client_data[0])]
    code, out = finish(bad, 60)
    assert code == ExitCode.REJECTED, out
    assert "does not fit model 'softmax-regression'" in out and "Traceback" not in out
    assert server.wait(60) == 0
    log = (tmp_path / "server.log").read_text()
    assert "client narrow could not be initialized" in log and "does not fit model" in log
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["clients"] for r in records] == [["good"], ["good"]]


def test_an_unwritable_run_directory_fails_before_the_port_opens(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the run directory should go")
    config = server_config(tmp_path, output_dir=str(blocker / "run"))
    server = spawn_server(config, name="blocked", log_dir=tmp_path, verbose=False)
    procs.append(server)
    assert server.wait(30) == ExitCode.FAILED
    log = (tmp_path / "blocked.log").read_text()
    assert f"the run directory {blocker / 'run'} is not writable" in log
    assert "Traceback" not in log and "listening" not in log


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path``: a disk that fills up (needs root; else skip)."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> Path:
    """Take every free byte of ``disk``."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 4096)
    return filler


def test_a_full_disk_fails_the_run_keeps_the_checkpoint_and_resume_finishes(
    tmp_path: Path, client_data: list[Path], procs: list[subprocess.Popen[str]]
) -> None:
    with small_disk(tmp_path / "disk", "512k") as disk:
        config = server_config(
            tmp_path,
            rounds=5,
            min_clients=2,
            eval_every=0,
            output_dir=str(disk / "run"),
            training={"epochs": 30, "batch_size": 16},  # rounds slow enough to fill the disk
        )
        server = spawn_server(config, log_dir=tmp_path)  # its log is not on the small disk
        procs.append(server)
        clients = [spawn_client(config.port, f"site-{i}", client_data[i]) for i in range(2)]
        procs += clients
        assert wait_for_line(server, lambda r: r.get("round") == 1, 90) is not None
        filler = fill(disk)
        assert server.wait(60) == ExitCode.FAILED
        log = (tmp_path / "server.log").read_text()
        assert re.search(
            r"run failed: round [2-5]: cannot write its results to .*: \[Errno 28\] "
            "No space left on device",
            log,
        ), log
        # The clients learn the run was aborted, and exit non-zero (a restart may help).
        for client in clients:
            code, out = finish(client, 30)
            assert code == ExitCode.FAILED and "the server aborted the run" in out, out
        state = load_checkpoint(disk / "run" / "checkpoint.fpk")  # the last good one, intact
        assert 1 <= int(state["round"]) < 5  # type: ignore[arg-type]

        filler.unlink()
        resumed = spawn_server(config, "--resume", name="resumed", log_dir=tmp_path)
        procs.append(resumed)
        procs += [spawn_client(config.port, f"site-{i}", client_data[i]) for i in range(2)]
        assert resumed.wait(90) == 0, (tmp_path / "resumed.log").read_text()
        summary = summary_of(disk / "run")
        assert summary["status"] == "completed" and summary["last_round"] == 5
        with np.load(disk / "run" / "model.npz") as model:
            assert all(np.isfinite(model[k]).all() for k in model.files)
