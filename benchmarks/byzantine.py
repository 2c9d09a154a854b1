"""Robust aggregators against four attacks: 20 clients on digits (Dirichlet alpha = 0.5),
4 of them attackers.

Not a test: a table to read. Each aggregator runs the same in-process simulation (same
partition, model, rounds) clean and under each attack; the table gives the final federated
accuracy (every client's held-out 20 %, attackers' included, their labels untouched).
Target: for every attack, one robust aggregator within 2 points of the clean run, while
plain averaging collapses.

Attacks (the attackers train honestly, then replace their update):

- ``sign-flip``: ``-10 x`` the update;
- ``noise``: Gaussian noise, standard deviation 1 per coordinate;
- ``label-flip``: trained on labels ``9 - y`` (data poisoning; the update is sent as is);
- ``little``: "a little is enough" (Baruch et al. 2019): every attacker sends
  ``mean - z * std`` of the attackers' honest updates, coordinate-wise, with
  ``z = Phi^-1((n - s) / n)``, ``s = floor(n / 2 + 1) - f``.

FLTrust's server trains on 100 digits samples drawn from the whole dataset (the clients'
included), as the paper's root dataset is a small clean sample of the task's distribution.

    .venv/bin/python benchmarks/byzantine.py [--rounds 20] [--quick] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import tempfile
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedpipe.common.aggregators import Aggregator, SumAggregator
from fedpipe.common.config import SimulationConfig
from fedpipe.common.data import Dataset
from fedpipe.common.training import RunSetup, TrainResult
from fedpipe.common.vector import ArraySpec, Vector
from fedpipe.server.clients import ClientPool, RoundTask
from fedpipe.server.rounds import FederatedRun
from fedpipe.server.simulation import client_datasets, complete_model_config
from fedpipe.server.transports.inprocess import InProcessClient, SharedModels

N_CLIENTS, N_ATTACKERS = 20, 4
ATTACKS = ("sign-flip", "noise", "label-flip", "little")
AGGREGATORS: dict[str, Any] = {
    "averaging": "averaging",
    "median": "median",
    "trimmed-mean 0.2": ["trimmed-mean", {"beta": 0.2}],
    "krum f=4": ["krum", {"f": N_ATTACKERS}],
    "multi-krum f=4 m=12": ["krum", {"f": N_ATTACKERS, "m": 12}],
    "bulyan f=4": ["bulyan", {"f": N_ATTACKERS}],
    "geometric-median": "geometric-median",
    "fltrust 100 root": ["fltrust", {"samples": 100}],
    "averaging, validation": "averaging",
    "averaging, max_norm 1": ["averaging", {"max_norm": 1.0}],
}
#: Server settings beyond the aggregator, for the rows that have some.
SERVER_EXTRAS: dict[str, dict[str, Any]] = {
    "averaging, validation": {"validation": {"max_norm_ratio": 3.0, "action": "reject"}},
}


class Coalition:
    """What the attackers share: their data, and each round's poisoned update for ``little``."""

    def __init__(self, datasets: dict[str, Dataset]) -> None:
        self.datasets = datasets
        n, f = N_CLIENTS, N_ATTACKERS
        s = n // 2 + 1 - f
        self.z = statistics.NormalDist().inv_cdf((n - s) / n)
        self.round = -1
        self.little: Vector | None = None

    def a_little(self, trainer: Any, task: RoundTask) -> Vector:
        """``mean - z * std`` of the attackers' honest updates of this round."""
        if self.round != task.round_number or self.little is None:
            honest = [
                trainer.train(
                    data, task.weights, task.aux_vars, client=name, round_number=task.round_number
                )
                .partial.vector("sum")
                .to_numpy()
                for name, data in self.datasets.items()
            ]
            stacked = {n: np.stack([u[n] for u in honest]) for n in honest[0].coefs}
            self.little = Vector({n: a.mean(0) - self.z * a.std(0) for n, a in stacked.items()})
            self.round = task.round_number
        return self.little.copy()


class Attacker(InProcessClient):
    """A simulated client that trains honestly and sends a poisoned, well-formed update."""

    def __init__(
        self,
        name: str,
        train: Dataset,
        test: Dataset | None,
        models: SharedModels,
        attack: str,
        coalition: Coalition,
    ) -> None:
        if attack == "label-flip":
            train = Dataset(train.x, (9 - train.y).astype(train.y.dtype))
        super().__init__(name, train, test, models)
        self.attack, self.coalition = attack, coalition
        self.rng = np.random.default_rng(zlib.crc32(name.encode()))
        self.aggregator: Aggregator | None = None

    async def initialize(self, setup: RunSetup, specs: Mapping[str, ArraySpec]) -> None:
        await super().initialize(setup, specs)
        self.aggregator = self.trainer.aggregator
        self.trainer.aggregator = SumAggregator()  # train() then gives the raw update

    async def train(self, task: RoundTask) -> TrainResult:
        result = await super().train(task)
        update = result.partial.vector("sum")
        if self.attack == "sign-flip":
            update = update.mul_(-10.0)
        elif self.attack == "noise":
            update = update.normal_like(self.rng)
        elif self.attack == "little":
            update = self.coalition.a_little(self.trainer, task)
        assert self.aggregator is not None
        partial = self.aggregator.prepare(update, result.n_samples, result.n_steps)
        return dataclasses.replace(result, partial=partial)


def simulation(
    out: Path, aggregator: Any, rounds: int, seed: int, extras: Mapping[str, Any]
) -> SimulationConfig:
    return SimulationConfig.model_validate(
        {
            "n_clients": N_CLIENTS,
            "dataset": "digits",
            "eval_fraction": 0.2,
            "partition": {"scheme": "dirichlet", "alpha": 0.5, "seed": seed},
            "server": {
                "rounds": rounds,
                "min_clients": N_CLIENTS,
                "eval_every": rounds,
                "model": {"name": "softmax-regression"},
                "client_optimizer": {"lrate": 0.5},
                "training": {"epochs": 2, "batch_size": 16},
                "aggregator": aggregator,
                "checkpoint": False,
                "output_dir": str(out),
                **extras,
            },
        }
    )


async def one_run(sim: SimulationConfig, attack: str | None) -> float:
    clients = client_datasets(sim)
    server = complete_model_config(sim.server, clients[0][1])
    pool, models = ClientPool(), SharedModels()
    attackers = {name: train for name, train, _ in clients[:N_ATTACKERS]} if attack else {}
    coalition = Coalition(attackers)
    for name, train, test in clients:
        if name in attackers:
            await pool.add(Attacker(name, train, test, models, str(attack), coalition))
        else:
            await pool.add(InProcessClient(name, train, test, models))
    with FederatedRun(server, pool) as run:
        summary = (await run.run()).raise_for_status()
    return float(summary.history[-1]["accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="partition seed")
    parser.add_argument("--quick", action="store_true", help="5 rounds, 3 aggregators (CI size)")
    parser.add_argument(
        "--only", nargs="+", choices=list(AGGREGATORS), help="these aggregators (and averaging)"
    )
    args = parser.parse_args()
    rounds = 5 if args.quick else args.rounds
    names = ["averaging", "median", "geometric-median"] if args.quick else list(AGGREGATORS)
    if args.only:
        names = ["averaging", *(n for n in args.only if n != "averaging")]
    columns = (None, *ATTACKS)
    start = time.perf_counter()
    table: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            for attack in columns:
                extras = SERVER_EXTRAS.get(name, {})
                out = Path(tmp) / f"{i}-{attack}"
                sim = simulation(out, AGGREGATORS[name], rounds, args.seed, extras)
                table.setdefault(name, []).append(asyncio.run(one_run(sim, attack)))
    print(
        f"digits, {N_CLIENTS} clients (Dirichlet 0.5), {N_ATTACKERS} attackers, "
        f"{rounds} rounds: final accuracy"
    )
    print(f"{'aggregator':22}" + "".join(f"{c or 'clean':>12}" for c in columns))
    for name, row in table.items():
        print(f"{name:22}" + "".join(f"{v:12.3f}" for v in row))
    clean = table["averaging"][0]
    print(f"\nrobust aggregators within 2 points of clean averaging ({clean:.3f}) | of their own")
    print("clean run, by attack:")
    for j, attack in enumerate(ATTACKS, start=1):
        robust = [(n, row) for n, row in table.items() if n != "averaging"]
        fedavg = ", ".join(n for n, row in robust if row[j] >= clean - 0.02) or "none"
        own = ", ".join(n for n, row in robust if row[j] >= row[0] - 0.02) or "none"
        print(f"  {attack:11} {fedavg} | {own}")
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
