"""Local simulation: the server's round loop with many clients on one machine.

Three transports, one round loop:

- ``inprocess``: simulated clients are :class:`~fedpipe.server.transports.inprocess.InProcessClient`
  proxies in this process (no network, hundreds of clients on two cores);
- ``grpc``: a real server process and real client processes over loopback gRPC, started with
  the same CLI commands as a deployment;
- ``dask``: clients on the workers of a Dask cluster (:mod:`fedpipe.server.transports.dask`).

All import the simulation's plugins (``plugins``, ``server.plugins``): in this process, or in
every spawned process or Dask worker, since the simulation's owner owns its clients.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import inspect
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fedpipe.common import registry
from fedpipe.common.config import ConfigError, ServerConfig, SimulationConfig
from fedpipe.common.data import Dataset, load_source, partition, save_dataset
from fedpipe.common.plugins import import_plugins
from fedpipe.common.train_fn import load_train_fn
from fedpipe.common.training import ClientData, LocalTrainer, RunSetup
from fedpipe.common.vector import Vector
from fedpipe.server.clients import ClientPool
from fedpipe.server.devices import resolve_devices
from fedpipe.server.monitoring import Monitoring
from fedpipe.server.rounds import FederatedRun, RunSummary
from fedpipe.server.run_dir import fresh_run_dir, prepare_run_dir
from fedpipe.server.transports.inprocess import InProcessClient, SharedModels, TrainingMode

__all__ = [
    "DEFAULT_CONFIG_TEXT",
    "SimulationError",
    "client_datasets",
    "complete_model_config",
    "run_pool",
    "simulate",
    "with_run_dir",
]

log = logging.getLogger(__name__)

OnRound = Callable[[dict[str, Any]], None]

#: The simulation run by ``fedpipe simulate`` without ``--config`` (TOML text).
DEFAULT_CONFIG_TEXT = (Path(__file__).parent / "default_simulation.toml").read_text()


def client_datasets(
    sim: SimulationConfig, data: Dataset | None = None
) -> list[tuple[str, Dataset, Dataset | None]]:
    """Partition the simulation's dataset: ``(name, train, eval)`` for each client."""
    data = load_source(sim.dataset) if data is None else data
    p = sim.partition
    parts = partition(data, sim.n_clients, p.scheme, seed=p.seed, alpha=p.alpha)
    clients = []
    for i, part in enumerate(parts):
        name = position_name(i, sim.n_clients)
        if sim.eval_fraction > 0:
            train, test = part.split(1.0 - sim.eval_fraction, seed=p.seed + i)
            clients.append((name, train, test if len(test) else None))
        else:
            clients.append((name, part, None))
    return clients


def position_name(index: int, count: int) -> str:
    """``client-<index>``, zero-padded to the width of ``count - 1``: the name of a
    simulation's ``index``-th client, and the name of its files in a gRPC simulation (whose
    clients' own names may hold ``/`` or ``..``)."""
    return f"client-{index:0{len(str(count - 1))}d}"


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


def with_run_dir(sim: SimulationConfig) -> SimulationConfig:
    """``sim`` with its own run directory: a new ``runs/simulation-YYYYmmdd-HHMMSS`` when its
    config names none, so that running a simulation again never touches the last one."""
    if "output_dir" in sim.server.model_fields_set:
        return sim
    server = sim.server.model_copy(update={"output_dir": fresh_run_dir(Path("runs"), "simulation")})
    return sim.model_copy(update={"server": server})


def simulate(
    sim: SimulationConfig, on_round: OnRound | None = None, *, overwrite: bool = False
) -> RunSummary:
    """Run the simulation described by ``sim`` with its transport, in its own directory (see
    :func:`with_run_dir`); ``overwrite`` replaces the run a directory already holds.

    Raises
    ------
    RunDirectoryTaken
        The output directory holds a run and ``overwrite`` is not set.
    """
    import asyncio

    import_plugins(simulation_plugins(sim))  # before the config's names are looked up
    data = load_source(sim.dataset)
    clients = client_datasets(sim, data)
    sim = with_run_dir(sim)
    server = complete_model_config(sim.server, data)
    sim = sim.model_copy(update={"server": server})
    prepare_run_dir(Path(server.output_dir), overwrite=overwrite, can_resume=False)
    if sim.transport == "inprocess":
        return asyncio.run(simulate_inprocess(sim, clients, on_round, overwrite=overwrite))
    if sim.transport == "dask":
        from fedpipe.server.transports.dask.run import simulate_dask  # the dask extra

        return asyncio.run(simulate_dask(sim, clients, on_round, overwrite=overwrite))
    return simulate_grpc(sim, clients, on_round, overwrite=overwrite)


async def simulate_inprocess(
    sim: SimulationConfig,
    clients: list[tuple[str, Dataset, Dataset | None]],
    on_round: OnRound | None = None,
    *,
    overwrite: bool = False,
) -> RunSummary:
    """The round loop with :class:`InProcessClient` proxies, on the devices ``sim`` names.

    Raises
    ------
    ConfigError
        A named device is not there, or the model cannot go to it or be vectorized (not a
        torch model).
    ValueError
        Two clients share a name.
    """
    check_unique_names(clients)
    devices, mode = resolve_devices(sim.device), training_mode(sim)
    if devices:
        log.info("in-process clients train on %s (%s mode)", ", ".join(devices), mode)
    train_fn = load_train_fn(sim.train_fn) if sim.train_fn else None
    pool = ClientPool()
    models = SharedModels(devices, mode, sim.stack_clients)
    for index, (name, train, test) in enumerate(own_data(sim, clients)):
        client = InProcessClient(
            name, train, test, models, index, sim.noise_seed, train_fn=train_fn, dp_sgd=sim.dp_sgd
        )
        await pool.add(client)

    async def place(setup: RunSetup) -> None:
        model = models.get(setup)  # a model that cannot go to its device fails here, once
        if train_fn is not None:  # so does a run setup the train_fn cannot honour
            try:
                LocalTrainer(setup, model=model, train_fn=train_fn)
            except ValueError as exc:
                raise ConfigError(f"train_fn={sim.train_fn!r}: {exc}") from None

    with frozen_state() as freeze:

        def after_round(record: dict[str, Any]) -> None:
            if record["round"] == 1:
                freeze()  # the clients' trainers, built in the first round
            if on_round is not None:
                on_round(record)

        try:
            return await run_pool(sim, pool, after_round, place, overwrite=overwrite)
        finally:
            models.close()


@contextlib.contextmanager
def frozen_state() -> Iterator[Callable[[], None]]:
    """Keep what is alive now (and whenever the function yielded is called) out of the
    garbage collector's passes until the block ends (``gc.freeze``): thousands of simulated
    clients' data and trainers would otherwise be walked at every full collection, which a
    round's short-lived replies trigger several times per round. Left alone when the process
    froze objects of its own."""
    if gc.get_freeze_count():
        yield lambda: None
        return
    gc.freeze()
    try:
        yield gc.freeze
    finally:
        gc.unfreeze()


async def run_pool(
    sim: SimulationConfig,
    pool: ClientPool,
    on_round: OnRound | None,
    start: Callable[[RunSetup], Awaitable[None]],
    *,
    overwrite: bool = False,
) -> RunSummary:
    """The round loop of ``sim.server`` with the simulated clients of ``pool`` (and its
    monitoring); ``start`` gets the run setup before the first round."""
    server = sim.server.model_copy(update={"min_clients": min(sim.server.min_clients, len(pool))})
    with FederatedRun(server, pool, on_round=on_round) as run:
        await start(run.setup)
        monitoring = await Monitoring.start(server, run, overwrite=overwrite)
        try:
            summary = await run.run()
            monitoring.finished(summary)
            return summary
        finally:
            await monitoring.close()


def training_mode(sim: SimulationConfig) -> TrainingMode:
    """``sim.mode``, or sequential when the clients bring their own loaders or train_fn
    (the vectorized engines stack fedpipe's arrays and run fedpipe's loop) or clip or noise
    client by client; logged when ``mode = "vectorized"`` was asked for."""
    own = "train_fn" if sim.train_fn else "loaders" if sim.loaders else None
    privacy = sim.server.privacy
    reason = None
    if sim.dp_sgd is not None:
        reason = "dp_sgd clips client by client"
    elif privacy is not None and privacy.mode == "distributed":
        reason = "distributed DP noise is added client by client"
    elif own is not None:
        reason = (
            f"the clients train with their own {own} {getattr(sim, own)!r}, which cannot be "
            "stacked across clients"
        )
    if reason is None:
        return sim.mode
    if sim.mode == "vectorized":
        log.info("mode='vectorized' falls back to sequential: %s", reason)
    return "sequential"


def own_data(
    sim: SimulationConfig, clients: list[tuple[str, Dataset, Dataset | None]]
) -> list[tuple[str, ClientData, ClientData | None]]:
    """Each client's partition through the simulation's ``loaders`` factory, as a client
    process with that config gets it; the partitions themselves when it names none.

    Raises
    ------
    PluginError
        The factory cannot be imported or returns no DataLoader.
    """
    if sim.loaders is None:
        return list(clients)
    from fedpipe.common.data.torch_loaders import load_loaders  # the torch extra

    return [(name, *load_loaders(sim.loaders, train, test)) for name, train, test in clients]


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
    overwrite: bool = False,
) -> RunSummary:
    """A real server process and one process per client, over loopback gRPC.

    The simulation's owner owns these processes: they import its plugins, and the clients
    trust its model's import path. Their logs are kept in ``<output_dir>/logs/``:
    ``server.log``, and ``client-<i>.log`` for the ``i``-th client, whatever its name.

    Raises
    ------
    SimulationError
        The server failed, every client failed, or the run took over ``timeout`` seconds;
        the message shows the tails of the logs.
    ValueError
        Two clients share a name (the processes are kept by name: one would never be stopped).
    """
    check_unique_names(clients)
    output_dir = Path(sim.server.output_dir).resolve()
    logs = output_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    server = sim.server.model_copy(
        update={
            "host": "127.0.0.1",
            "port": free_port(),
            "min_clients": min(sim.server.min_clients, len(clients)),
            "output_dir": output_dir,
            "plugins": simulation_plugins(sim),
        }
    )
    with tempfile.TemporaryDirectory(prefix="fedpipe-sim-") as tmp:
        work = Path(tmp)
        (work / "server.json").write_text(server.model_dump_json())
        (work / "client.json").write_text(json.dumps(_client_config(server, sim)))
        # --overwrite: what the run's trackers keep elsewhere (TensorBoard) is replaced too.
        args = [*FEDPIPE, "server", "--config", str(work / "server.json"), "--progress", "json"]
        server_proc = _spawn(
            args + ["--overwrite"] * overwrite, logs / "server.log", stdout=subprocess.PIPE
        )
        client_procs: dict[str, subprocess.Popen[bytes]] = {}
        watcher = _ClientWatcher(server_proc, client_procs)
        try:
            client_logs = _spawn_clients(clients, work, logs, client_procs)
            watcher.start()
            expired = _follow(server_proc, on_round, timeout)
            summarized = (output_dir / "summary.json").exists
            _check_processes(
                server_proc, client_procs, watcher, expired, timeout, summarized, client_logs, logs
            )
        finally:
            for proc in [server_proc, *client_procs.values()]:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            if watcher.ident is not None:  # started: its waits end now that all are dead
                watcher.join(timeout=30)
    return _read_summary(output_dir)


def check_unique_names(clients: list[tuple[str, Dataset, Dataset | None]]) -> None:
    """Raise ValueError when two of a simulation's ``clients`` share a name (every transport
    keeps its clients by name: one would silently replace the other, or a process be left
    running)."""
    counts = collections.Counter(name for name, _, _ in clients)
    for name, count in counts.items():
        if count > 1:
            raise ValueError(f"client names must be unique: {name!r} is given {count} times")


class SimulationError(RuntimeError):
    """A gRPC simulation failed; the message says how and shows the tails of the logs."""


def simulation_plugins(sim: SimulationConfig) -> list[str]:
    """The plugin modules of a simulation: its own and its server config's."""
    return list(dict.fromkeys([*sim.plugins, *sim.server.plugins]))


def _client_config(server: ServerConfig, sim: SimulationConfig) -> dict[str, Any]:
    """The config every spawned client shares (each adds its name and data as flags)."""
    model = server.model.name
    return {
        "server": f"127.0.0.1:{server.port}",
        "threads": 1,  # many clients share this machine's cores
        "plugins": server.plugins,
        # The simulation's owner chose this model: its clients may import it.
        "trusted_models": [model] if ":" in model else [],
        **sim.model_dump(
            include={"loaders", "train_fn", "noise_seed", "dp_sgd"}, exclude_none=True
        ),
    }


FEDPIPE = [sys.executable, "-m", "fedpipe"]


def _spawn_clients(
    clients: list[tuple[str, Dataset, Dataset | None]],
    work: Path,
    logs: Path,
    procs: dict[str, subprocess.Popen[bytes]],
) -> dict[str, Path]:
    """Start a process per client into ``procs``, by name; return their log files, by name.

    A name may hold ``/`` or ``..``: the ``i``-th client's files (its data in ``work``, its
    log in ``logs``) are named by its position (:func:`position_name`), never by its name.
    """
    client_logs = {}
    for i, (name, train, test) in enumerate(clients):
        folder = work / position_name(i, len(clients))
        client_logs[name] = logs / f"{folder.name}.log"
        # "--name=": a name may start with "-".
        args = [*FEDPIPE, "client", "--config", str(work / "client.json"), f"--name={name}"]
        args += ["--data", str(save_dataset(train, folder / "train"))]
        if test is not None:
            args += ["--eval-data", str(save_dataset(test, folder / "eval"))]
        procs[name] = _spawn(args, client_logs[name])
    return client_logs


def _spawn(args: list[str], log_path: Path, stdout: int | None = None) -> subprocess.Popen[bytes]:
    """Start ``args`` with its log (stderr, and stdout unless piped) in ``log_path``."""
    # The processes import the same user code (models, plugins) as this one, even code this
    # process found through a sys.path entry added at run time (a notebook's).
    paths = [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)))
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(
            args,
            stdout=log_file if stdout is None else stdout,
            stderr=subprocess.STDOUT if stdout is None else log_file,
            env=env,
        )


class _ClientWatcher(threading.Thread):
    """Stops the server once every client process has exited with an error: nobody is left
    to train, and the server would otherwise wait for clients until its timeouts pass."""

    GRACE_SECONDS = 5.0

    def __init__(
        self, server: subprocess.Popen[bytes], clients: dict[str, subprocess.Popen[bytes]]
    ) -> None:
        super().__init__(name="fedpipe-sim-clients", daemon=True)
        self.server, self.clients = server, clients
        self.stopped_server = False

    def run(self) -> None:
        codes = [proc.wait() for proc in list(self.clients.values())]
        if not codes or 0 in codes:
            return  # a client the server stopped: the run is ending on its own
        try:
            self.server.wait(timeout=self.GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            self.stopped_server = True
            self.server.kill()


def _check_processes(
    server: subprocess.Popen[bytes],
    clients: dict[str, subprocess.Popen[bytes]],
    watcher: _ClientWatcher,
    expired: bool,
    timeout: float,
    summarized: Callable[[], bool],
    client_logs: dict[str, Path],
    logs: Path,
) -> None:
    """Raise :class:`SimulationError` unless the server process ended the run and said how
    (``summary.json``: a run that failed that way is reported by its summary's status);
    ``client_logs``: each client's log file in ``logs``, by name."""
    code = server.wait(timeout=60)
    if expired:
        reason = f"the run took over {timeout:.0f}s; its processes were stopped"
    elif watcher.stopped_server:
        reason = "every client process exited with an error before the run ended"
    elif not summarized():
        reason = f"the server process exited with {code} and wrote no summary.json"
    else:
        for name, proc in clients.items():
            try:
                if proc.wait(timeout=60) != 0:
                    log.warning(
                        "client %s exited with %d; see %s", name, proc.returncode, client_logs[name]
                    )
            except subprocess.TimeoutExpired:
                log.warning("client %s still running after the run ended; stopping it", name)
        return
    failed = [name for name, proc in clients.items() if proc.poll() not in (None, 0)]
    shown = {name: client_logs[name] for name in failed or clients}
    raise SimulationError(_failure_report(reason, logs, shown))


def _failure_report(reason: str, logs: Path, client_logs: dict[str, Path], shown: int = 3) -> str:
    """The reason, then the tails of the server's log and of a few clients' (failed ones),
    each headed by the client's name (its log file is named by its position)."""
    parts = [f"gRPC simulation failed: {reason}", _log_tail(logs / "server.log")]
    for name, path in list(client_logs.items())[:shown]:
        parts.append(_log_tail(path, f"client {name!r}, "))
    if len(client_logs) > shown:
        parts.append(f"... and {len(client_logs) - shown} more client log(s)")
    parts.append(f"all logs are in {logs}/")
    return "\n".join(parts)


def _log_tail(path: Path, who: str = "", lines: int = 15) -> str:
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join([f"--- {path.name} ({who}last {len(text)} lines) ---", *text])


def _read_summary(output_dir: Path) -> RunSummary:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
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
        {k: v for k, v in summary.items() if k.startswith("best_")},
    )


def _follow(proc: subprocess.Popen[bytes], on_round: OnRound | None, timeout: float) -> bool:
    """Report each round as the server process prints it (``--progress json``), until the
    process closes its output; kill it if the whole run exceeds ``timeout`` seconds (then
    return True)."""
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        proc.kill()

    watchdog = threading.Timer(timeout, expire)
    watchdog.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # blocks until the server writes: no polling
            if on_round is not None and line.startswith(b"{"):
                on_round(json.loads(line))
    finally:
        watchdog.cancel()
    return expired.is_set()
