"""Buffered aggregators in the round loop: an in-process simulation with median aggregation,
a poisoned client that averaging follows and median and Krum do not, and spilled replies that
change nothing and leave no file behind."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from fedpipe.common.aggregators import Aggregator, SumAggregator
from fedpipe.common.aggregators.replies import ReplyBuffer
from fedpipe.common.config import PartitionConfig, SimulationConfig
from fedpipe.common.training import RunSetup, TrainResult
from fedpipe.common.vector import ArraySpec
from fedpipe.server.clients import RoundTask
from fedpipe.server.simulation import simulate
from fedpipe.server.transports.inprocess import InProcessClient
from tests.server.test_rounds import _pool_run, sim_config


class SignFlipper(InProcessClient):
    """Trains honestly, then sends ``-10 x`` its update, well formed, with its true counts."""

    async def initialize(self, setup: RunSetup, specs: Mapping[str, ArraySpec]) -> None:
        await super().initialize(setup, specs)
        self.aggregator: Aggregator = self.trainer.aggregator
        self.trainer.aggregator = SumAggregator()  # the raw update comes back

    async def train(self, task: RoundTask) -> TrainResult:
        result = await super().train(task)
        update = result.partial.vector("sum").mul_(-10.0)
        partial = self.aggregator.prepare(update, result.n_samples, result.n_steps)
        return dataclasses.replace(result, partial=partial)


def five_clients(tmp_path: Path, aggregator: Any) -> SimulationConfig:
    """Five clients on an IID split of digits, 8 rounds."""
    sim = sim_config(tmp_path, aggregator=aggregator, min_clients=5, rounds=8)
    return sim.model_copy(update={"n_clients": 5, "partition": PartitionConfig(scheme="iid")})


def run_with(tmp_path: Path, aggregator: Any, *, poisoned: bool) -> Any:
    sim = five_clients(tmp_path, aggregator)
    run, pool = _pool_run(sim)
    if poisoned:
        honest = pool.clients()[0]
        assert isinstance(honest, InProcessClient)
        flipper = SignFlipper(honest.name, honest.train_data, honest.eval_data, honest._models)
        asyncio.run(pool.remove(honest))
        asyncio.run(pool.add(flipper))
    with run:
        return asyncio.run(run.run())


def test_median_aggregation_reaches_accuracy_on_non_iid_digits(tmp_path: Path) -> None:
    summary = simulate(sim_config(tmp_path, aggregator="median"))
    assert summary.status == "completed"
    assert [r["replied"] for r in summary.history] == [8] * 10
    assert summary.history[-1]["accuracy"] >= 0.85


@pytest.mark.parametrize(
    "aggregator", ["median", ["krum", {"f": 1, "m": 2}], ["fltrust", {"samples": 100}]]
)
def test_one_sign_flipped_client_in_five_breaks_averaging_not_median_krum_or_fltrust(
    tmp_path: Path, aggregator: Any
) -> None:
    clean = run_with(tmp_path / "clean", "averaging", poisoned=False)
    averaged = run_with(tmp_path / "avg", "averaging", poisoned=True)
    robust = run_with(tmp_path / "robust", aggregator, poisoned=True)
    clean_accuracy = clean.history[-1]["accuracy"]  # 0.944 when written
    assert clean_accuracy >= 0.9
    assert averaged.history[-1]["accuracy"] < 0.3  # 0.044: the flipped update wins the mean
    # 0.938 median, 0.936 Krum, 0.940 FLTrust (100 root samples) when written
    assert robust.history[-1]["accuracy"] >= clean_accuracy - 0.02


def test_replies_past_the_budget_are_spilled_bit_identically_and_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spilled: list[Path] = []
    spill = ReplyBuffer._spill

    def spy(buffer: ReplyBuffer, update: Any) -> Any:
        row = spill(buffer, update)
        assert (
            buffer.directory is not None and buffer.directory.parent == tmp_path / "small" / "run"
        )
        spilled.append(buffer.directory)
        return row

    monkeypatch.setattr(ReplyBuffer, "_spill", spy)
    spec = ["trimmed-mean", {"beta": 0.25}]
    roomy = simulate(sim_config(tmp_path / "roomy", aggregator=spec, rounds=3))
    assert not spilled
    small = simulate(
        sim_config(tmp_path / "small", aggregator=spec, rounds=3, aggregation_memory_bytes=3000)
    )
    assert len(spilled) == 3 * 7  # softmax-regression 64x10: 2,600 bytes, one reply in memory
    assert small.weights.array_equal(roomy.weights)
    assert not any(p.exists() for p in spilled)
    assert not list((tmp_path / "small" / "run").glob(".aggregation-*"))
