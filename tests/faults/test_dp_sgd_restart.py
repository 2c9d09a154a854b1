"""kill -9 of a DP-SGD client, restarted with its state dir: its ε keeps counting every step
it ran in the run, before the kill as after, as ``dp-accounting`` computes it."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.common.test_dp_sgd import library_epsilon
from tests.faults.conftest import server_config, spawn_client, spawn_server
from tests.faults.test_resume import WAIT, Tail

SIGMA, DELTA, BATCH = 1.1, 1e-5, 16
STEPS = re.compile(r"round (\d+): (\d+) steps")


def test_a_killed_dp_sgd_client_restarted_with_its_state_dir_keeps_counting_epsilon(
    tmp_path: Path, client_data: list[Path], procs: list[Any]
) -> None:
    # every round needs both replies: the round site-0 dies in fails (the model unchanged),
    # and the next waits for site-0 to come back
    config = server_config(
        tmp_path,
        rounds=4,
        min_clients=2,
        min_results=2,
        max_failed_rounds=2,
        round_timeout=20.0,
        training={"batch_size": BATCH},
    )
    client_toml = tmp_path / "client.toml"
    client_toml.write_text(
        "retry_initial = 0.2\nretry_max = 1.0\nretry_timeout = 120.0\n"
        f"[dp_sgd]\nclip = 1.0\nnoise_multiplier = {SIGMA}\ndelta = {DELTA}\n"
    )
    state_dir = tmp_path / "site-0-state"

    def start(index: int) -> Tail:
        extra = ["--config", str(client_toml), "--state-dir", str(state_dir)] if index == 0 else []
        proc = spawn_client(config.port, f"site-{index}", client_data[index], *extra)
        procs.append(proc)
        return Tail(proc)

    server = Tail(spawn_server(config))
    procs.append(server.proc)
    first, site_1 = start(0), start(1)
    first.wait(lambda line: "round 2:" in line and "steps" in line)  # its state is saved
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(WAIT)
    second = start(0)
    restored = second.wait(lambda line: "this run already spent" in line)
    for tail in (server, second, site_1):
        code = tail.proc.wait(WAIT)
        assert code == 0, f"pid {tail.proc.pid} exited {code}: {tail.text()[-3000:]}"

    before = sum(int(n) for _, n in STEPS.findall(first.text()))
    after = sum(int(n) for _, n in STEPS.findall(second.text()))
    spent = int(re.search(r"already spent (\d+) steps", restored).group(1))  # type: ignore[union-attr]
    per_round = int(STEPS.findall(first.text())[0][1])
    # every step it logged before the kill, and at most one round more (saved, then killed
    # before it could log it)
    assert before >= 2 * per_round and spent in (before, before + per_round)
    lines = (Path(config.output_dir) / "clients.jsonl").read_text().splitlines()
    site_0 = [json.loads(x) for x in lines if '"site-0"' in x and "sample_epsilon" in x]
    q = min(1.0, BATCH / site_0[-1]["n_samples"])
    reported = site_0[-1]["sample_epsilon"]
    assert reported == pytest.approx(library_epsilon(q, SIGMA, spent + after, DELTA), rel=1e-9)
    assert reported > library_epsilon(q, SIGMA, after, DELTA) * 1.05  # not counted from 0
