"""Simulation configs and resumed runs shared by the sampling and privacy tests (here, since
a test module that registers plug-ins cannot be imported by another)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fedpipe.common.config import SimulationConfig
from fedpipe.server.clients import ClientPool
from fedpipe.server.rounds import FederatedRun, RunSummary
from fedpipe.server.simulation import client_datasets, complete_model_config
from fedpipe.server.transports.inprocess import InProcessClient, SharedModels


def sim_config(out: Path, n_clients: int, **server: Any) -> SimulationConfig:
    """``n_clients`` on a Dirichlet(0.5) split of digits, 6 rounds, all of them sampled."""
    return SimulationConfig.model_validate(
        {
            "n_clients": n_clients,
            "partition": {"scheme": "dirichlet", "alpha": 0.5, "seed": 2},
            "server": {
                "rounds": 6,
                "min_clients": n_clients,
                "client_optimizer": {"lrate": 0.3},
                "training": {"epochs": 1, "batch_size": 32},
                "output_dir": str(out),
                **server,
            },
        }
    )


def resume(
    sim: SimulationConfig, client: type[InProcessClient] = InProcessClient, *, again: bool = True
) -> RunSummary:
    """The run of ``sim`` resumed (``again``) or started, with in-process ``client``s."""
    clients = client_datasets(sim)
    server = complete_model_config(sim.server, clients[0][1])

    async def go() -> RunSummary:
        pool, models = ClientPool(), SharedModels()
        for name, train, test in clients:
            await pool.add(client(name, train, test, models))
        with FederatedRun(server, pool, resume=again) as run:
            return await run.run()

    return asyncio.run(go())
