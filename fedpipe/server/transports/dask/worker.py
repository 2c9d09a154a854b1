"""The worker side of the Dask transport: the simulated clients a worker owns.

The registry is a Dask worker plugin, :class:`WorkerClients`, registered once per run with
``Client.register_plugin``: Dask installs it on every worker, those that join later included
(a nanny's restarted worker), and tears it down when the run unregisters it. Its fields are
plain data (the run setup, plugin modules, device), so nothing but fedpipe's own class, by
reference, is pickled to install it. On each worker it keeps one model object, built by name
from the run setup on first use (model code never travels), and each client placed there: its
data and its own :class:`~fedpipe.common.training.LocalTrainer` (module states, aux vars),
kept from round to round. The server calls each worker through one Dask actor of the run,
:class:`WorkerCalls` (created by a task on that worker, it finds the registry through
``get_worker()``): its calls go from the server straight to the worker, not through the
scheduler, and run one at a time in the worker's actor thread.

A worker trains a round's clients stacked when it can (:func:`train_stacked`, the server's
:class:`~.cohort.DaskCohort`): one :class:`~fedpipe.common.stacked.StackedTrainer` per worker,
kept from round to round with its flat copy of its clients' samples, trains them all at once,
bit-equal to one after another; else (:func:`run_jobs`) it trains them one after another. They
share its model object, so a task holds the worker's lock (a task of a round the server gave
up on finishes before the next starts).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from dask.distributed import Worker, WorkerPlugin, get_worker

from fedpipe.common.client_job import ClientJob
from fedpipe.common.config import DpSgdConfig
from fedpipe.common.data import Dataset
from fedpipe.common.plugins import import_plugins
from fedpipe.common.stacked import StackedTrainer, StackedUpdates
from fedpipe.common.summable import Summable
from fedpipe.common.training import LocalTrainer, RunSetup
from fedpipe.common.vector import Vector
from fedpipe.server.devices import resolve_devices
from fedpipe.server.stacked_cohort import cohort_unfit
from fedpipe.server.transports.dask.payloads import (
    PackedInits,
    dataset_from,
    inits_from,
    plain_eval,
    plain_train,
    plain_vector,
    summable_from,
    vector_from,
)
from fedpipe.server.transports.inprocess import SharedModels

if TYPE_CHECKING:  # the secagg extra
    from fedpipe.server.transports.dask.secure import WorkerSession

__all__ = [
    "DP_SGD_RECORD",
    "MASKED",
    "Job",
    "Op",
    "Outcome",
    "WorkerCalls",
    "WorkerClients",
    "run_jobs",
    "train_stacked",
]

log = logging.getLogger(__name__)

Op = Literal[
    "init",
    "train",
    "evaluate",
    "train_masked",  # secure aggregation: a train task whose reply is masked
    "train_stacked",  # the worker's clients of a round trained at once: train_stacked
    "secagg_advertise",
    "secagg_share",
    "secagg_unmask",
]
#: A client's name and, when the worker must (re)build it, its ``train`` and ``eval`` data
#: (and its DP-SGD record, :data:`DP_SGD_RECORD`, once it has one), and the server's message
#: of a secure aggregation stage (protobuf bytes, :mod:`.secure`).
Job = tuple[str, dict[str, Any] | None, bytes | None]
#: The key of a DP-SGD client's accountant state in its train replies and its (re)placement:
#: a client placed afresh on another worker keeps counting the privacy its run spent.
DP_SGD_RECORD = "dp_sgd_record"
#: The key of the masked input in a ``train_masked`` reply (its partial is then empty).
MASKED = "masked"
#: ``("ok", reply)`` or ``("error", message)``, one per job.
Outcome = tuple[str, Any]


@dataclass
class _Client:
    trainer: LocalTrainer
    train_data: Dataset
    eval_data: Dataset | None
    secure: WorkerSession | None = None


@dataclass
class _WorkerState:
    setup: RunSetup
    models: SharedModels
    noise_seed: int | None = None
    dp_sgd: DpSgdConfig | None = None
    stack_clients: int | None = None
    clients: dict[str, _Client] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    engine: StackedTrainer | None = None

    def stacked(self) -> StackedTrainer:
        """The worker's stacked engine on its model, built on first use."""
        if self.engine is None:
            model = self.models.get(self.setup)
            self.engine = StackedTrainer(model, self.stack_clients or 1024)
        return self.engine


class WorkerClients(WorkerPlugin):
    """Each worker's model object and clients for one run (see the module docstring).

    Parameters
    ----------
    setup:
        The run setup (:meth:`RunSetup.to_data`).
    plugins:
        Modules each worker imports first (the simulation's plugins: its models...).
    device:
        Where each worker puts its model: one of the devices this names on that worker,
        spread over the workers (``"cuda"`` on a machine with 2 GPUs: worker 0 on
        ``cuda:0``, worker 1 on ``cuda:1``, worker 2 on ``cuda:0``...; on a worker that sees
        one GPU, that one); ``None``, where the factory puts it.
    noise_seed:
        The simulation's client-local seed of privacy noise (each client mixes its name in);
        ``None``: OS entropy.
    dp_sgd:
        The clients' own sample-level DP-SGD settings (:class:`DpSgdConfig` as plain data).
    stack_clients:
        Clients a worker's stacked engine trains at once (``SimulationConfig.stack_clients``);
        None: the run's clients train one after another.
    """

    def __init__(
        self,
        setup: dict[str, Any],
        plugins: list[str],
        device: Any = None,
        noise_seed: int | None = None,
        dp_sgd: dict[str, Any] | None = None,
        stack_clients: int | None = None,
    ) -> None:
        self.setup_data, self.plugins, self.device = setup, plugins, device
        self.noise_seed, self.dp_sgd, self.stack_clients = noise_seed, dp_sgd, stack_clients
        self._states: dict[str, _WorkerState] = {}

    def setup(self, worker: Worker) -> None:
        import_plugins(self.plugins)
        devices = resolve_devices(self.device)
        mine = [devices[_device_index(worker.name, len(devices))]] if devices else []
        models = SharedModels(mine)
        setup = RunSetup.from_data(self.setup_data)
        dp_sgd = None if self.dp_sgd is None else DpSgdConfig.model_validate(self.dp_sgd)
        self._states[worker.address] = _WorkerState(
            setup, models, self.noise_seed, dp_sgd, self.stack_clients
        )

    def teardown(self, worker: Worker) -> None:
        state = self._states.pop(worker.address, None)
        if state is not None:
            state.clients.clear()
            state.models.close()

    def state(self, worker: Worker) -> _WorkerState:
        return self._states[worker.address]


class WorkerCalls:
    """The server's calls to one worker's clients of a run, a Dask actor on that worker
    (``Client.submit(WorkerCalls, plugin, actor=True)``): :func:`run_jobs` and
    :func:`train_stacked` on the registry of the plugin named ``plugin``.

    A call answers, whatever fails: an exception it let out would travel pickled (a user
    model's exception class, which the server may not rebuild), and Dask never resolves an
    actor call whose answer the server cannot read; its clients would wait for the round's
    deadline. What fails the call is each of its clients' failure, as plain text."""

    def __init__(self, plugin: str) -> None:
        worker = get_worker()
        self.state: _WorkerState = worker.plugins[plugin].state(worker)  # type: ignore[attr-defined]

    def run_jobs(self, op: Op, names: np.ndarray, *args: Any) -> list[Outcome]:
        try:
            return run_jobs(self.state, op, names, *args)
        except Exception as exc:
            log.warning(
                "%s of %d client(s) failed: %s: %s", op, len(names), type(exc).__name__, exc
            )
            return [("error", f"{type(exc).__name__}: {exc}")] * len(names)

    def train_stacked(self, names: np.ndarray, *args: Any) -> dict[str, Any]:
        try:
            return train_stacked(self.state, names, *args)
        except Exception as exc:
            log.warning("stacked training of %d client(s) failed: %s: %s", len(names),
                        type(exc).__name__, exc)  # fmt: skip
            why = f"{type(exc).__name__}: {exc}"
            return {"names": [], "failures": dict.fromkeys(names.tolist(), why), "chunks": []}


def run_jobs(
    state: _WorkerState,
    op: Op,
    names: np.ndarray,
    messages: list[bytes | None] | None,
    inits: PackedInits,
    shared: dict[str, Any] | None,
    round_number: int,
) -> list[Outcome]:
    """``op`` for each client of ``names`` (an array of str: Dask does not walk it, as it
    walks a list of thousands) on the worker of ``state``, in order, with its ``messages`` entry
    (a secure aggregation stage's; None: no client has one), those in ``inits``
    (:func:`~.payloads.packed_inits`) built first; ``shared`` holds the round's ``weights``,
    ``aux_vars`` and ``dp`` settings (distributed client-level DP: each client clips and
    noises its update), sent once per worker and round; ``None`` for ``init``."""
    built = inits_from(inits)
    jobs = [
        (name, built.get(name), None if messages is None else messages[k])
        for k, name in enumerate(names.tolist())
    ]
    with state.lock:
        weights: Vector | None = None
        aux_vars: dict[str, Summable] = {}
        dp: dict[str, Any] | None = None
        if shared is not None:
            dp = shared.get("dp")
            like = state.models.get(state.setup).get_weights(copy=False)
            weights = vector_from(shared["weights"], "weights").like(like)
            aux_vars = {
                k: summable_from(v, f"aux var {k!r}") for k, v in shared["aux_vars"].items()
            }
        return [_run(state, op, job, weights, aux_vars, round_number, dp) for job in jobs]


def _run(
    state: _WorkerState,
    op: Op,
    job: Job,
    weights: Vector | None,
    aux_vars: dict[str, Summable],
    round_number: int,
    dp: dict[str, Any] | None = None,
) -> Outcome:
    """One client's part of a task; its failure is its own (reported, the others go on)."""
    name, init, data = job
    try:
        client = _client(state, name, init)
        if client is None:
            return "error", _not_here(name)
        if op in ("train", "train_masked"):
            assert weights is not None
            trainer = client.trainer
            result = trainer.train(
                client.train_data, weights, aux_vars, client=name, round_number=round_number, dp=dp
            )
            if op == "train_masked":
                assert data is not None
                result = _session(client, name).mask(round_number, data, trainer.aggregator, result)
            reply = plain_train(result)
            if result.masked is not None:
                reply[MASKED] = plain_vector(result.masked.masked)
            if trainer.dp_sgd is not None:
                reply[DP_SGD_RECORD] = trainer.dp_sgd.accountant.get_state()
            return "ok", reply
        if op == "evaluate":
            if client.eval_data is None:
                return "error", f"client {name} has no evaluation data"
            assert weights is not None
            evaluated = client.trainer.evaluate(client.eval_data, weights, aux_vars)
            return "ok", plain_eval(evaluated)
        if op != "init":  # one of secure aggregation's stages
            return "ok", _session(client, name).stage(
                op,  # type: ignore[arg-type]
                round_number,
                data,
            )
        return "ok", None
    except Exception as exc:  # reported as this client's failure, as in-process clients' are
        log.warning("client %s failed %s: %s: %s", name, op, type(exc).__name__, exc)
        return "error", f"{type(exc).__name__}: {exc}"


def train_stacked(
    state: _WorkerState,
    names: np.ndarray,
    inits: PackedInits,
    shared: dict[str, Any],
    round_number: int,
) -> dict[str, Any]:
    """The clients ``names`` (an array of str) trained at once on the worker of ``state``
    from the round's ``shared`` weights, those in ``inits`` (:func:`~.payloads.packed_inits`)
    built first from their data. Its answer: ``names``, the clients trained, in that order,
    and their rows as the engine's ``chunks`` (each
    :class:`~fedpipe.common.stacked.StackedUpdates`' fields as arrays, a leading client axis,
    ``seconds`` per client; not joined here, so that the worker holds its clients' updates
    once), ``failures`` (client name -> why); or ``declined`` (why they cannot train stacked:
    nothing was trained) and ``failures``."""
    built = inits_from(inits)
    with state.lock:
        failures: dict[str, str] = {}
        jobs_here: list[ClientJob] = []
        for name in names.tolist():
            try:
                client = _client(state, name, built.get(name))
            except Exception as exc:  # its placement failed: this client's failure alone
                failures[name] = f"{type(exc).__name__}: {exc}"
                continue
            if client is None:
                failures[name] = _not_here(name)
                continue
            jobs_here.append(ClientJob(name, client.trainer, client.train_data))
        engine, reason = state.stacked(), None
        if state.stack_clients is None:
            reason = "the run trains its clients one after another (mode='sequential')"
        elif jobs_here:
            reason = cohort_unfit(engine.model, jobs_here, bool(shared.get("dp")))
        if reason is not None:
            return {"declined": reason, "failures": failures}
        like = engine.model.get_weights(copy=False)
        weights = vector_from(shared["weights"], "weights").like(like)
        trained, chunks = _stacked(engine, jobs_here, weights, round_number, failures)
        return {"names": trained, "failures": failures, "chunks": [vars(c) for c in chunks]}


def _stacked(
    engine: StackedTrainer,
    jobs: list[ClientJob],
    weights: Vector,
    round_number: int,
    failures: dict[str, str],
) -> tuple[list[str], list[StackedUpdates]]:
    """The clients trained and their rows, chunk by chunk; when the engine raises (a client's
    bad data), each client alone through it, and those that raise in ``failures``."""
    steps = [job.trainer.optimizer.step for job in jobs]
    try:
        return [job.name for job in jobs], list(engine.train(jobs, weights, round_number))
    except Exception as exc:
        log.warning("round %d: stacked training of %d client(s) failed (%s: %s); they train "
                    "one at a time", round_number, len(jobs), type(exc).__name__, exc)  # fmt: skip
    names: list[str] = []
    chunks: list[StackedUpdates] = []
    for job, step in zip(jobs, steps, strict=True):
        job.trainer.optimizer.step = step
        try:
            chunks += engine.train([job], weights, round_number)
            names.append(job.name)
        except Exception as exc:
            job.trainer.optimizer.step = step
            failures[job.name] = f"{type(exc).__name__}: {exc}"
    return names, chunks


def _client(state: _WorkerState, name: str, init: dict[str, Any] | None) -> _Client | None:
    """Client ``name`` on this worker, built first when ``init`` brings its data."""
    if init is not None:
        _place(state, name, init)
    return state.clients.get(name)


def _not_here(name: str) -> str:
    return f"client {name} is not on this worker (it was never placed here)"


def _place(state: _WorkerState, name: str, init: dict[str, Any]) -> None:
    """Build client ``name`` on this worker: its trainer on the worker's model, its data,
    and its DP-SGD record when it had one elsewhere."""
    train = dataset_from(init["train"])
    assert train is not None  # the server always sends training data
    trainer = LocalTrainer(
        state.setup,
        model=state.models.get(state.setup),
        noise_seed=state.noise_seed,
        client=name,
        dp_sgd=state.dp_sgd,
    )
    record = init.get(DP_SGD_RECORD)
    if trainer.dp_sgd is not None and record is not None:  # it keeps counting
        trainer.dp_sgd.accountant.set_state(record)
    state.clients[name] = _Client(trainer, train, dataset_from(init["eval"]))


def _session(client: _Client, name: str) -> WorkerSession:
    """The client's secure aggregation session (the secagg extra, imported when used)."""
    if client.secure is None:
        from fedpipe.server.transports.dask.secure import WorkerSession

        client.secure = WorkerSession(name)
    return client.secure


def _device_index(name: object, n_devices: int) -> int:
    """Which of the ``n_devices`` a worker sees the worker ``name`` takes: a local cluster's
    workers are numbered (``0, 1, ...``) and go round the devices; a named worker's pick is a
    hash of its name, the same on every run."""
    if isinstance(name, int) and not isinstance(name, bool):
        return name % n_devices
    digest = hashlib.blake2b(str(name).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n_devices
