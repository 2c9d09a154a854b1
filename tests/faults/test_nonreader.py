"""A client that accepts the run setup and then never reads again: its session is closed with
a logged reason once its frames stop going out, so it cannot pin one model-sized payload per
round; the honest client's run completes. A real server process; the hostile peer speaks the
protocol by hand and then stops reading."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from fedpipe.common.outcome import ExitCode
from fedpipe.proto.fedpipe.v1 import federation_pb2 as pb
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
