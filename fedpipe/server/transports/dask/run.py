"""Run a simulation on a Dask cluster: a local one on 127.0.0.1, or an existing one."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

from fedpipe.common.config import ConfigError, DaskConfig, SimulationConfig
from fedpipe.common.data import Dataset
from fedpipe.server.clients import ClientPool
from fedpipe.server.rounds import RunSummary

__all__ = ["dask_client", "local_cluster_options", "simulate_dask"]

log = logging.getLogger(__name__)


def local_cluster_options(config: DaskConfig) -> dict[str, Any]:
    """``LocalCluster`` keyword arguments for ``config``: every listener on 127.0.0.1 (the
    scheduler, the nannies, the workers), no dashboard, ``config.workers`` workers (default:
    one per core this process may run on). TCP even for workers in this process
    (``processes = false``): Dask's in-process transport takes no host."""
    return {
        "n_workers": config.workers or len(os.sched_getaffinity(0)),
        "threads_per_worker": config.threads_per_worker,
        "processes": config.processes,
        "protocol": "tcp://",
        "host": "127.0.0.1",
        "dashboard_address": None,
        # No dashboard; the scheduler's health and metrics routes on loopback, any port.
        "scheduler_kwargs": {"dashboard_address": "127.0.0.1:0"},
        "resources": config.resources or None,
    }


@contextlib.asynccontextmanager
async def dask_client(config: DaskConfig) -> AsyncIterator[Any]:
    """An asynchronous Dask client on ``config.scheduler``, or on a local cluster
    (:func:`local_cluster_options`) that ends with it; it connects to the workers directly
    (``direct_to_workers``), so that a call to a worker's actor (:mod:`.proxy`) and its answer
    do not go through the scheduler.

    Raises
    ------
    ConfigError
        Dask is not installed.
    """
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise ConfigError(
            "transport='dask' runs on Dask distributed: install the dask extra "
            "(pip install 'fedpipe[dask]')"
        ) from None
    if config.scheduler is not None:
        async with Client(config.scheduler, asynchronous=True, direct_to_workers=True) as client:
            yield client
        return
    options = local_cluster_options(config)
    async with (
        LocalCluster(**options, asynchronous=True) as cluster,
        Client(cluster, asynchronous=True, direct_to_workers=True) as client,
    ):
        log.info("local Dask cluster: %d worker(s) on 127.0.0.1", options["n_workers"])
        yield client


async def simulate_dask(
    sim: SimulationConfig,
    clients: list[tuple[str, Dataset, Dataset | None]],
    on_round: Callable[[dict[str, Any]], None] | None = None,
    *,
    overwrite: bool = False,
) -> RunSummary:
    """The round loop with :class:`~.proxy.DaskClient` proxies on the cluster ``sim.dask``
    names (see :mod:`.proxy` for placement, batching and lost workers); unless the mode is
    sequential, each worker trains a round's clients stacked (:mod:`.cohort`)."""
    from fedpipe.server.simulation import (
        check_unique_names,
        run_pool,
        simulation_plugins,
        training_mode,
    )
    from fedpipe.server.transports.dask.proxy import DaskClient, DaskFleet

    check_unique_names(clients)

    async with dask_client(sim.dask) as client:
        fleet = DaskFleet(
            client,
            sim.dask.resources,
            simulation_plugins(sim),
            sim.device,
            sim.noise_seed,
            dp_sgd=None if sim.dp_sgd is None else sim.dp_sgd.model_dump(),
            stack_clients=None if training_mode(sim) == "sequential" else sim.stack_clients,
        )
        pool = ClientPool()
        for name, train, test in clients:
            await pool.add(DaskClient(name, train, test, fleet))
        try:
            return await run_pool(sim, pool, on_round, fleet.start, overwrite=overwrite)
        finally:
            await fleet.close()
