"""The round loop with in-process clients: algorithms, deadlines, bad replies, checkpoints."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedpipe.common.config import ConfigError, ServerConfig, SimulationConfig
from fedpipe.common.summable import Summable
from fedpipe.common.training import EvalResult, RunSetup, TrainResult
from fedpipe.common.vector import ArraySpec, Vector
from fedpipe.server.checkpoint import MAGIC, CheckpointError, load_checkpoint
from fedpipe.server.clients import ClientError, ClientPool, ClientProxy, RoundTask, RunOutcome
from fedpipe.server.rounds import FederatedRun, RunError
from fedpipe.server.simulation import client_datasets, complete_model_config, simulate
from fedpipe.server.transports.inprocess import InProcessClient, SharedModels


def sim_config(tmp_path: Path, **server: Any) -> SimulationConfig:
    base: dict[str, Any] = {
        "rounds": 10,
        "min_clients": 8,
        "model": {"name": "softmax-regression"},
        "client_optimizer": {"lrate": 0.5},
        "training": {"epochs": 2, "batch_size": 16},
        "output_dir": str(tmp_path / "run"),
    }
    base.update(server)
    return SimulationConfig.model_validate(
        {
            "n_clients": 8,
            "dataset": "digits",
            "partition": {"scheme": "dirichlet", "alpha": 0.3, "seed": 1},
            "server": base,
        }
    )


ALGORITHMS = {
    "fedavg": ({}, 0.90),
    "fedprox": (
        {"client_optimizer": {"lrate": 0.5, "regularizers": [["fedprox", {"mu": 0.1}]]}},
        0.90,
    ),
    "scaffold": (
        {
            "client_optimizer": {"lrate": 0.2, "modules": ["scaffold-client"]},
            "server_optimizer": {"lrate": 1.0, "modules": ["scaffold-server"]},
        },
        0.90,
    ),
    "fedadam": (
        {
            "server_optimizer": {
                "lrate": 0.05,
                "modules": [["adam", {"beta_1": 0.9, "beta_2": 0.99, "eps": 1e-3}]],
            }
        },
        0.88,
    ),
}


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_algorithm_reaches_accuracy_on_non_iid_digits(tmp_path: Path, algorithm: str) -> None:
    overrides, floor = ALGORITHMS[algorithm]
    summary = simulate(sim_config(tmp_path, **overrides))
    final = summary.history[-1]
    assert final["replied"] == 8
    assert final["accuracy"] >= floor, f"{algorithm}: accuracy {final['accuracy']:.3f} < {floor}"
    assert summary.history[-1]["loss"] < summary.history[0]["loss"]


def test_run_writes_metrics_checkpoint_and_model(tmp_path: Path) -> None:
    summary = simulate(sim_config(tmp_path, rounds=3))
    out = tmp_path / "run"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2, 3]
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("round,") and "accuracy" in csv_lines[0]
    assert len(csv_lines) == 4
    with np.load(out / "model.npz", allow_pickle=False) as npz:
        saved = Vector({name: npz[name] for name in npz.files})
    assert saved.array_equal(summary.weights)
    state = load_checkpoint(out / "checkpoint.fpk")
    assert state["round"] == 3
    assert isinstance(state["weights"], Vector) and state["weights"].array_equal(summary.weights)


def _pool_run(
    sim: SimulationConfig, extra: list[ClientProxy] = ()
) -> tuple[FederatedRun, ClientPool]:  # type: ignore[assignment]
    clients = client_datasets(sim)
    server = complete_model_config(sim.server, clients[0][1])
    pool = ClientPool()
    models = SharedModels()

    async def fill() -> None:
        for name, train, test in clients:
            await pool.add(InProcessClient(name, train, test, models))
        for proxy in extra:
            await pool.add(proxy)

    asyncio.run(fill())
    return FederatedRun(server, pool), pool


def test_resume_continues_exactly_where_the_run_stopped(tmp_path: Path) -> None:
    straight = simulate(sim_config(tmp_path / "a", rounds=4))
    simulate(sim_config(tmp_path / "b", rounds=2))
    sim = sim_config(tmp_path / "b", rounds=4)
    clients = client_datasets(sim)
    server = complete_model_config(sim.server, clients[0][1])

    async def resume() -> Any:
        pool = ClientPool()
        models = SharedModels()
        for name, train, test in clients:
            await pool.add(InProcessClient(name, train, test, models))
        run = FederatedRun(server, pool, resume=True)
        assert run.round == 2
        return await run.run()

    resumed = asyncio.run(resume())
    assert [r["round"] for r in resumed.history] == [1, 2, 3, 4]
    assert resumed.weights.allclose(straight.weights, rtol=1e-6, atol=1e-7)


class SilentClient(ClientProxy):
    """Accepts the setup, then never answers a train task."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.n_train_samples = 10

    async def initialize(self, setup: RunSetup, specs: Mapping[str, ArraySpec]) -> None:
        return None

    async def train(self, task: RoundTask) -> TrainResult:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def evaluate(self, task: RoundTask) -> EvalResult:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def stop(self, outcome: RunOutcome) -> None:
        return None


class BadClient(SilentClient):
    """Answers at once with a poisoned update built by ``make``."""

    def __init__(self, name: str, make: Any) -> None:
        super().__init__(name)
        self.make = make

    async def train(self, task: RoundTask) -> TrainResult:
        return self.make(task.weights)


def _result(partial: Summable) -> TrainResult:
    return TrainResult(partial, {}, 10, 1, 1.0, n_samples_seen=10)


def test_silent_client_does_not_stall_the_round_past_its_deadline(tmp_path: Path) -> None:
    sim = sim_config(tmp_path, rounds=2, round_timeout=1.0, min_clients=9, eval_every=0)
    run, _ = _pool_run(sim, [SilentClient("zz-silent")])
    loop = asyncio.new_event_loop()
    start = loop.time()
    summary = loop.run_until_complete(run.run())
    elapsed = loop.time() - start
    loop.close()
    assert elapsed < 2 * 1.0 + 3.0, f"two rounds took {elapsed:.1f}s with a 1s deadline"
    assert all(r["replied"] == 8 and r["sampled"] == 9 for r in summary.history)
    assert "zz-silent" not in summary.history[-1]["clients"]


@pytest.mark.parametrize(
    "poison, reason",
    [
        (lambda w: _result(Summable({"weighted_sum": w * np.nan, "total_weight": 10.0})), "NaN"),
        (
            lambda w: _result(
                Summable({"weighted_sum": Vector({"w": np.ones(3)}), "total_weight": 1.0})
            ),
            "names differ",
        ),
        (lambda w: _result(Summable({"weighted_sum": w, "total_weight": -5.0})), "non-negative"),
        (lambda w: _result(Summable({"nonsense": w})), "expected"),
    ],
)
def test_poisoned_update_is_rejected_logged_and_the_run_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, poison: Any, reason: str
) -> None:
    sim = sim_config(tmp_path, rounds=2, min_clients=9)
    run, _ = _pool_run(sim, [BadClient("zz-bad", poison)])
    with caplog.at_level(logging.WARNING, logger="fedpipe.server.rounds"):
        summary = asyncio.run(run.run())
    assert summary.weights.is_finite()
    assert all(r["replied"] == 8 for r in summary.history)
    rejected = [r.message for r in caplog.records if "zz-bad" in r.message]
    assert rejected and reason in rejected[0]
    assert summary.history[-1]["accuracy"] > 0.5


def test_too_few_results_keeps_the_model(tmp_path: Path) -> None:
    sim = sim_config(tmp_path, rounds=1, min_clients=1, min_results=1, round_timeout=0.5)
    server = complete_model_config(sim.server, client_datasets(sim)[0][1])
    pool = ClientPool()
    asyncio.run(pool.add(SilentClient("only-silent")))
    run = FederatedRun(server, pool)
    before = run.model.weights.copy()
    summary = asyncio.run(run.run())
    assert summary.history[0]["failed"] == "too few results" and summary.history[0]["replied"] == 0
    assert summary.weights.array_equal(before)


def test_waiting_for_clients_times_out_with_a_clear_error(tmp_path: Path) -> None:
    sim = sim_config(tmp_path, min_clients=3, wait_timeout=0.2)
    server = complete_model_config(sim.server, client_datasets(sim)[0][1])
    summary = asyncio.run(FederatedRun(server, ClientPool()).run())
    assert summary.status == "failed" and summary.rounds_completed == 0
    assert "only 0 of min_clients=3 client(s) connected within wait_timeout=0.2s" in summary.reason
    with pytest.raises(RunError, match="only 0 of min_clients=3 client"):
        summary.raise_for_status()
    on_disk = json.loads((Path(server.output_dir) / "summary.json").read_text())
    assert on_disk["status"] == "failed" and on_disk["reason"] == summary.reason


def test_early_stopping_stops_when_loss_stalls(tmp_path: Path) -> None:
    summary = simulate(
        sim_config(
            tmp_path,
            rounds=30,
            client_optimizer={"lrate": 1e-9},
            early_stop={"metric": "loss", "patience": 2, "min_delta": 1e-3},
        )
    )
    assert len(summary.history) == 3  # round 1 sets the best, 2 stale evaluations stop it


def test_inprocess_clients_keep_their_own_optimizer_state(tmp_path: Path) -> None:
    sim = sim_config(tmp_path, rounds=2, client_optimizer={"lrate": 0.1, "modules": ["adam"]})
    run, pool = _pool_run(sim)
    clients: list[Any] = pool.clients()
    asyncio.run(run.run_round(1))
    batches = [-(-c.n_train_samples // 16) * 2 for c in clients]  # 2 epochs, batch size 16
    assert [c.trainer.optimizer.get_state()["step"] for c in clients] == batches
    asyncio.run(run.run_round(2))
    assert [c.trainer.optimizer.get_state()["step"] for c in clients] == [2 * b for b in batches]
    first, second = (c.trainer.optimizer.get_state()["modules"][0]["state"] for c in clients[:2])
    assert not first["m"].allclose(second["m"])  # each client's Adam moments are its own
    assert clients[0].trainer.model is clients[1].trainer.model  # one shared model object


def test_server_config_rejects_impossible_min_results() -> None:
    with pytest.raises(ValueError, match="min_results=5 exceeds min_clients=2"):
        ServerConfig(min_clients=2, min_results=5)


class WrongModelClient(SilentClient):
    async def initialize(self, setup: RunSetup, specs: Mapping[str, ArraySpec]) -> None:
        raise ClientError("the model built from the setup differs from the server's")


def test_client_that_cannot_initialize_is_dropped_and_not_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sim = sim_config(tmp_path, rounds=1, min_clients=8)
    run, pool = _pool_run(sim, (WrongModelClient("zz-wrong"),))
    assert len(pool) == 9
    with caplog.at_level(logging.WARNING, logger="fedpipe.server.rounds"):
        summary = asyncio.run(run.run())
    assert "zz-wrong" not in pool.names() and len(pool) == 8
    assert summary.history[0]["sampled"] == 8 and summary.history[0]["replied"] == 8
    assert any("zz-wrong could not be initialized" in r.message for r in caplog.records)


def test_a_typo_anywhere_in_the_run_config_fails_before_the_server_starts(tmp_path: Path) -> None:
    base = {"output_dir": str(tmp_path), "model": {"config": {"n_features": 4, "n_classes": 3}}}
    for bad, expected in (
        ({"client_optimizer": {"modules": ["adamw-typo"]}}, "unknown module 'adamw-typo'"),
        ({"metrics": ["acuracy"]}, "unknown metric 'acuracy'"),
        ({"aggregator": ["averaging", {"weighting": "sample"}]}, "weighting='sample'"),
    ):
        with pytest.raises(ConfigError, match="cannot build the run from its config") as err:
            FederatedRun(ServerConfig.model_validate(base | bad), ClientPool())
        assert expected in str(err.value)


def test_a_damaged_checkpoint_says_so(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.fpk"
    path.write_bytes(MAGIC + (5).to_bytes(8, "little") + b"\xff" * 5)
    with pytest.raises(CheckpointError, match="is damaged"):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a fedpipe checkpoint"):
        load_checkpoint(path)


def test_simulated_mlp_regression_gets_no_class_count(tmp_path: Path) -> None:
    from fedpipe.common.data import make_regression

    server = ServerConfig(model={"name": "mlp", "config": {"task": "regression", "n_outputs": 1}})
    config = complete_model_config(server, make_regression(50, 3, seed=0)).model.config
    assert config == {"task": "regression", "n_outputs": 1, "n_features": 3}


class CountingClient(BadClient):
    """Replies a valid zero update and counts the round loop's release() calls."""

    def __init__(self, name: str) -> None:
        super().__init__(
            name, lambda w: _result(Summable({"weighted_sum": w.zeros_like(), "total_weight": 1.0}))
        )
        self.releases = 0

    async def release(self) -> None:
        self.releases += 1


def test_the_round_loop_releases_each_reply_once_it_is_folded(tmp_path: Path) -> None:
    sim = sim_config(tmp_path, rounds=2, min_clients=9, eval_every=0)
    counting = CountingClient("zz-counting")
    run, _ = _pool_run(sim, (counting,))
    summary = asyncio.run(run.run())
    assert all("zz-counting" in r["clients"] for r in summary.history)
    # once right after its reply is folded, once more when the round's collection ends
    assert counting.releases >= 2 * summary.rounds_completed
