"""How a run ends, with in-process proxies: deadlines against threaded folds, final files
before clients are told, runs that never completed a round."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedpipe.common.config import ServerConfig
from fedpipe.common.summable import Summable
from fedpipe.common.training import EvalResult, RunSetup, TrainResult
from fedpipe.common.vector import ArraySpec, Vector
from fedpipe.server import rounds
from fedpipe.server.clients import ClientError, ClientPool, ClientProxy, RoundTask, RunOutcome


class Fixed(ClientProxy):
    """Replies ``value`` everywhere after ``delay`` seconds (or fails); records its outcome."""

    def __init__(
        self, name: str, value: float, delay: float = 0.0, fail: bool | set[int] = False
    ) -> None:
        self.name, self.value, self.delay, self.fail = name, value, delay, fail
        self.n_train_samples = 10
        self.outcome: RunOutcome | None = None

    async def initialize(self, setup: RunSetup, specs: Mapping[str, ArraySpec]) -> None:
        return None

    async def train(self, task: RoundTask) -> TrainResult:
        await asyncio.sleep(self.delay)
        if self.fail is True or (self.fail and task.round_number in self.fail):
            raise ClientError(f"client {self.name}: out of memory")
        update = Vector({k: np.full_like(v, self.value) for k, v in task.weights.coefs.items()})
        partial = Summable({"weighted_sum": update * 10.0, "total_weight": 10.0})
        return TrainResult(partial, {}, 10, 1, 1.0, n_samples_seen=10)

    async def evaluate(self, task: RoundTask) -> EvalResult:
        raise ClientError("no evaluation data")

    async def stop(self, outcome: RunOutcome) -> None:
        self.outcome = outcome


def config(tmp_path: Path, **overrides: Any) -> ServerConfig:
    data: dict[str, Any] = {
        "rounds": 1,
        "min_clients": 2,
        "round_timeout": 10.0,
        "eval_every": 0,
        "server_optimizer": {"lrate": 1.0},
        "model": {"name": "softmax-regression", "config": {"n_features": 4, "n_classes": 3}},
        "output_dir": str(tmp_path / "run"),
    }
    data.update(overrides)
    return ServerConfig.model_validate(data)


async def run_with(cfg: ServerConfig, *clients: Fixed) -> rounds.RunSummary:
    pool = ClientPool()
    for client in clients:
        await pool.add(client)
    return await rounds.FederatedRun(cfg, pool).run()


def test_the_deadline_never_aggregates_a_half_added_reply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every fold runs in a worker thread (as for a model of a million weights), slowed so
    # that the round deadline passes while b's reply is being added.
    monkeypatch.setattr(rounds, "INLINE_ADD_ELEMENTS", 0)
    add = Vector.add_

    def slow_add(self: Vector, other: Any, alpha: float = 1.0) -> Vector:
        out = add(self, other, alpha)
        time.sleep(0.6)
        return out

    monkeypatch.setattr(Vector, "add_", slow_add)
    pool = ClientPool()
    for client in (Fixed("a", 1.0), Fixed("b", 3.0, delay=0.6)):
        asyncio.run(pool.add(client))
    run = rounds.FederatedRun(config(tmp_path, min_results=1, round_timeout=1.0), pool)
    before = run.model.weights.copy()
    summary = asyncio.run(run.run())
    record = summary.history[0]
    moved = summary.weights.copy().add_(before, -1.0)
    weights = np.concatenate([w.ravel() for w in moved.coefs.values()])
    # The global model moved by minus the average of the replies the record names.
    expected = -np.mean([{"a": 1.0, "b": 3.0}[name] for name in record["clients"]])
    assert record["replied"] == len(record["clients"])
    np.testing.assert_allclose(weights, expected)


def test_clients_hear_the_outcome_summary_json_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(path: Path, weights: Vector) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rounds, "save_model", disk_full)
    clients = Fixed("a", 1.0), Fixed("b", 1.0)
    summary = asyncio.run(run_with(config(tmp_path), *clients))
    assert summary.status == "failed" and "No space left on device" in summary.reason
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["status"] == "failed" and on_disk["reason"] == summary.reason
    assert [c.outcome for c in clients] == [RunOutcome("failed", summary.reason)] * 2


def test_a_run_in_which_no_round_completed_failed_whatever_the_allowance(tmp_path: Path) -> None:
    cfg = config(tmp_path, rounds=3, max_failed_rounds=3, round_timeout=2.0)
    summary = asyncio.run(run_with(cfg, Fixed("a", 1.0, fail=True), Fixed("b", 1.0, fail=True)))
    assert [r["failed"] for r in summary.history] == ["too few results"] * 3
    assert summary.status == "failed" and summary.rounds_completed == 0
    assert summary.reason == "no round completed (every round failed)"


def test_a_resumed_run_has_no_fresh_allowance_of_failed_rounds(tmp_path: Path) -> None:
    cfg = config(tmp_path, rounds=2, min_results=2, max_failed_rounds=1, round_timeout=2.0)
    first = asyncio.run(run_with(cfg, Fixed("a", 1.0), Fixed("b", 1.0, fail={1, 3})))
    assert first.status == "completed" and first.rounds_completed == 1
    more = cfg.model_copy(update={"rounds": 3})
    pool = ClientPool()
    for client in (Fixed("a", 1.0), Fixed("b", 1.0, fail={1, 3})):
        asyncio.run(pool.add(client))
    resumed = asyncio.run(rounds.FederatedRun(more, pool, resume=True).run())
    # Round 3 is the run's second failed round: past max_failed_rounds=1, resumed or not.
    assert resumed.status == "failed" and resumed.reason.startswith("round 3: too few results")
    assert resumed.rounds_completed == 1
