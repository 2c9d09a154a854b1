"""best_model.npz: the weights of the best round by the chosen metric, kept across a resume."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedpipe.common.config import ConfigError, ServerConfig, SimulationConfig
from fedpipe.common.summable import Summable
from fedpipe.common.training import TrainResult
from fedpipe.common.vector import Vector
from fedpipe.server.checkpoint import load_checkpoint
from fedpipe.server.clients import ClientPool, RoundTask
from fedpipe.server.rounds import FederatedRun, RunSummary
from fedpipe.server.simulation import client_datasets, complete_model_config
from fedpipe.server.transports.inprocess import InProcessClient, SharedModels

SABOTAGE_FROM = 4  # the round from which one client sends a destructive update


class SabotagingClient(InProcessClient):
    """Trains honestly, then from ``SABOTAGE_FROM`` on sends its update times -30: the
    global model's accuracy peaks before that round and falls after it."""

    async def train(self, task: RoundTask) -> TrainResult:
        result = await super().train(task)
        if task.round_number >= SABOTAGE_FROM:
            fields = result.partial.fields.items()
            result.partial = Summable(
                {k: v * -30.0 if isinstance(v, Vector) else v for k, v in fields}
            )
        return result


def config(out: Path, rounds: int, **server: Any) -> SimulationConfig:
    return SimulationConfig.model_validate(
        {
            "n_clients": 4,
            "partition": {"scheme": "iid"},
            "server": {
                "rounds": rounds,
                "min_clients": 4,
                "client_optimizer": {"lrate": 0.1},
                "training": {"epochs": 1, "batch_size": 32},
                "output_dir": str(out),
                "best_metric": "accuracy",
                "best_mode": "max",
                **server,
            },
        }
    )


def run_with_snapshots(
    sim: SimulationConfig, *, resume: bool = False
) -> tuple[RunSummary, dict[int, Vector]]:
    """Run ``sim`` (client 0 sabotages); the checkpointed weights of every round it ran."""
    clients = client_datasets(sim)
    server = complete_model_config(sim.server, clients[0][1])
    out = Path(server.output_dir)
    snapshots: dict[int, Vector] = {}

    def on_round(record: dict[str, Any]) -> None:
        state = load_checkpoint(out / "checkpoint.fpk")
        assert state["round"] == record["round"]
        snapshots[record["round"]] = state["weights"]  # type: ignore[assignment]

    async def go() -> RunSummary:
        pool, models = ClientPool(), SharedModels()
        for i, (name, train, test) in enumerate(clients):
            kind = SabotagingClient if i == 0 else InProcessClient
            await pool.add(kind(name, train, test, models))
        return await FederatedRun(server, pool, on_round=on_round, resume=resume).run()

    return asyncio.run(go()), snapshots


def saved(path: Path) -> Vector:
    with np.load(path, allow_pickle=False) as npz:
        return Vector({name: npz[name] for name in npz.files})


def bit_equal(a: Vector, b: Vector) -> bool:
    """Same names, dtypes, shapes and bytes."""
    return a.specs() == b.specs() and all(
        a.coefs[k].tobytes() == b.coefs[k].tobytes() for k in a.coefs
    )


def test_the_best_round_is_kept_when_accuracy_peaks_then_drops(tmp_path: Path) -> None:
    summary, snapshots = run_with_snapshots(config(tmp_path / "run", rounds=6))
    accuracy = [r["accuracy"] for r in summary.history]
    best = int(np.argmax(accuracy)) + 1
    assert best < SABOTAGE_FROM and accuracy[-1] < accuracy[best - 1] - 0.2, accuracy
    out = tmp_path / "run"
    assert bit_equal(saved(out / "best_model.npz"), snapshots[best])
    assert not bit_equal(saved(out / "model.npz"), snapshots[best])
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["best_metric"] == "accuracy" and on_disk["best_mode"] == "max"
    assert on_disk["best_round"] == best and on_disk["best_value"] == accuracy[best - 1]


def test_the_best_round_survives_a_resume_even_without_its_file(tmp_path: Path) -> None:
    straight, snapshots = run_with_snapshots(config(tmp_path / "straight", rounds=6))
    out = tmp_path / "resumed"
    run_with_snapshots(config(out, rounds=SABOTAGE_FROM - 1))
    best = json.loads((out / "summary.json").read_text())["best_round"]
    assert best == SABOTAGE_FROM - 1  # still improving: the best is the checkpoint's round
    # A crash between the checkpoint and best_model.npz: the resume writes it again.
    (out / "best_model.npz").unlink()
    resumed, _ = run_with_snapshots(config(out, rounds=6), resume=True)
    assert resumed.best == straight.best and resumed.best["best_round"] == best
    assert bit_equal(saved(out / "best_model.npz"), snapshots[best])


def test_best_metric_defaults_and_errors(tmp_path: Path) -> None:
    model = {"config": {"n_features": 4, "n_classes": 3}}

    def run(**fields: Any) -> FederatedRun:
        return FederatedRun(
            ServerConfig.model_validate({"output_dir": str(tmp_path), "model": model, **fields}),
            ClientPool(),
            overwrite=True,
        )

    best = run().best
    assert best is not None and (best.metric, best.mode) == ("loss", "min")
    early = {"metric": "accuracy", "mode": "max"}
    best = run(early_stop=early).best
    assert best is not None and (best.metric, best.mode) == ("accuracy", "max")
    best = run(best_metric="accuracy", early_stop=early).best  # the mode of the early stop
    assert best is not None and best.mode == "max"
    assert run(eval_every=0).best is None  # no evaluation: no metric to rank rounds by
    with pytest.raises(ConfigError, match=r"best_metric='acuracy' is not a metric of this run"):
        run(best_metric="acuracy", best_mode="max")
    with pytest.raises(ValueError, match="best_metric='accuracy' needs best_mode: 'max' if"):
        run(best_metric="accuracy")
