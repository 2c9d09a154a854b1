"""Local simulation: the server's round loop with many clients on one machine.

Two transports, one round loop:

- ``inprocess``: simulated clients are :class:`~fedpipe.server.inprocess.InProcessClient`
  proxies in this process (no network, hundreds of clients on two cores);
- ``grpc``: a real server process and real client processes over loopback gRPC, started with
  the same CLI commands as a deployment.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedpipe.common import registry
from fedpipe.common.config import ServerConfig, SimulationConfig
from fedpipe.common.data import Dataset, load_builtin, load_dataset, partition, save_dataset
from fedpipe.common.vector import Vector
from fedpipe.server.clients import ClientPool
from fedpipe.server.inprocess import InProcessClient, SharedModels
from fedpipe.server.rounds import FederatedRun, RunSummary

__all__ = ["DEFAULT_CONFIG_TEXT", "client_datasets", "complete_model_config", "simulate"]

log = logging.getLogger(__name__)

OnRound = Callable[[dict[str, Any]], None]

#: The simulation run by ``fedpipe simulate`` without ``--config`` (TOML text).
DEFAULT_CONFIG_TEXT = (Path(__file__).parent / "default_simulation.toml").read_text()


def load_source(name: str) -> Dataset:
    """A built-in dataset name, or a path to a dataset file or folder."""
    path = Path(name)
    return load_dataset(path) if path.exists() else load_builtin(name)


def client_datasets(
    sim: SimulationConfig, data: Dataset | None = None
) -> list[tuple[str, Dataset, Dataset | None]]:
    """Partition the simulation's dataset: ``(name, train, eval)`` for each client."""
    data = load_source(sim.dataset) if data is None else data
    p = sim.partition
    parts = partition(data, sim.n_clients, p.scheme, seed=p.seed, alpha=p.alpha)
    clients = []
    width = len(str(sim.n_clients - 1))
    for i, part in enumerate(parts):
        name = f"client-{i:0{width}d}"
        if sim.eval_fraction > 0:
            train, test = part.split(1.0 - sim.eval_fraction, seed=p.seed + i)
            clients.append((name, train, test if len(test) else None))
        else:
            clients.append((name, part, None))
    return clients


def complete_model_config(server: ServerConfig, data: Dataset) -> ServerConfig:
    """Fill ``n_features`` / ``n_classes`` of a built-in model from the data when unset."""
    name = server.model.name
    if ":" in name:
        return server
    params = inspect.signature(registry.get_class("model", name)).parameters
    config = dict(server.model.config)
    if "n_features" in params and "n_features" not in config:
        config["n_features"] = int(np.prod(data.x.shape[1:]))
    classification = config.get("task", "multiclass") == "multiclass"
    if "n_classes" in params and "n_classes" not in config and classification:
        config["n_classes"] = int(np.max(data.y)) + 1
    model = server.model.model_copy(update={"config": config})
    return server.model_copy(update={"model": model})


def simulate(sim: SimulationConfig, on_round: OnRound | None = None) -> RunSummary:
    """Run the simulation described by ``sim`` with its transport."""
    import asyncio

    data = load_source(sim.dataset)
    clients = client_datasets(sim, data)
    server = complete_model_config(sim.server, data)
    sim = sim.model_copy(update={"server": server})
    if sim.transport == "inprocess":
        return asyncio.run(simulate_inprocess(sim, clients, on_round))
    return simulate_grpc(sim, clients, on_round)


async def simulate_inprocess(
    sim: SimulationConfig,
    clients: list[tuple[str, Dataset, Dataset | None]],
    on_round: OnRound | None = None,
) -> RunSummary:
    pool = ClientPool()
    models = SharedModels()
    for name, train, test in clients:
        await pool.add(InProcessClient(name, train, test, models))
    server = sim.server.model_copy(
        update={"min_clients": min(sim.server.min_clients, len(clients))}
    )
    return await FederatedRun(server, pool, on_round=on_round).run()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def simulate_grpc(
    sim: SimulationConfig,
    clients: list[tuple[str, Dataset, Dataset | None]],
    on_round: OnRound | None = None,
    *,
    timeout: float = 3600.0,
) -> RunSummary:
    """A real server process and one process per client, over loopback gRPC."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="fedpipe-sim-") as tmp:
        work = Path(tmp)
        server = sim.server.model_copy(
            update={
                "host": "127.0.0.1",
                "port": port,
                "min_clients": min(sim.server.min_clients, len(clients)),
            }
        )
        output_dir = Path(server.output_dir).resolve()
        server = server.model_copy(update={"output_dir": output_dir})
        for stale in ("metrics.jsonl", "summary.json"):  # this run's files, not a last run's
            (output_dir / stale).unlink(missing_ok=True)
        config_path = work / "server.json"
        config_path.write_text(server.model_dump_json())
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "fedpipe"]
        procs: list[subprocess.Popen[bytes]] = []
        logs = []
        try:
            server_log = open(work / "server.log", "wb")
            logs.append(server_log)
            server_proc = subprocess.Popen(
                [*cmd, "server", "--config", str(config_path), "--progress", "json"],
                stdout=subprocess.PIPE,
                stderr=server_log,
                env=env,
            )
            procs.append(server_proc)
            for name, train, test in clients:
                # Many clients share this machine's cores: one math thread each.
                args = [*cmd, "client", "--server", f"127.0.0.1:{port}", "--name", name]
                args += ["--threads", "1"]
                args += ["--data", str(save_dataset(train, work / name / "train"))]
                if test is not None:
                    args += ["--eval-data", str(save_dataset(test, work / name / "eval"))]
                client_log = open(work / f"{name}.log", "wb")
                logs.append(client_log)
                procs.append(
                    subprocess.Popen(args, stdout=client_log, stderr=subprocess.STDOUT, env=env)
                )
            _follow(server_proc, on_round, timeout)
            code = server_proc.wait(timeout=60)
            if not (output_dir / "summary.json").exists():
                raise RuntimeError(
                    f"server process exited with {code}:\n{(work / 'server.log').read_text()}"
                )
            for proc in procs[1:]:
                proc.wait(timeout=60)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            for fh in logs:
                fh.close()
        records = [
            json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()
        ]
        with np.load(output_dir / "model.npz", allow_pickle=False) as npz:
            weights = Vector({k: npz[k] for k in npz.files})
    summary = json.loads((output_dir / "summary.json").read_text())
    return RunSummary(
        summary["status"],
        summary["reason"],
        summary["rounds_completed"],
        summary["stopped_early"],
        records,
        weights,
    )


def _follow(proc: subprocess.Popen[bytes], on_round: OnRound | None, timeout: float) -> None:
    """Report each round as the server process prints it (``--progress json``), until the
    process closes its output; kill it if the whole run exceeds ``timeout`` seconds."""
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # blocks until the server writes: no polling
            if on_round is not None and line.startswith(b"{"):
                on_round(json.loads(line))
    finally:
        watchdog.cancel()
