"""Metrics files: JSON lines as rounds end, a CSV whose columns grow when needed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from fedpipe.common.config import EarlyStopConfig
from fedpipe.server.history import EarlyStopping, History


def test_csv_gains_columns_when_evaluation_starts_and_keeps_every_row(tmp_path: Path) -> None:
    history = History(tmp_path)
    history.append({"round": 1, "train_loss": 0.9, "clients": ["a", "b"]})
    history.append({"round": 2, "train_loss": 0.7, "accuracy": 0.8, "clients": ["a"]})
    history.append({"round": 3, "train_loss": 0.6, "clients": ["b"]})
    with open(tmp_path / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["round"] for r in rows] == ["1", "2", "3"]
    assert [r["accuracy"] for r in rows] == ["", "0.8", ""]
    assert "clients" not in rows[0]  # lists stay in the JSON lines
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[1] == {"round": 2, "train_loss": 0.7, "accuracy": 0.8, "clients": ["a"]}


def test_early_stopping_counts_evaluations_without_improvement() -> None:
    stop = EarlyStopping(EarlyStopConfig(metric="loss", patience=2, min_delta=0.01))
    assert [stop.update(v) for v in (1.0, 0.5, 0.495, 0.49, 0.3)] == [
        False,
        False,
        False,
        True,
        False,
    ]
    maximize = EarlyStopping(EarlyStopConfig(metric="accuracy", mode="max", patience=1))
    assert [maximize.update(v) for v in (0.5, 0.6, 0.6)] == [False, False, True]


def test_a_resumed_history_drops_rounds_past_the_checkpoint_and_keeps_client_lists(
    tmp_path: Path,
) -> None:
    history = History(tmp_path)
    for number in (1, 2, 3):  # round 3 was written, then the server died before its checkpoint
        history.append({"round": number, "train_loss": 1.0 / number, "clients": ["a", "b"]})
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 4, "train_lo')  # torn by the kill
    checkpointed = [{"round": 1, "train_loss": 1.0}, {"round": 2, "train_loss": 0.5}]
    resumed = History.resumed(tmp_path, checkpointed)
    resumed.append({"round": 3, "train_loss": 0.25, "clients": ["a"]})  # the replayed round
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2, 3]
    assert lines[1]["clients"] == ["a", "b"]  # the checkpoint leaves the lists out
    assert lines[2] == {"round": 3, "train_loss": 0.25, "clients": ["a"]}
    with open(tmp_path / "metrics.csv") as fh:
        assert [r["train_loss"] for r in csv.DictReader(fh)] == ["1.0", "0.5", "0.25"]


def test_a_resumed_history_rewrites_a_line_the_crash_lost(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"round": 1, "train_loss": 1.0}\n')
    History.resumed(tmp_path, [{"round": 1, "train_loss": 1.0}, {"round": 2, "train_loss": 0.5}])
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"round": 1, "train_loss": 1.0}, {"round": 2, "train_loss": 0.5}]
