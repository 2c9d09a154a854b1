"""Samplers in the round loop: configured by name, empty Poisson rounds, resumed runs that
sample exactly as uninterrupted ones."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from fedpipe.common import registry
from fedpipe.common.config import ConfigError, ServerConfig, SimulationConfig, load_config
from fedpipe.server.checkpoint import CheckpointError, load_checkpoint
from fedpipe.server.clients import ClientPool
from fedpipe.server.rounds import FederatedRun
from fedpipe.server.sampling.base import C, ClientSampler
from fedpipe.server.simulation import client_datasets, complete_model_config, simulate
from fedpipe.server.transports.inprocess import InProcessClient, SharedModels
from tests.server.sim_runs import resume, sim_config


def sampled_by_round(out: Path) -> dict[int, list[str]]:
    """Round -> the clients the round sampled, from ``clients.jsonl``."""
    rounds: dict[int, list[str]] = defaultdict(list)
    for line in (out / "clients.jsonl").read_text().splitlines():
        record = json.loads(line)
        rounds[record["round"]].append(record["client"])
    return {r: sorted(names) for r, names in rounds.items()}


def test_poisson_simulation_completes_through_empty_rounds(tmp_path: Path) -> None:
    q, n = 0.25, 4
    summary = simulate(sim_config(tmp_path, n, sampler=["poisson", {"q": q}]))
    rng = np.random.default_rng(0)  # the run seed: the draws are the run's own
    expected = [int((rng.random(n) < q).sum()) for _ in range(6)]
    assert expected == [2, 0, 1, 2, 0, 2]  # with empty rounds 2 and 5
    assert summary.status == "completed" and summary.rounds_completed == 6
    assert [r["sampled"] for r in summary.history] == expected
    for record in summary.history:
        assert "failed" not in record
        assert record["replied"] == record["sampled"]
    assert summary.history[1] == {
        "round": 2,
        "sampled": 0,
        "replied": 0,
        "clients": [],
        "seconds": summary.history[1]["seconds"],
    }
    assert "train_loss" in summary.history[2] and "accuracy" in summary.history[2]


def test_an_empty_round_leaves_the_model_as_it_was(tmp_path: Path) -> None:
    sim = sim_config(tmp_path, 4, sampler=["poisson", {"q": 0.25}])
    clients = client_datasets(sim)
    server = complete_model_config(sim.server, clients[0][1])

    async def go() -> None:
        pool, models = ClientPool(), SharedModels()
        for name, train, test in clients:
            await pool.add(InProcessClient(name, train, test, models))
        with FederatedRun(server, pool) as run:
            await run.run_round(1, wait_for_all=True)
            before = run.model.weights.copy()
            record = await run.run_round(2)
            assert record["sampled"] == 0 and run.model.weights.array_equal(before)
            assert run.round == 2 and run.completed == 2
            assert load_checkpoint(tmp_path / "checkpoint.fpk")["round"] == 2

    asyncio.run(go())


SAMPLER_SPECS = {
    "uniform": ["uniform", {"fraction": 0.5}],
    "weighted": ["weighted", {"count": 3}],
    "poisson": ["poisson", {"q": 0.4}],
    "power-of-choice": ["power-of-choice", {"d": 5, "m": 3}],
}


@pytest.mark.parametrize("name", sorted(SAMPLER_SPECS))
def test_a_resumed_run_samples_exactly_as_an_uninterrupted_one(tmp_path: Path, name: str) -> None:
    spec = SAMPLER_SPECS[name]
    straight = simulate(sim_config(tmp_path / "straight", 8, sampler=spec))
    simulate(sim_config(tmp_path / "split", 8, sampler=spec, rounds=3))
    resumed = resume(sim_config(tmp_path / "split", 8, sampler=spec, rounds=6))
    assert resumed.status == straight.status == "completed"
    expected = sampled_by_round(tmp_path / "straight")
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert sampled_by_round(tmp_path / "split") == expected
    assert len({tuple(names) for names in expected.values()}) > 1  # the draws do vary
    assert resumed.weights.allclose(straight.weights, rtol=1e-6, atol=1e-7)


def test_power_of_choice_losses_are_in_the_checkpoint(tmp_path: Path) -> None:
    summary = simulate(sim_config(tmp_path, 8, sampler=["power-of-choice", {"d": 5, "m": 3}]))
    state = load_checkpoint(tmp_path / "checkpoint.fpk")["sampler"]
    lines = [json.loads(x) for x in (tmp_path / "clients.jsonl").read_text().splitlines()]
    last = {line["client"]: line["train_loss"] for line in lines if line["replied"]}
    assert state == {"losses": last}  # each client's latest aggregated loss
    assert summary.status == "completed"


class EveryOtherSampler(ClientSampler):
    """A user's sampler: every ``step``-th candidate, starting with the round's parity."""

    name: ClassVar[str] = "test-every-other"

    def __init__(self, step: int = 2) -> None:
        self.step = step

    def get_config(self) -> dict[str, Any]:
        return {"step": self.step}

    def sample(
        self, candidates: Sequence[C], rng: np.random.Generator, round_number: int
    ) -> list[C]:
        return list(candidates[round_number % self.step :: self.step])


@pytest.fixture
def own_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    """``test-every-other`` registered for one test only."""
    monkeypatch.setattr(registry, "_REGISTRY", {f: dict(t) for f, t in registry._REGISTRY.items()})
    registry.register(EveryOtherSampler)


def test_a_users_sampler_is_used_by_name_from_the_config(tmp_path: Path, own_sampler: None) -> None:
    toml = tmp_path / "sim.toml"
    toml.write_text(
        'n_clients = 6\n[server]\nrounds = 2\nmin_clients = 6\nsampler = ["test-every-other", '
        f'{{step = 3}}]\noutput_dir = "{tmp_path / "run"}"\n'
    )
    summary = simulate(load_config(SimulationConfig, toml))
    assert [r["clients"] for r in summary.history] == [
        ["client-1", "client-4"],
        ["client-2", "client-5"],
    ]


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ({"sampler": "uniformm"}, "unknown sampler 'uniformm'; known sampler names: poisson, "),
        ({"sampler": ["poisson", {"q": 0}]}, "poisson sampler: q=0; expected a probability"),
        ({"sampler": ["power-of-choice", {"d": 3}]}, "missing 1 required positional argument"),
    ],
)
def test_a_bad_sampler_fails_before_the_server_starts(
    tmp_path: Path, server: dict[str, Any], message: str
) -> None:
    model = {"config": {"n_features": 4, "n_classes": 3}}
    config = ServerConfig.model_validate({"output_dir": str(tmp_path), "model": model, **server})
    with pytest.raises(ConfigError, match="cannot build the run from its config") as err:
        FederatedRun(config, ClientPool())
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            "fraction = 0.5",
            "fraction = 0.5: sampler replaces fraction and clients_per_round; "
            'write sampler = ["uniform", {fraction = 0.5}]',
        ),
        ("clients_per_round = 4", 'write sampler = ["uniform", {count = 4}]'),
    ],
)
def test_the_replaced_keys_say_how_to_write_the_sampler(
    tmp_path: Path, line: str, message: str
) -> None:
    toml = tmp_path / "server.toml"
    toml.write_text(f"rounds = 3\n{line}\n")
    with pytest.raises(ConfigError) as err:
        load_config(ServerConfig, toml)
    assert message in str(err.value)


def test_a_checkpoint_of_another_sampler_does_not_fit(tmp_path: Path) -> None:
    simulate(sim_config(tmp_path, 4, sampler=["power-of-choice", {"d": 3, "m": 2}], rounds=1))
    with pytest.raises(CheckpointError, match="does not fit this run: sampler 'uniform' keeps no"):
        resume(sim_config(tmp_path, 4, rounds=2))


def test_the_sampler_docs_example_is_a_plugin_the_config_uses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, own_sampler: None
) -> None:
    page = Path(__file__).resolve().parents[2] / "docs" / "sampling.md"
    (code,) = re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)
    (tmp_path / "largest_first.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "largest_first", raising=False)
    sim = sim_config(tmp_path / "run", 6, rounds=2, sampler=["largest-first", {"count": 2}])
    sim.server.plugins = ["largest_first"]
    sizes = {name: len(train) for name, train, _ in client_datasets(sim)}
    largest = sorted(sorted(sizes, key=lambda name: -sizes[name])[:2])
    assert len(set(sizes.values())) == 6  # no tie to break
    summary = simulate(sim)
    assert [r["clients"] for r in summary.history] == [largest, largest]
