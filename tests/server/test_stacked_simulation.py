"""The stacked mode of the in-process simulation (numpy models): the same run as client by
client, bit for bit, and the same per-client records; a fallback says why once."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedpipe.cli import main
from fedpipe.common.config import SimulationConfig
from fedpipe.common.data import Dataset
from fedpipe.common.stacked import StackedTrainer
from fedpipe.server.rounds import RunSummary
from fedpipe.server.simulation import simulate_inprocess

F = 6
SIZES = [11, 5, 16, 3, 9, 8]


def clients(poisoned: int | None = None) -> list[tuple[str, Dataset, Dataset | None]]:
    rng = np.random.default_rng(1)
    out = []
    for i, n in enumerate(SIZES):
        x = rng.standard_normal((n, F)).astype(np.float32)
        if i == poisoned:
            x[0, 0] = np.nan
        out.append((f"c{i}", Dataset(x, rng.integers(0, 3, n)), None))
    return out


def run(
    tmp: Path,
    mode: str,
    model: dict[str, Any],
    optimizer: dict[str, Any],
    data: list[tuple[str, Dataset, Dataset | None]] | None = None,
    stack_clients: int = 1024,
) -> tuple[RunSummary, list[dict[str, Any]]]:
    out = tmp / mode
    sim = SimulationConfig.model_validate(
        {
            "n_clients": len(SIZES),
            "mode": mode,
            "stack_clients": stack_clients,
            "server": {
                "rounds": 3,
                "min_clients": len(SIZES),
                "eval_every": 0,
                "model": model,
                "client_optimizer": optimizer,
                "training": {"epochs": 2, "batch_size": 4},
                "output_dir": str(out),
            },
        }
    )
    summary = asyncio.run(simulate_inprocess(sim, data or clients()))
    lines = [json.loads(line) for line in (out / "clients.jsonl").read_text().splitlines()]
    for line in lines:  # timings differ
        line.pop("seconds", None)
        line.pop("train_seconds", None)
    return summary, lines


options_clients: list[list[tuple[str, Dataset, Dataset | None]]] = []

SOFTMAX = {"name": "softmax-regression", "config": {"n_features": F, "n_classes": 3}}
MLP = {"name": "mlp", "config": {"n_features": F, "hidden": [5], "n_classes": 3}}


def assert_same(a: RunSummary, b: RunSummary) -> None:
    assert a.status == b.status == "completed"
    for name, w in a.weights.coefs.items():
        np.testing.assert_array_equal(b.weights.coefs[name], w)
    assert [r.get("train_loss") for r in a.history] == [r.get("train_loss") for r in b.history]


@pytest.mark.parametrize(
    ("model", "optimizer", "stack_clients"),
    [
        (SOFTMAX, {"lrate": 0.2}, 1024),
        (MLP, {"lrate": 0.1, "w_decay": 0.01}, 4),  # two chunks, the sum carried across
    ],
)
def test_stacked_run_is_the_client_by_client_run_bit_for_bit(
    tmp_path: Path, model: dict[str, Any], optimizer: dict[str, Any], stack_clients: int
) -> None:
    sequential, seq_lines = run(tmp_path, "sequential", model, optimizer)
    stacked, lines = run(tmp_path, "auto", model, optimizer, stack_clients=stack_clients)
    assert_same(sequential, stacked)
    assert lines == seq_lines
    assert {line["n_steps"] for line in lines} == {2, 4, 6, 8}  # ragged sizes and batches


def test_a_pipeline_with_a_module_trains_client_by_client_saying_why_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    optimizer = {"lrate": 0.1, "modules": ["momentum"]}
    sequential, _ = run(tmp_path, "sequential", MLP, optimizer)
    with caplog.at_level(logging.INFO, logger="fedpipe.server.cohorts"):
        fallback, _ = run(tmp_path, "vectorized", MLP, optimizer)
    assert_same(sequential, fallback)
    said = [r.getMessage() for r in caplog.records if "stacked training off" in r.getMessage()]
    assert said == [
        "stacked training off, clients train one after another: client optimizer module "
        "'momentum' runs client by client"
    ]


def test_a_non_finite_client_is_left_out_as_client_by_client(tmp_path: Path) -> None:
    sequential, seq_lines = run(tmp_path, "sequential", SOFTMAX, {"lrate": 0.2}, clients(2))
    stacked, lines = run(tmp_path, "auto", SOFTMAX, {"lrate": 0.2}, clients(2))
    assert_same(sequential, stacked)
    assert lines == seq_lines
    assert lines[2]["error"] == "rejected reply: field 'weighted_sum' holds NaN or infinite values"
    assert [r["replied"] for r in stacked.history] == [5, 5, 5]


def test_fedpipe_simulate_from_toml_stacks_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained: list[int] = []
    engine = StackedTrainer.train

    def spy(self: StackedTrainer, jobs: list[Any], *args: Any) -> Any:
        trained.append(len(jobs))
        return engine(self, jobs, *args)

    monkeypatch.setattr(StackedTrainer, "train", spy)
    config = tmp_path / "sim.toml"
    config.write_text(
        "n_clients = 5\n"
        'dataset = "digits"\n'
        "[server]\nrounds = 2\nmin_clients = 5\n"
        '[server.model]\nname = "softmax-regression"\n'
        "[server.training]\nbatch_size = 16\n"
    )
    weights = {}
    for mode in ("sequential", "auto"):
        out = tmp_path / mode
        args = ["simulate", "--config", str(config), "--output-dir", str(out)]
        assert main([*args, "--set", f'mode="{mode}"']) == 0
        assert json.loads((out / "summary.json").read_text())["status"] == "completed"
        with np.load(out / "model.npz") as npz:
            weights[mode] = {k: npz[k] for k in npz.files}
    for name, w in weights["sequential"].items():
        np.testing.assert_array_equal(weights["auto"][name], w)
    assert trained == [5, 5]  # the default mode's rounds, all clients at once


def test_data_the_stacked_engine_rejects_fails_that_client_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def bad_labels() -> list[tuple[str, Dataset, Dataset | None]]:
        data = clients()
        name, train, _ = data[4]
        data[4] = (name, Dataset(train.x, np.full(len(train), 7)), None)  # 3 classes
        return data

    sequential, seq_lines = run(tmp_path, "sequential", SOFTMAX, {"lrate": 0.2}, bad_labels())
    with caplog.at_level(logging.WARNING, logger="fedpipe.server.stacked_cohort"):
        stacked, lines = run(tmp_path, "auto", SOFTMAX, {"lrate": 0.2}, bad_labels())
    assert_same(sequential, stacked)
    assert lines == seq_lines
    assert "integer class ids" in lines[4]["error"]
    assert "stacked training of 6 client(s) failed (ValueError" in caplog.text
