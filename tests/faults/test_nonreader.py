"""A client that accepts the run setup and then never reads again: its session is closed with
a logged reason once its frames stop going out, so it cannot pin one model-sized payload per
round; the honest client's run completes. A real server process; the hostile peer speaks the
protocol by hand and then stops reading."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedpipe.common.outcome import ExitCode
from fedpipe.proto.fedpipe.v1 import federation_pb2 as pb
from fedpipe.server.transports.grpc.proxy import OUTBOX_FRAMES
from tests.faults.conftest import finish, server_config, spawn_client, spawn_server
from tests.faults.test_identity import server_log, wait_for_log
from tests.integration.conftest import RawClient

ROUNDS = 6
HIDDEN = 16384  # an MLP of 64 -> 16384 -> 10: a 4.9 MB model


def rss_mib(pid: int) -> float | None:
    """The process's resident memory; None once it has exited (a zombie has no VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


# Closed when its next task comes (short rounds), or when its frames fall below the floor of
# min_transfer_rate_kib (long rounds; loopback readers go far faster than 8 MiB/s).
CASES = {
    "next-task": {"round_timeout": 4.0},
    "send-floor": {"round_timeout": 12.0, "min_transfer_rate_kib": 8192, "transfer_grace": 1.0},
}


@pytest.mark.parametrize("case", CASES)
async def test_a_client_that_stops_reading_is_closed_and_pins_no_payload(
    tmp_path: Path, procs: list[subprocess.Popen[str]], client_data: list[Path], case: str
) -> None:
    config = server_config(
        tmp_path,
        **CASES[case],
        rounds=ROUNDS,
        min_clients=2,
        min_results=1,
        eval_every=0,
        model={"name": "mlp", "config": {"n_features": 64, "n_classes": 10, "hidden": [HIDDEN]}},
        training={"epochs": 1, "batch_size": 64},
    )
    server = spawn_server(config)
    procs.append(server)
    log = server_log(config)
    await asyncio.to_thread(wait_for_log, log, "listening on", 30)
    procs.append(spawn_client(config.port, "honest", client_data[0]))
    hostile = RawClient(config.port)
    try:
        await hostile.hello("hostile")
        setup = await asyncio.wait_for(hostile.next_task(), 60)
        accept = pb.ClientMessage(reply=pb.Reply(task_id=setup.task_id))
        await hostile.send(accept.SerializeToString())  # from now on: it reads nothing
        samples: list[float] = []
        deadline = time.monotonic() + 120
        while server.poll() is None and time.monotonic() < deadline:
            rss = rss_mib(server.pid)
            if rss is None:  # it ended between the poll and the read
                break
            samples.append(rss)
            await asyncio.sleep(0.5)
        rc, out = await asyncio.to_thread(finish, server, 30)
    finally:
        await hostile.close()
    print(
        f"server RSS (MiB): first {samples[0]:.0f}, max {max(samples):.0f}, last {samples[-1]:.0f}"
    )
    assert rc == ExitCode.OK, out
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["round"] for r in records] == list(range(1, ROUNDS + 1))
    text = log.read_text()
    closed = re.search(
        r"client hostile is not reading: (\d+) bytes of round (\d+) still unsent", text
    )
    assert closed, text
    assert int(closed[1]) > 1 << 20 and int(closed[2]) <= 3  # a payload; by the third round
    when = "before its next task" if case == "next-task" else "below min_transfer_rate_kib=8192"
    assert f"round {closed[2]} still unsent ({when})" in text
    assert "client hostile left (not reading:" in text
    gone = int(closed[2])
    assert all(r["sampled"] == 1 for r in records[gone + 1 :])  # out of the pool for good
    summary = json.loads((Path(config.output_dir) / "summary.json").read_text())
    assert summary["status"] == "completed"


# A 64 -> 65536 -> 10 MLP: a 19.5 MiB model, sent in 1 MiB chunks. A server that kept a copy
# of the download per stalled session would grow by ~19.5 MiB per session.
STALL_HIDDEN = 65536
STALL_CHUNK_MIB = 1.0
#: The most the server's peak RSS may grow per stalled session, in chunks: its frames in
#: flight, never the model. A round's frames are shared by its clients up to
#: FRAME_CACHE_BYTES (then a session holds gRPC's copy of the frame it writes: measured 1.2);
#: past it each session builds its own and holds its outbox's too (measured 6.0). Peak RSS
#: sampled every 0.1 s moves by up to ~29 MiB between runs (3.6 chunks per session over 8): the
#: bounds leave that margin and stay far below a model copy (19.5 chunks).
STALL_BOUNDS = {
    "shared-frames": ("fedpipe", 6),
    "own-frames": ("tests.faults.unshared_frames_server", OUTBOX_FRAMES + 8),
}


async def _peak_rss_with_stalled(
    tmp_path: Path, stalled: int, data: Path, procs: list[subprocess.Popen[str]], module: str
) -> tuple[float, str, list[dict[str, object]]]:
    """The server's peak RSS over a 2-round run with one honest client and ``stalled``
    sessions that accept the setup and are then SIGSTOPped (nothing drains their sockets);
    its log and its progress records."""
    config = server_config(
        tmp_path,
        rounds=2,
        min_clients=stalled + 1,
        min_results=1,
        round_timeout=10.0,
        eval_every=0,
        chunk_mib=STALL_CHUNK_MIB,
        model={
            "name": "mlp",
            "config": {"n_features": 64, "n_classes": 10, "hidden": [STALL_HIDDEN]},
        },
        training={"epochs": 1, "max_steps": 1, "batch_size": 16},  # the honest client is quick
    )
    server = spawn_server(config, module=module)
    procs.append(server)
    log = server_log(config)
    await asyncio.to_thread(wait_for_log, log, "listening on", 30)
    command = ["-m", "tests.faults.nonreading_sessions", str(config.port), str(stalled)]
    holder = subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE, text=True)
    procs.extend([holder, spawn_client(config.port, "honest", data)])
    assert holder.stdout is not None
    assert await asyncio.to_thread(holder.stdout.readline) == "ready\n"
    holder.send_signal(signal.SIGSTOP)
    peak, deadline = 0.0, time.monotonic() + 60
    while server.poll() is None and time.monotonic() < deadline:
        rss = rss_mib(server.pid)
        if rss is None:
            break
        peak = max(peak, rss)
        await asyncio.sleep(0.1)
    rc, out = await asyncio.to_thread(finish, server, 30)
    assert rc == ExitCode.OK, out
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return peak, log.read_text(), records


@pytest.mark.parametrize("frames", STALL_BOUNDS)
async def test_stalled_downloads_hold_chunks_not_model_copies(
    tmp_path: Path, procs: list[subprocess.Popen[str]], client_data: list[Path], frames: str
) -> None:
    """Eight more SIGSTOPped sessions cost the server a few chunks each, not a model copy
    each; they miss round 1 like late clients, are closed with their cause before round 2,
    and the honest client's run completes."""
    module, bound = STALL_BOUNDS[frames]
    few, many = 1, 9
    (peak_few, _, _), (peak_many, text, records) = await asyncio.gather(
        _peak_rss_with_stalled(tmp_path / "few", few, client_data[0], procs, module),
        _peak_rss_with_stalled(tmp_path / "many", many, client_data[1], procs, module),
    )
    per_session = (peak_many - peak_few) / (many - few) / STALL_CHUNK_MIB
    print(f"server peak RSS (MiB): {peak_few:.0f} with {few}, {peak_many:.0f} with {many} stalled")
    assert per_session < bound, (peak_few, peak_many)
    # Round 2 samples them too: they are closed when its tasks go out.
    assert [(r["round"], r["sampled"], r["replied"]) for r in records] == [
        (1, many + 1, 1),
        (2, many + 1, 1),
    ]
    assert f"no reply from: {', '.join(f'stalled-{i}' for i in range(many))}" in text
    for i in range(many):
        closed = re.search(
            rf"client stalled-{i} is not reading: (\d+) bytes of round 1 still unsent "
            r"\(before its next task\); closing its session",
            text,
        )
        assert closed and int(closed[1]) > 1 << 20, text  # most of the model never went out
        assert f"client stalled-{i} left (not reading:" in text
