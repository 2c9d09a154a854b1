"""A simulation resumed from its checkpoint, as ``fedpipe simulate --resume`` runs it (shared
by the test modules; a test module that registers plug-ins cannot be imported by another)."""

from __future__ import annotations

import asyncio

from fedpipe.common.config import SimulationConfig
from fedpipe.server.clients import ClientPool
from fedpipe.server.inprocess import InProcessClient, SharedModels
from fedpipe.server.rounds import FederatedRun, RunSummary
from fedpipe.server.simulation import client_datasets, complete_model_config


def resume(sim: SimulationConfig) -> RunSummary:
    clients = client_datasets(sim)
    server = complete_model_config(sim.server, clients[0][1])

    async def go() -> RunSummary:
        pool, models = ClientPool(), SharedModels()
        for name, train, test in clients:
            await pool.add(InProcessClient(name, train, test, models))
        with FederatedRun(server, pool, resume=True) as run:
            return await run.run()

    return asyncio.run(go())
