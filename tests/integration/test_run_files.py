"""A real ``fedpipe server`` and ``fedpipe client`` processes leave a run one can look at:
clients.jsonl, best_model.npz, a summary naming the best round; and a second server refuses
the directory unless told to overwrite it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from fedpipe.common.outcome import ExitCode
from tests.integration.conftest import finish, server_config, spawn_client


def test_server_and_client_processes_write_clients_jsonl_and_the_best_model(
    tmp_path: Path, client_data: list[Path], processes: list[subprocess.Popen[str]]
) -> None:
    config = server_config(
        tmp_path, rounds=3, min_clients=3, best_metric="accuracy", best_mode="max"
    )
    path = tmp_path / "server.json"
    path.write_text(config.model_dump_json())
    command = [sys.executable, "-m", "fedpipe", "server", "--config", str(path)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    processes.append(server)
    clients = [spawn_client(config.port, f"site-{i}", client_data[i]) for i in range(3)]
    processes += clients
    code, out = finish(server, 120)
    assert code == 0, out
    assert [finish(c)[0] for c in clients] == [0, 0, 0]

    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lines = [json.loads(line) for line in (run / "clients.jsonl").read_text().splitlines()]
    assert sorted((x["round"], x["client"]) for x in lines) == [
        (r, f"site-{i}") for r in (1, 2, 3) for i in range(3)
    ]
    for line in lines:
        assert line["replied"] and line["n_samples"] > 0 and line["n_eval_samples"] > 0
        assert 0.0 <= line["accuracy"] <= 1.0 and line["train_loss"] > 0.0
    accuracy = [r["accuracy"] for r in records]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["best_round"] == int(np.argmax(accuracy)) + 1
    assert summary["best_value"] == max(accuracy)
    with np.load(run / "best_model.npz", allow_pickle=False) as best:
        assert sorted(best.files) == ["bias", "kernel"] and np.isfinite(best["kernel"]).all()

    # The same command again: the run is refused, before any port opens.
    again = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert again.returncode == ExitCode.USAGE
    assert f"{run} already holds a run (" in again.stderr and "--overwrite" in again.stderr
    assert (run / "clients.jsonl").read_text().count("\n") == 9
