"""In-process clients training inline take turns: a round holds two replies at a time however
many clients it has, the weights are those of clients all training before any fold, and a
client that fails gives its turn back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from fedpipe.common.config import SimulationConfig
from fedpipe.common.data import load_source
from fedpipe.common.training import TrainResult
from fedpipe.server.clients import ClientError, ClientPool, RoundTask
from fedpipe.server.rounds import FederatedRun, RunSummary
from fedpipe.server.simulation import client_datasets, complete_model_config
from fedpipe.server.transports import inprocess
from fedpipe.server.transports.inprocess import InProcessClient, SharedModels

CLIENTS = 10


class CountingClient(InProcessClient):
    """Counts the replies trained and not yet released by the round loop."""

    held: ClassVar[set[str]] = set()
    peak: ClassVar[int] = 0

    async def train(self, task: RoundTask) -> TrainResult:
        result = await super().train(task)
        CountingClient.held.add(self.name)
        CountingClient.peak = max(CountingClient.peak, len(CountingClient.held))
        return result

    async def release(self) -> None:
        CountingClient.held.discard(self.name)
        await super().release()


class FailsAfterTraining(InProcessClient):
    async def train(self, task: RoundTask) -> TrainResult:
        await super().train(task)
        raise ClientError(f"{self.name} lost its reply")


class FailsWhileTraining(InProcessClient):
    async def train(self, task: RoundTask) -> TrainResult:
        def work() -> TrainResult:
            raise ClientError(f"{self.name} cannot train")

        return await self._run(task, work)


def sim_config(out: Path) -> SimulationConfig:
    return SimulationConfig.model_validate(
        {
            "n_clients": CLIENTS,
            "server": {
                "rounds": 3,
                "min_clients": CLIENTS,
                "min_results": 1,
                "round_timeout": 20,
                "client_optimizer": {"lrate": 0.3},
                "training": {"epochs": 1, "batch_size": 16, "max_steps": 3},
                "output_dir": str(out),
            },
        }
    )


def run(out: Path, kinds: dict[str, type[InProcessClient]]) -> RunSummary:
    sim = sim_config(out)
    clients = client_datasets(sim)
    server = complete_model_config(sim.server, load_source(sim.dataset))

    async def go() -> RunSummary:
        pool, models = ClientPool(), SharedModels()
        for name, train, test in clients:
            await pool.add(kinds.get(name, CountingClient)(name, train, test, models))
        return await FederatedRun(server, pool).run()

    return asyncio.run(go())


def final_weights(out: Path) -> dict[str, np.ndarray]:
    with np.load(out / "model.npz") as data:
        return {name: data[name] for name in data.files}


@pytest.fixture(autouse=True)
def fresh_counts() -> None:
    CountingClient.held, CountingClient.peak = set(), 0


@pytest.fixture
def two_turns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inprocess, "INLINE_REPLY_BYTES", 1)  # any model: two turns


def test_turns_hold_64_mib_of_replies_at_least_two_at_most_64() -> None:
    assert inprocess.inline_turns(400 << 20) == 2  # a 100M-parameter float32 model
    assert inprocess.inline_turns(4 << 20) == 16
    assert inprocess.inline_turns(4040) == 64  # Linear(100, 10)
    assert inprocess.inline_turns(0) == 64


def test_a_round_holds_two_replies_and_trains_the_same_weights_as_all_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, two_turns: None
) -> None:
    summary = run(tmp_path / "turns", {})
    assert summary.status == "completed"
    assert CountingClient.peak == 2
    assert [r["replied"] for r in summary.history] == [CLIENTS] * 3

    CountingClient.peak = 0
    monkeypatch.setattr(inprocess, "INLINE_REPLY_BYTES", 1 << 40)  # every client, then folds
    monkeypatch.setattr(inprocess, "MAX_INLINE_TURNS", CLIENTS)
    all_at_once = run(tmp_path / "all", {})
    assert CountingClient.peak == CLIENTS
    ours, theirs = final_weights(tmp_path / "turns"), final_weights(tmp_path / "all")
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name])
    assert [r["train_loss"] for r in summary.history] == [
        r["train_loss"] for r in all_at_once.history
    ]


def test_clients_that_fail_give_their_turn_back(tmp_path: Path, two_turns: None) -> None:
    failing: dict[str, type[InProcessClient]] = {
        "client-1": FailsAfterTraining,
        "client-2": FailsWhileTraining,
        "client-4": FailsAfterTraining,
        "client-5": FailsWhileTraining,
    }
    start = time.perf_counter()
    summary = run(tmp_path, failing)
    assert time.perf_counter() - start < 15  # no round waited for its deadline (20 s)
    assert summary.status == "completed"
    for record in summary.history:
        assert record["replied"] == CLIENTS - len(failing)
        assert not set(record["clients"]) & set(failing)
    assert CountingClient.peak == 2


def test_the_clients_of_an_evaluation_take_turns_too(tmp_path: Path, two_turns: None) -> None:
    sim = sim_config(tmp_path)
    sim = sim.model_copy(update={"eval_fraction": 0.2})
    clients = client_datasets(sim)
    server = complete_model_config(sim.server, load_source(sim.dataset))
    server = server.model_copy(update={"eval_every": 1})
    evaluated: list[str] = []

    class Evaluating(CountingClient):
        async def evaluate(self, task: RoundTask) -> Any:
            result = await super().evaluate(task)
            evaluated.append(self.name)
            return result

    async def go() -> RunSummary:
        pool, models = ClientPool(), SharedModels()
        for name, train, test in clients:
            await pool.add(Evaluating(name, train, test, models))
        return await FederatedRun(server, pool).run()

    summary = asyncio.run(go())
    assert summary.status == "completed"
    assert len(evaluated) == 3 * CLIENTS
    assert all("loss" in record for record in summary.history)
