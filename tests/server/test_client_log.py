"""clients.jsonl: one line per sampled client per round, consistent with metrics.jsonl."""

from __future__ import annotations

import asyncio
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from fedpipe.common.config import SimulationConfig
from fedpipe.common.training import TrainResult
from fedpipe.server.checkpoint import load_checkpoint
from fedpipe.server.clients import ClientPool, RoundTask
from fedpipe.server.rounds import FederatedRun, RunSummary
from fedpipe.server.simulation import client_datasets, complete_model_config
from fedpipe.server.transports.inprocess import InProcessClient, SharedModels


class NaNLossClient(InProcessClient):
    """Trains, then reports a loss that is not a number: its reply is rejected."""

    async def train(self, task: RoundTask) -> TrainResult:
        result = await super().train(task)
        result.loss_sum = math.nan
        return result


def sim_config(out: Path, rounds: int) -> SimulationConfig:
    return SimulationConfig.model_validate(
        {
            "n_clients": 6,
            "partition": {"scheme": "dirichlet", "alpha": 0.5, "seed": 3},
            "server": {
                "rounds": rounds,
                "min_clients": 6,
                "sampler": ["uniform", {"count": 4}],
                "client_optimizer": {"lrate": 0.3},
                "training": {"epochs": 1, "batch_size": 32},
                "output_dir": str(out),
            },
        }
    )


def run(sim: SimulationConfig, *, resume: bool = False) -> RunSummary:
    """``sim`` with in-process clients; client-5 sends a NaN loss every round."""
    clients = client_datasets(sim)
    server = complete_model_config(sim.server, clients[0][1])

    async def go() -> RunSummary:
        pool, models = ClientPool(), SharedModels()
        for name, train, test in clients:
            kind = NaNLossClient if name == "client-5" else InProcessClient
            await pool.add(kind(name, train, test, models))
        return await FederatedRun(server, pool, resume=resume).run()

    return asyncio.run(go())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_sampled_client_has_a_line_per_round_that_adds_up_to_the_round(
    tmp_path: Path,
) -> None:
    summary = run(sim_config(tmp_path, rounds=4))
    lines = read_jsonl(tmp_path / "clients.jsonl")
    by_round: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for line in lines:
        by_round[line["round"]].append(line)
    assert sorted(by_round) == [1, 2, 3, 4]
    bad_seen = 0
    for record in summary.history:
        mine = by_round[record["round"]]
        assert len(mine) == record["sampled"] == 4
        assert len({line["client"] for line in mine}) == 4  # one line per client
        replied = [line for line in mine if line["replied"]]
        assert sorted(line["client"] for line in replied) == record["clients"]
        assert len(replied) == record["replied"]
        seen = sum(line["n_samples_seen"] for line in replied)
        loss = sum(line["train_loss"] * line["n_samples_seen"] for line in replied) / seen
        assert loss == pytest.approx(record["train_loss"], rel=1e-12)
        assert all(line["n_samples_seen"] == line["n_samples"] for line in replied)  # 1 epoch
        assert all(0 <= line["seconds"] <= record["seconds"] for line in replied)
        # Every sampled client evaluates: its metrics weigh into the round's exactly.
        total = sum(line["n_eval_samples"] for line in mine)
        for metric in ("accuracy", "loss"):
            mean = sum(line[metric] * line["n_eval_samples"] for line in mine) / total
            assert mean == pytest.approx(record[metric], rel=1e-9)
        for line in mine:
            if line["client"] == "client-5":
                bad_seen += 1
                assert not line["replied"] and "train_loss" not in line
                assert line["error"] == "rejected reply: train loss nan is not finite"
    assert bad_seen >= 1  # the sampler picked the NaN client at least once


def test_client_lines_stay_out_of_the_checkpoint_and_a_resume_rewrites_replayed_rounds(
    tmp_path: Path,
) -> None:
    run(sim_config(tmp_path, rounds=2))
    state = load_checkpoint(tmp_path / "checkpoint.fpk")
    assert all("clients" not in r for r in state["history"])  # type: ignore[union-attr]
    assert "client" not in json.dumps(state["history"])
    # A server that crashed after writing round 3's lines, before its checkpoint; one torn.
    kept = (tmp_path / "clients.jsonl").read_text()
    stale = '{"round": 3, "client": "client-0", "replied": true}\n{"round": 3, "cli'
    (tmp_path / "clients.jsonl").write_text(kept + stale)
    run(sim_config(tmp_path, rounds=3), resume=True)
    lines = read_jsonl(tmp_path / "clients.jsonl")
    assert (tmp_path / "clients.jsonl").read_text().startswith(kept)
    assert [line["round"] for line in lines] == [1] * 4 + [2] * 4 + [3] * 4
    assert len({(line["round"], line["client"]) for line in lines}) == 12
