"""The federated round loop, written against client proxies (one loop, any transport)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from fedpipe.common import registry
from fedpipe.common.aggregators import Aggregator, BufferedAggregator
from fedpipe.common.aggregators.replies import ReplyBuffer, remove_stale_spills
from fedpipe.common.aggregators.weighting import ClientWeighting
from fedpipe.common.buffers import (
    BUFFERS_AUX,
    admit_share,
    check_share,
    global_buffers,
    mean_buffers,
    split_buffers,
)
from fedpipe.common.config import ConfigError, ServerConfig
from fedpipe.common.metrics import MetricSet
from fedpipe.common.optim import BareWeights, Optimizer
from fedpipe.common.outcome import RunError
from fedpipe.common.state import State
from fedpipe.common.summable import Summable
from fedpipe.common.training import EvalResult, RunSetup, TrainResult, build_model
from fedpipe.common.vector import ArraySpec, Vector
from fedpipe.server.best_model import BEST_MODEL_NAME, BestRound
from fedpipe.server.checkpoint import (
    CheckpointError,
    load_checkpoint,
    remove_interrupted_writes,
    save_checkpoint,
    save_model,
)
from fedpipe.server.client_log import ClientLog, RoundClients
from fedpipe.server.clients import ClientError, ClientPool, ClientProxy, RoundTask, RunOutcome
from fedpipe.server.cohorts import train_cohort
from fedpipe.server.history import EarlyStopping, History
from fedpipe.server.malloc_heap import release_free_heap
from fedpipe.server.privacy.client_level import (
    BudgetSpent,
    ClientLevelDP,
    build_client_level_dp,
    check_private_run,
)
from fedpipe.server.privacy.journal import take_journal, write_journal
from fedpipe.server.root_update import RootUpdate
from fedpipe.server.run_checks import aux_var_modules, refuse_any
from fedpipe.server.run_dir import prepare_run_dir
from fedpipe.server.run_lock import RunLock
from fedpipe.server.sampling import ClientSampler
from fedpipe.server.update_validation import UpdateValidation

__all__ = ["FederatedRun", "RunError", "RunSummary"]

log = logging.getLogger(__name__)

R = TypeVar("R")

#: What a misbehaving client or a bad reply raises: logged in one line, the round goes on.
EXPECTED_CLIENT_ERRORS = (ClientError, ValueError, TypeError, KeyError, OSError)

#: Seconds to hand a client the stop task (a client that stopped reading never takes it).
STOP_TIMEOUT = 5.0

#: Below this many elements, adding a partial inline beats a hop to a worker thread.
INLINE_ADD_ELEMENTS = 1 << 20


RunStatus = Literal["completed", "failed", "stopped"]


@dataclass
class RunSummary:
    """How a run ended.

    ``status`` is ``completed`` (every round ran, or early stopping ended it), ``failed``
    (``reason`` says why: no clients, too few results, a disk error...) or ``stopped`` (a
    signal ended it before its last round; ``--resume`` continues it). ``rounds_completed``
    counts the rounds whose results were aggregated and checkpointed, and the empty rounds
    (a Poisson sampler drew no client: nothing to aggregate, nothing failed).
    """

    status: RunStatus
    reason: str
    rounds_completed: int
    stopped_early: bool
    history: list[dict[str, Any]]
    weights: Vector
    #: The best round by the run's best metric (``best_round``, ``best_value``...), if any.
    best: dict[str, Any] = field(default_factory=dict)
    #: Client-level DP: ``epsilon`` spent, ``delta``, ``noise_multiplier``... (if configured).
    privacy: dict[str, Any] = field(default_factory=dict)

    def raise_for_status(self) -> RunSummary:
        """Raise :class:`RunError` with the reason if the run failed; else return self."""
        if self.status == "failed":
            raise RunError(self.reason)
        return self

    def to_data(self) -> dict[str, Any]:
        """What ``summary.json`` holds."""
        return {
            "status": self.status,
            "reason": self.reason,
            "rounds_completed": self.rounds_completed,
            "last_round": self.history[-1]["round"] if self.history else 0,
            "stopped_early": self.stopped_early,
            **self.best,
            **self.privacy,
        }


class FederatedRun:
    """Runs ``config.rounds`` federated rounds with the clients of ``pool``.

    Each round: sample clients, send them the global weights and the server optimizer's aux
    vars, fold replies into one running sum as they arrive (invalid ones are logged and
    dropped), stop waiting at the round deadline, aggregate if at least ``min_results``
    replies arrived, run the server optimizer, evaluate every ``eval_every`` rounds,
    checkpoint atomically, log.
    """

    def __init__(
        self,
        config: ServerConfig,
        pool: ClientPool,
        *,
        stop_event: asyncio.Event | None = None,
        on_round: Callable[[dict[str, Any]], None] | None = None,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        self.config = config
        self.pool = pool
        self.stop_event = stop_event or asyncio.Event()
        self.on_round = on_round
        #: Told the reason label of each reply the round loop's checks refuse (monitoring).
        self.on_rejected: Callable[[str], None] | None = None
        self.setup = RunSetup(
            model=config.model.model_dump(),
            client_optimizer=config.client_optimizer.model_dump(),
            aggregator=config.aggregator,
            metrics=list(config.metrics),
            training=config.training.model_dump(),
            seed=config.seed,
            run_id=config.run_id,
        )
        try:
            model = build_model(self.setup)
            self.model = BareWeights(model.get_weights().to_numpy())
            #: The global buffers when they travel (``model.buffers = "average"``).
            self.buffers = _travelling(model.get_buffers().to_numpy(), config.model.buffers)
            self.aggregator: Aggregator = registry.build_spec("aggregator", config.aggregator)
            self.sampler: ClientSampler = registry.build_spec("sampler", config.sampler)
            self.root = RootUpdate.of(self.setup, self.aggregator)  # FLTrust's server update
            self.optimizer: Optimizer = config.server_optimizer.build()
            # Built once here so that a typo fails now, not on every client after start-up.
            config.client_optimizer.build()
            metric_names = MetricSet(config.metrics).result().keys()
            if config.secure_aggregation is not None:  # the aggregator and modules it allows
                from fedpipe.server.secure_rounds import check_secure_run

                check_secure_run(config, self.aggregator, self.optimizer)
        except (ValueError, TypeError, KeyError, ImportError) as exc:
            raise ConfigError(f"cannot build the run from its config: {exc}") from exc
        self.specs: dict[str, ArraySpec] = self.model.weights.specs()
        # ---- client-level DP (fedpipe.server.privacy) ----
        self.privacy: ClientLevelDP | None = None
        if config.privacy is not None:
            check_private_run(config, self.optimizer)
            self.privacy = build_client_level_dp(
                config.privacy,
                self.sampler,
                self.aggregator,
                config.rounds,
                config.min_clients,
                min_replies=config.required_results,
            )
        self.metric_specs = list(config.metrics)
        #: The sampler's random source: seeded with the run seed, advanced by each round's
        #: draw, saved in the checkpoint (with the sampler's state) after each round. Under
        #: client-level DP, from OS entropy: amplification by subsampling holds only if who
        #: is drawn is secret, and every client knows the run seed.
        seed = config.seed if self.privacy is None else np.random.SeedSequence()
        self.rng = np.random.default_rng(seed)
        self.round = 0
        self.completed = 0  # rounds aggregated and checkpointed
        self._round_task: asyncio.Future[dict[str, Any]] | None = None
        self.output_dir: Path | None = Path(config.output_dir) if config.output_dir else None
        if isinstance(self.aggregator, BufferedAggregator):  # replies past the budget: files
            self.aggregator.memory_bytes = config.aggregation_memory_bytes
            self.aggregator.spill_dir = self.output_dir
        self.validation = UpdateValidation(config.validation) if config.validation else None
        if self.validation is not None and isinstance(self.aggregator, BufferedAggregator):
            _check_screened_at_close(config, self.optimizer)
        self.history = History(self.output_dir)
        self.early_stop = EarlyStopping(config.early_stop) if config.early_stop else None
        self.client_log = ClientLog(self.output_dir)
        best = BestRound.from_config(config, metric_names)
        self.best = best if self.output_dir is not None else None
        #: Round of each client's latest aggregated reply: the state its next round starts from.
        self.base_rounds: dict[str, int] = {}
        # Taken before any file of the run directory is touched: another run may be using it.
        # Creating the lock file also proves, before any client is admitted, that the
        # directory can be written.
        self._lock = RunLock(self.output_dir) if self.output_dir is not None else None
        try:
            if self.output_dir is not None:
                prepare_run_dir(self.output_dir, resume=resume, overwrite=overwrite)
                remove_interrupted_writes(self.output_dir)
                remove_stale_spills(self.output_dir)
                # The run is under way: no summary until it ends, never a last run's.
                (self.output_dir / "summary.json").unlink(missing_ok=True)
            if resume:
                self._resume()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run directory, for another run to use (idempotent)."""
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> FederatedRun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def global_model(self) -> Vector:
        """What ``model.npz`` holds: the weights, and the global buffers when they travel."""
        if self.buffers is None:
            return self.model.weights
        return Vector({**self.model.weights.to_numpy().coefs, **self.buffers.coefs})

    # ---- checkpoints ------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path | None:
        return self.output_dir / "checkpoint.fpk" if self.output_dir else None

    def _resume(self) -> None:
        """Continue from the checkpoint: weights, server optimizer, RNG, round, history and
        each client's base round. Rounds the crashed server ran past its last checkpoint are
        replayed, their lines in ``metrics.jsonl`` replaced (clients roll their module state
        back to the base round each train task names: bit-identical results)."""
        path = self.checkpoint_path
        if path is None or not path.exists():
            log.warning("no checkpoint at %s: starting from round 0", path)
            self.history = History.resumed(self.output_dir, [])
            if path is not None and self.privacy is not None:  # a round 1 that left
                try:
                    take_journal(path.parent, self.privacy.accountant)
                except ValueError as exc:
                    raise CheckpointError(str(exc)) from None
            return
        state = load_checkpoint(path)
        try:
            weights, history, base_rounds = _checkpoint_fields(state)
            weights.check_specs(self.model.master.specs(), "weights")
            buffers = _checkpoint_buffers(state, self.buffers)
            self.optimizer.set_state(state["optimizer"])  # type: ignore[arg-type]
            self.rng.bit_generator.state = json.loads(str(state["rng"]))
            self.sampler.set_state(state.get("sampler", {}))  # type: ignore[arg-type]
            if self.validation is not None:
                self.validation.set_state(state.get("validation", {}))  # type: ignore[arg-type]
            if self.privacy is not None:  # the accountant keeps counting
                self.privacy.set_state(state["privacy"])  # type: ignore[arg-type]
                take_journal(path.parent, self.privacy.accountant)
        except (ValueError, TypeError, KeyError) as exc:
            # A valid file with the wrong contents: another run's, or damaged in the middle.
            raise CheckpointError(f"{path} does not fit this run: {exc}") from None
        self.model.master, self.buffers = weights, buffers
        self.round = int(state["round"])  # type: ignore[arg-type]
        self.base_rounds = base_rounds
        self.history = History.resumed(self.output_dir, history)
        self.completed = sum(1 for r in self.history.records if not r.get("failed"))
        if self.early_stop is not None:
            self.early_stop.replay(self.history.records)
        self.client_log.truncate(self.round)
        self._resume_best()
        log.info("resumed from %s at round %d", path, self.round)

    def _resume_best(self) -> None:
        """Rebuild the best round from the history. ``best_model.npz`` is written after the
        checkpoint: a crash between the two leaves the checkpoint's round as the best with an
        older file, rewritten here from the checkpoint's weights (they are that round's)."""
        if self.best is None or self.output_dir is None:
            return
        self.best.replay(self.history.records)
        path = self.output_dir / BEST_MODEL_NAME
        if self.best.round and self.best.round == self.round:
            save_model(path, self.global_model)
        elif self.best.round and not path.exists():
            log.warning(
                "%s of round %d is missing: it comes back when a round beats it",
                path,
                self.best.round,
            )

    def _journal_privacy(self, round_number: int) -> None:
        """Record what the run spent before the round's model first leaves the server
        (:mod:`fedpipe.server.privacy.journal`); only a run that can resume needs it."""
        path = self.checkpoint_path
        if path is not None and self.config.checkpoint and self.privacy is not None:
            write_journal(path.parent, round_number, self.privacy.accountant)

    def _checkpoint(self) -> None:
        path = self.checkpoint_path
        if path is None or not self.config.checkpoint:
            return
        save_checkpoint(
            path,
            {
                "round": self.round,
                "weights": self.model.master,  # float32 for half-precision models
                **({"buffers": self.buffers} if self.buffers is not None else {}),
                "optimizer": self.optimizer.get_state(),
                "rng": json.dumps(self.rng.bit_generator.state),  # 128-bit ints: as text
                "sampler": self.sampler.get_state(),
                "base_rounds": dict(self.base_rounds),
                **({"validation": self.validation.get_state()} if self.validation else {}),
                "privacy": self.privacy.get_state() if self.privacy is not None else {},
                # Scalars only: per-round client lists stay in metrics.jsonl, else each
                # checkpoint would grow with rounds x clients.
                "history": [
                    {k: v for k, v in r.items() if not isinstance(v, list)}
                    for r in self.history.records
                ],
            },
        )

    # ---- the run ----------------------------------------------------------------------------

    async def run(self) -> RunSummary:
        """Run the remaining rounds; the summary says how the run ended (never raises for a
        failed run: see :meth:`RunSummary.raise_for_status`)."""
        cfg = self.config
        status: RunStatus = "completed"
        reason = ""
        stopped_early = False
        first = True  # min_clients is awaited before this process's first round only
        try:
            while self.round < cfg.rounds:
                if self.stop_event.is_set():
                    raise _Stopped
                record = await self._run_round_task(self.round + 1, wait_for_all=first)
                first = False
                if self.on_round is not None:
                    self.on_round(record)
                # Counted over the whole history: a resumed run has no fresh allowance.
                failed = sum(1 for r in self.history.records if r.get("failed"))
                if record.get("failed") and failed > cfg.max_failed_rounds:
                    status = "failed"
                    reason = (
                        f"round {record['round']}: {record['failed']} ({record['replied']} "
                        f"of {record['sampled']} sampled client(s) replied, "
                        f"min_results={cfg.required_results})"
                    )
                    break
                if self.early_stop is not None and cfg.early_stop is not None:
                    value = record.get(cfg.early_stop.metric)
                    if value is not None and self.early_stop.update(float(value)):
                        log.info("early stop: %s has not improved", cfg.early_stop.metric)
                        stopped_early = True
                        break
            if status == "completed" and self.completed == 0:
                status, reason = "failed", "no round completed (every round failed)"
        except BudgetSpent as spent:  # a planned end, like early stopping
            reason, stopped_early = str(spent), True
            log.info("%s", reason)
            if self.completed == 0:
                status = "failed"
        except _Stopped as stop:
            status = "stopped"
            reason = str(stop) or f"stopped by a signal after round {self.round}"
        except RunError as exc:
            status, reason = "failed", str(exc)
        except BaseException as exc:  # a bug or a cancellation: clients and files still learn
            status, reason = "failed", f"{type(exc).__name__}: {exc}"
            raise
        finally:
            # The files first: what the clients are told is what summary.json says.
            status, reason = self._write_final(status, reason, stopped_early)
            if status == "failed":
                log.error("run failed: %s", reason)
            self.close()  # its files are final: the directory is free for the next run
            await self._stop_clients(RunOutcome(status, reason))
        return self._summary(status, reason, stopped_early)

    def _summary(self, status: RunStatus, reason: str, stopped_early: bool) -> RunSummary:
        best = self.best.to_data() if self.best is not None else {}
        records, weights = self.history.records, self.model.weights
        privacy = self.privacy.summary() if self.privacy is not None else {}
        sample = [r["sample_epsilon_max"] for r in records if "sample_epsilon_max" in r]
        if sample:  # ε only grows with a client's steps: the run's largest report
            privacy = {**privacy, "sample_epsilon_max": max(sample)}
        return RunSummary(
            status, reason, self.completed, stopped_early, records, weights, best, privacy
        )

    async def _run_round_task(self, round_number: int, *, wait_for_all: bool) -> dict[str, Any]:
        """:meth:`run_round` as a task that :meth:`abandon_round` can cancel."""
        self._round_task = asyncio.ensure_future(
            self.run_round(round_number, wait_for_all=wait_for_all)
        )
        try:
            return await self._round_task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self._round_task.cancelled() and not (current and current.cancelling()):
                raise _Stopped(
                    f"round {round_number} abandoned by a second stop signal; the last "
                    f"checkpoint is round {self.round}"
                ) from None
            raise
        finally:
            self._round_task = None

    def abandon_round(self) -> None:
        """Stop now (a second SIGTERM/SIGINT): drop the round under way, keep the last
        checkpoint, tell the clients, write the files."""
        self.stop_event.set()
        if self._round_task is not None:
            self._round_task.cancel()

    def _write_final(
        self, status: RunStatus, reason: str, stopped_early: bool
    ) -> tuple[RunStatus, str]:
        """Write ``model.npz`` and ``summary.json``; a disk error turns the run into a failure
        (with its first cause as the reason) rather than a half-written success."""
        if self.output_dir is None:
            return status, reason
        try:
            save_model(self.output_dir / "model.npz", self.global_model)
        except OSError as exc:
            if status != "failed":
                status, reason = "failed", f"cannot write {self.output_dir / 'model.npz'}: {exc}"
            log.error("cannot write the final model: %s", exc)
        summary = self._summary(status, reason, stopped_early)
        try:
            _write_text_atomic(self.output_dir / "summary.json", json.dumps(summary.to_data()))
        except OSError as exc:
            log.error("cannot write summary.json: %s", exc)
            if status != "failed":
                status, reason = "failed", f"cannot write summary.json: {exc}"
        return status, reason

    async def _wait_for_clients(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` clients are connected, at most ``timeout`` seconds; False when
        they did not come. A stop signal ends the wait at once (raises ``_Stopped``)."""
        if len(self.pool) >= count:
            return True
        log.info("waiting for %d client(s) (timeout %.0fs)", count, timeout)
        arrived = asyncio.ensure_future(self.pool.wait_for(count, timeout))
        stopped = asyncio.ensure_future(self.stop_event.wait())
        try:
            await asyncio.wait({arrived, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            arrived.cancel()
            stopped.cancel()
        if self.stop_event.is_set():
            raise _Stopped
        return arrived.done() and not arrived.cancelled() and arrived.result()

    async def run_round(self, round_number: int, *, wait_for_all: bool = False) -> dict[str, Any]:
        """Run one round; returns (and records) its metrics.

        ``round_timeout`` bounds the whole round: waiting for clients (after the first round),
        setting up new ones, training and evaluation share one deadline. With
        ``wait_for_all`` (this process's first round) the round first waits up to
        ``wait_timeout`` for ``min_clients``; later rounds go on with whoever is connected
        once ``min_results`` clients are, so a lost client never stalls the run.
        """
        cfg = self.config
        if wait_for_all and not await self._wait_for_clients(cfg.min_clients, cfg.wait_timeout):
            raise RunError(
                f"only {len(self.pool)} of min_clients={cfg.min_clients} client(s) connected "
                f"within wait_timeout={cfg.wait_timeout}s"
            )
        start = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + cfg.round_timeout
        if not wait_for_all:
            await self._wait_for_clients(cfg.required_results, cfg.round_timeout)
        await self._initialize_new_clients(deadline)
        candidates = [c for c in self.pool.clients() if c.initialized]
        sampled = self.sampler.sample(candidates, self.rng, round_number)
        dp_fields: dict[str, Any] = {}
        if self.privacy is not None and candidates:  # the round is counted before it runs
            dp_fields = self.privacy.begin_round(round_number, len(candidates), len(sampled))
        if candidates and not sampled:
            return self._empty_round(round_number, start, dp_fields)
        task = RoundTask(
            round_number,
            self.model.weights,
            {**self.optimizer.collect_aux_var(), **self._buffers_aux()},
            base_rounds=dict(self.base_rounds),
        )
        if self.privacy is not None and self.privacy.config.mode == "distributed":
            task.settings["dp"] = self.privacy.client_settings()
        if cfg.secure_aggregation is None:
            folded, clients = await self._train(sampled, task, deadline, start)
        else:  # masked updates: the server learns only their sum
            from fedpipe.server.secure_rounds import secure_train

            folded, clients = await secure_train(self, sampled, task, deadline, start)
        self.sampler.observe(clients.losses())
        record: dict[str, Any] = {
            "round": round_number,
            "sampled": len(sampled),
            "replied": folded.count,
            "clients": sorted(folded.names),
            **dp_fields,
        }
        if folded.sample_epsilon is not None:  # the clients' own DP-SGD, as they report it
            record["sample_epsilon_max"] = folded.sample_epsilon
        if folded.failure:  # no usable sum: secure aggregation, a staged reply (logged)
            record["failed"] = folded.failure
        elif folded.count >= cfg.required_results and folded.total is not None:
            record["train_loss"] = folded.loss_sum / max(folded.seen, 1)
            try:
                self._step(folded, round_number)
            except (ValueError, TypeError, ArithmeticError) as exc:
                # Replies were checked one by one; their sum can still be unusable (a total
                # weight of 0...). The round fails, the global model stays as it was.
                log.error(
                    "round %d: aggregation failed: %s; global model unchanged", round_number, exc
                )
                record["failed"] = "aggregation failed"
        else:
            log.warning(
                "round %d: %d result(s), below min_results=%d; global model unchanged",
                round_number,
                folded.count,
                cfg.required_results,
            )
            record["failed"] = "too few results"
        if cfg.eval_every and round_number % cfg.eval_every == 0:
            if self.privacy is not None and not record.get("failed"):
                self._journal_privacy(round_number)  # the model leaves before its checkpoint
            record.update(await self.evaluate(round_number, sampled, deadline, clients))
        self.round = round_number
        record["seconds"] = round(time.perf_counter() - start, 6)
        self._persist(record, clients)
        release_free_heap()  # this round's freed chunks must not add to the next one's peak
        return record

    def _buffers_aux(self) -> dict[str, Summable]:
        """The global buffers as a task carries them, when they travel."""
        return global_buffers(self.buffers) if self.buffers is not None else {}

    def _empty_round(
        self, round_number: int, start: float, dp_fields: dict[str, Any]
    ) -> dict[str, Any]:
        """A round whose sampler drew no client (Poisson sampling may): the model stays as it
        is, the round is recorded and checkpointed, and it is not a failed round."""
        log.warning("round %d: the sampler drew no client; the round is empty", round_number)
        record: dict[str, Any] = {"round": round_number, "sampled": 0, "replied": 0, "clients": []}
        record.update(dp_fields)
        self.round = round_number
        record["seconds"] = round(time.perf_counter() - start, 6)
        self._persist(record, RoundClients(round_number, []))
        return record

    async def _train(
        self, sampled: list[ClientProxy], task: RoundTask, deadline: float, start: float
    ) -> tuple[_Fold, RoundClients]:
        """Send ``task`` to the sampled clients and fold their replies as they arrive; what
        each client did (``start``: the round's ``perf_counter``) goes in the records.
        Clients that train together (:mod:`fedpipe.server.cohorts`) answer as one."""
        together = await train_cohort(self, sampled, task, deadline, start)
        if together is not None:
            return together
        on_arrival = None if isinstance(self.aggregator, BufferedAggregator) else self.validation
        # A streaming sum takes each reply from disk once it is complete (the server holds the
        # weights, the sum and the chunks in flight); client-level DP clips whole replies.
        streaming = not isinstance(self.aggregator, BufferedAggregator)
        task.spill_updates = streaming and self.privacy is None and self.aggregator.streams
        buffer_specs = self.buffers.specs() if self.buffers is not None else None
        folded = _Fold(
            self.aggregator,
            self.optimizer,
            self.specs,
            validation=on_arrival,
            privacy=self.privacy,
            buffer_specs=buffer_specs,
        )
        clients = RoundClients(task.round_number, [c.name for c in sampled])

        async def fold(client: ClientProxy, result: TrainResult) -> None:
            await folded.add(client, result)
            clients.trained(client.name, result, time.perf_counter() - start)

        failures: dict[str, str] = {}
        await self._collect(sampled, lambda c: c.train(task), fold, deadline, failures)
        await folded.settled()
        if self.validation is not None:
            if isinstance(folded.total, ReplyBuffer):  # buffered: the round's exact median
                for name in self.validation.screen(folded.total, folded.names):
                    folded.drop(name, failures)
            self.validation.end_round()
        clients.failed(failures)
        return folded, clients

    def _persist(self, record: dict[str, Any], clients: RoundClients) -> None:
        """Record the round and checkpoint it; only then does it count as completed. The best
        model is written after the checkpoint, which a resume relies on."""
        try:
            self.history.append(record)
            self.client_log.append(clients)
            self._checkpoint()
            if self.best is not None and self.output_dir and self.best.update(record):
                save_model(self.output_dir / BEST_MODEL_NAME, self.global_model)
        except OSError as exc:
            raise RunError(
                f"round {record['round']}: cannot write its results to {self.output_dir}: {exc}"
            ) from exc
        if not record.get("failed"):
            self.completed += 1

    def _step(self, folded: _Fold, round_number: int) -> None:
        """Aggregate the round's sum and let the server optimizer move the global model; the
        round becomes the base round of every client folded in."""
        assert folded.total is not None
        if self.root is not None:
            self.root.give(self.model.weights, round_number)
        # The sum stays where the replies were added up (a simulation's GPU) until here:
        # it comes to the host once per round, for the server optimizer (numpy).
        if self.privacy is not None:  # clipped sum, noised, over the expected participants
            aggregated = self.privacy.finalize(folded.total).to_numpy()
        else:
            aggregated = self.aggregator.finalize(folded.total).to_numpy()
        folded.total = None  # model-sized: free it before the updates are computed
        shares, aux_total = split_buffers(folded.aux_total)
        if aux_total:
            aux_total = {k: v.to_numpy() for k, v in aux_total.items()}
            self.optimizer.process_aux_var(aux_total, senders=folded.names)
        updates = self.optimizer.compute_updates(self.model, aggregated, consume=True)
        del aggregated
        if not updates.is_finite():
            raise ArithmeticError("the server update is not finite")
        buffers = None
        if shares is not None and self.buffers is not None:  # past every optimizer module
            buffers = mean_buffers(shares.to_numpy(), self.buffers.specs())
            if not buffers.is_finite():
                raise ArithmeticError("the mean of the clients' buffers is not finite")
        self.model.apply_updates(updates)
        self.buffers = buffers if buffers is not None else self.buffers
        self.base_rounds.update(dict.fromkeys(folded.names, round_number))

    async def evaluate(
        self,
        round_number: int,
        clients: list[ClientProxy] | None = None,
        deadline: float | None = None,
        records: RoundClients | None = None,
    ) -> dict[str, float]:
        """Federated evaluation on ``clients`` (the round's sampled clients; default: every
        client): metric states merged across clients (exact), each client's own metrics put
        in ``records``. The global weights go only to clients the round sampled, never to
        every connection."""
        candidates = self.pool.clients() if clients is None else clients
        clients = [c for c in candidates if c.initialized and c.n_eval_samples]
        if not clients:
            return {}
        if deadline is not None and deadline <= asyncio.get_running_loop().time():
            log.warning(
                "round %d: the round deadline passed during training; no evaluation", round_number
            )
            return {}
        task = RoundTask(round_number, self.model.weights, self._buffers_aux())
        merged: dict[str, Summable] = {}
        metric_set = MetricSet(self.metric_specs)

        expected = metric_set.state()

        def fold(client: ClientProxy, result: EvalResult) -> None:
            if result.metrics.keys() != expected.keys():
                raise ClientError(
                    f"metric states {sorted(result.metrics)}, expected {sorted(expected)}"
                )
            for name, state in result.metrics.items():  # check all before adding any
                state.check_like(expected[name], f"metric {name!r}")
                if not state.is_finite():
                    raise ClientError(f"metric {name!r} state is not finite")
            for name, state in result.metrics.items():
                merged[name] = state.copy() if name not in merged else merged[name].add_(state)
            if records is not None:
                try:
                    own = metric_set.result(result.metrics)
                except (ValueError, ArithmeticError) as exc:  # its share is merged all the same
                    log.info("client %s: no metrics of its own: %s", client.name, exc)
                else:
                    records.evaluated(client.name, own, result.n_samples)

        failures: dict[str, str] = {}
        await self._collect(clients, lambda c: c.evaluate(task), fold, deadline, failures)
        if records is not None:
            records.failed(failures, "eval_error")
        if not merged:
            return {}
        return {k: float(v) for k, v in metric_set.result(merged).items()}

    # ---- plumbing ---------------------------------------------------------------------------

    async def _initialize_new_clients(self, deadline: float | None = None) -> None:
        new = [c for c in self.pool.clients() if not c.initialized]
        if not new:
            return

        def accept(client: ClientProxy, _: None) -> None:
            client.initialized = True

        failures: dict[str, str] = {}
        await self._collect(
            new, lambda c: c.initialize(self.setup, self.specs), accept, deadline, failures
        )
        for client in new:
            if not client.initialized:
                # It cannot take part (its model differs, it timed out...): free its place so
                # that it does not count towards min_clients, and tell it why.
                why = failures.get(client.name, "no answer to the run setup in time")
                log.warning(
                    "client %s could not be initialized (%s); dropping it", client.name, why
                )
                await self.pool.remove(client)
                await client.stop(RunOutcome("rejected", why))

    async def _collect(
        self,
        clients: list[ClientProxy],
        call: Callable[[ClientProxy], Awaitable[R]],
        on_result: Callable[[ClientProxy, R], Any],
        deadline: float | None = None,
        failures: dict[str, str] | None = None,
    ) -> int:
        """Run ``call`` on every client concurrently and pass each result to ``on_result`` as
        it arrives, until all are done or ``deadline`` (loop time; default: ``round_timeout``
        from now) passes. A client that fails or whose result ``on_result`` rejects is logged,
        left out and its reason put in ``failures``. Returns the count kept."""
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self.config.round_timeout
        failures = {} if failures is None else failures

        # Results travel through a queue, not as task results: a task keeps its result alive,
        # and a folded reply (model-sized) must be freed before the next one arrives.
        arrived: asyncio.Queue[tuple[ClientProxy, R | Exception]] = asyncio.Queue()

        async def one(client: ClientProxy) -> None:
            try:
                arrived.put_nowait((client, await call(client)))
            except EXPECTED_CLIENT_ERRORS as exc:
                arrived.put_nowait((client, exc))
            except Exception as exc:  # contained, with its traceback: one client, one reply
                log.exception("client %s: unexpected error", client.name)
                arrived.put_nowait((client, exc))

        kept = 0
        tasks = [asyncio.ensure_future(one(c)) for c in clients]
        try:
            async with asyncio.timeout_at(deadline):
                for _ in clients:
                    client, outcome = await arrived.get()
                    try:
                        if isinstance(outcome, BaseException):
                            log.warning("client %s failed: %s", client.name, outcome)
                            failures[client.name] = str(outcome)
                            continue
                        step = on_result(client, outcome)
                        if asyncio.iscoroutine(step):
                            await step
                        kept += 1
                    except EXPECTED_CLIENT_ERRORS as exc:
                        log.warning("client %s: rejected reply: %s", client.name, exc)
                        failures[client.name] = f"rejected reply: {exc}"
                        if self.on_rejected is not None:
                            self.on_rejected("invalid")
                    except Exception:  # contained, with its traceback: never the whole run
                        log.exception("client %s: rejected reply (unexpected error)", client.name)
                        failures[client.name] = "rejected reply (unexpected error)"
                        if self.on_rejected is not None:
                            self.on_rejected("invalid")
                    finally:
                        del outcome  # folded or rejected: its memory may go
                        await client.release()
        except TimeoutError:
            late = [c.name for c, t in zip(clients, tasks, strict=True) if not t.done()]
            log.warning(
                "round deadline (%.1fs) passed; no reply from: %s",
                self.config.round_timeout,
                ", ".join(late),
            )
            failures.update((name, "no reply before the round deadline") for name in late)
        finally:
            for task in tasks:
                task.cancel()
            for client in clients:  # replies that arrived but were never folded
                await client.release()
        return kept

    async def _stop_clients(self, outcome: RunOutcome) -> None:
        clients = self.pool.clients()
        results = await asyncio.gather(
            *(asyncio.wait_for(c.stop(outcome), STOP_TIMEOUT) for c in clients),
            return_exceptions=True,
        )
        for client, result in zip(clients, results, strict=True):
            if isinstance(result, BaseException):
                log.info("client %s did not take the stop task: %s", client.name, result)


class _Stopped(Exception):
    """A stop signal ended the wait for clients, or a second one abandoned the round."""


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            fh.write(text + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # the write's own error is the one to report
            tmp.unlink(missing_ok=True)


class _Fold:
    """The running sum of one round's train replies (partials and aux vars).

    A streaming aggregator's replies over gRPC come with their update on disk
    (``TrainResult.spilled``, received there chunk by chunk and checked finite on the way):
    each is checked, admitted (``admit_spilled``: one factor; a norm bound or the outlier hook
    read the file once for the norm) and folded chunk by chunk into the one running sum, which
    starts at ``-0.0`` so that the first reply lands in it exactly. Nothing of a reply is
    folded before it is complete and accepted: a reply cut off, late or rejected leaves the
    sum as it was (a float sum cannot give a term back). Other replies arrive whole.

    Replies are added in arrival order. With two replies the sum does not depend on it
    (float addition commutes); with three or more, two runs whose replies arrive in other
    orders may round differently: a round replayed after a resume may then differ from the
    first run's by rounding (about 1 ulp) instead of being equal bit for bit.
    """

    def __init__(
        self,
        aggregator: Aggregator,
        optimizer: Optimizer,
        specs: Mapping[str, ArraySpec],
        *,
        validation: UpdateValidation | None = None,
        privacy: ClientLevelDP | None = None,
        buffer_specs: Mapping[str, ArraySpec] | None = None,
    ) -> None:
        self.aggregator = aggregator
        self.validation = validation  # judges each reply on arrival (streaming aggregators)
        self.privacy = privacy
        self.optimizer = optimizer
        self.specs = specs
        self.buffer_specs = buffer_specs  # None: buffers stay local in this run
        self.total: Summable | None = None
        self.aux_total: dict[str, Summable] = {}
        self.count = 0
        self.seen = 0
        self.loss_sum = 0.0
        #: The largest sample-level ε (DP-SGD) a client of the round reported.
        self.sample_epsilon: float | None = None
        self.names: list[str] = []
        #: Why the round has no sum though replies came (secure aggregation failed).
        self.failure = ""
        self._adding: asyncio.Future[None] | None = None

    async def add(self, client: ClientProxy, result: TrainResult) -> None:
        """Check one reply whole, then add it to the running sum (off the loop if large)."""
        size = sum(v.size for v in result.partial.fields.values() if isinstance(v, Vector))
        size += sum(s.nbytes // 2 for s in result.spilled.values())  # read back, then added
        if size < INLINE_ADD_ELEMENTS:
            self._checked_add(result, client.name)
            return
        # A thread cannot be cancelled: the round deadline must not leave it adding into a
        # sum that is being aggregated. It finishes on its own; :meth:`settled` waits for it.
        self._adding = asyncio.ensure_future(
            asyncio.to_thread(self._checked_add, result, client.name)
        )
        await asyncio.shield(self._adding)

    async def settled(self) -> None:
        """Wait for an addition the round deadline interrupted; the sum is then whole (the
        reply counted if it was valid)."""
        if self._adding is not None and not self._adding.done():
            await asyncio.wait({self._adding})
        if self._adding is not None and not self._adding.cancelled():
            self._adding.exception()  # retrieved: a rejected reply was logged by the loop

    def drop(self, name: str, failures: dict[str, str]) -> None:
        """Leave out a kept reply that validation rejected at the round's close (its aux vars
        and loss stay in their sums)."""
        self.names.remove(name)
        self.count -= 1
        failures[name] = "rejected reply: its update norm is an outlier"

    def _checked_add(self, result: TrainResult, name: str) -> None:
        try:
            self._admit_and_add(result, name)
        finally:
            for spilled in result.spilled.values():
                spilled.close()

    def _admit_and_add(self, result: TrainResult, name: str) -> None:
        self.validate(result)
        scale = 1.0
        if self.validation is not None:
            norm = self.aggregator.update_norm(result.partial, result.spilled)
            scale = self.validation.judge(name, norm)
        factor = 1.0  # the server's weights: in the partial, or the factor it is folded with
        if result.spilled:
            factor = self.aggregator.admit_spilled(result.partial, result.spilled, scale)
        else:
            result.partial = self.aggregator.admit(result.partial, scale)
        share, _ = split_buffers(result.aux_vars)
        if share is not None:
            weighting = getattr(self.aggregator, "weights", None)
            weighting = weighting if isinstance(weighting, ClientWeighting) else None
            result.aux_vars = {**result.aux_vars, BUFFERS_AUX: admit_share(share, weighting)}
        if self.privacy is not None:  # never spilled (see _train)
            self.privacy.clip_reply(result.partial)
        self._add(result, factor)
        self.names.append(name)

    def validate(self, result: TrainResult) -> None:
        self.aggregator.validate(result.partial, self.specs, result.spilled)
        if not math.isfinite(result.loss_sum):
            raise ClientError(f"train loss {result.loss_sum} is not finite")
        if self.count and result.aux_vars.keys() != self.aux_total.keys():
            raise ClientError(
                f"aux vars {sorted(result.aux_vars)}, expected {sorted(self.aux_total)}"
            )
        share, own = split_buffers(result.aux_vars)
        self._check_buffers(share)
        self.optimizer.check_aux_var(own)  # names the server takes, contents
        for key, aux in result.aux_vars.items():
            if not aux.is_finite():
                raise ClientError(f"aux var {key!r} is not finite")
            if key in self.aux_total and key != BUFFERS_AUX:  # buffers: check_share, above
                aux.check_like(self.aux_total[key], f"aux var {key!r}")
        for key, aux in own.items():
            for name, value in aux.fields.items():
                if isinstance(value, Vector):
                    value.check_specs(self.specs, f"aux var {key}.{name}")

    def _check_buffers(self, share: Summable | None) -> None:
        """A client's buffers come if and only if they travel in this run, well formed."""
        if (share is None) != (self.buffer_specs is None):
            travel = "travel" if self.buffer_specs is not None else "stay local"
            has = "has no" if share is None else "has"
            raise ClientError(f"the reply {has} buffers; in this run they {travel}")
        if share is not None and self.buffer_specs is not None:
            check_share(share, self.buffer_specs)

    def _add(self, result: TrainResult, factor: float) -> None:
        if result.spilled:
            self._fold_spilled(result, factor)
        elif self.total is None:
            # float32 for half precision; a buffered aggregator keeps replies instead
            self.total = self.aggregator.start(result.partial.accumulator(copy=False))
        else:
            self.total.add_(result.partial)
        if self.count == 0:
            self.aux_total = {k: v.accumulator() for k, v in result.aux_vars.items()}
        else:
            for key, aux in result.aux_vars.items():
                self.aux_total[key].add_(aux)
        self.count += 1
        self.seen += result.n_samples_seen
        self.loss_sum += result.loss_sum
        self.note_epsilon(result)

    def _fold_spilled(self, result: TrainResult, factor: float) -> None:
        """Fold a complete, admitted reply from disk, chunk by chunk, times ``factor``."""
        if self.total is None:
            release_free_heap()  # the transfers' freed chunks, before a model-sized sum
            self.total = self.aggregator.empty_total(self.specs)
        total, fold = self.total, self.aggregator.fold_chunk
        try:
            for key, spilled in result.spilled.items():
                for name, start, values in spilled.chunks():
                    fold(total, key, name, start, values, factor)
        except BaseException as exc:  # part of the reply is in the sum: it cannot come out
            self.failure = f"a staged reply failed halfway into the sum ({type(exc).__name__})"
            log.error("round sum unusable: %s: %s", self.failure, exc)
            raise
        for key, value in result.partial.fields.items():  # its numbers, admitted
            total.fields[key] = total.number(key) + value

    def note_epsilon(self, result: TrainResult) -> None:
        if result.sample_epsilon is not None:
            self.sample_epsilon = max(self.sample_epsilon or 0.0, result.sample_epsilon)


def _check_screened_at_close(config: ServerConfig, optimizer: Optimizer) -> None:
    """A buffered aggregator's replies are screened when the round closes, after their aux
    vars and buffers went into the round's sums: refuse the runs where a rejected client
    would still steer those."""
    refused = dict.fromkeys(aux_var_modules(config, optimizer), True)
    refused["model.buffers='average'"] = config.model.buffers == "average"
    refuse_any(
        f"validation (aggregator {config.aggregator!r})",
        refused,
        "a reply rejected at the round's close would still count in the aux vars and "
        "buffers; drop validation (a robust aggregator already bounds outliers) or use "
        "'averaging'",
    )


def _travelling(buffers: Vector, mode: str) -> Vector | None:
    """The model's buffers when they travel; None when they stay local (or it has none)."""
    if mode != "average":
        return None
    if not len(buffers):
        log.info("model.buffers='average': the model has no floating-point buffer to average")
        return None
    return buffers


def _checkpoint_buffers(state: State, expected: Vector | None) -> Vector | None:
    """The checkpoint's global buffers, checked against the run's (ValueError if not)."""
    if expected is None:
        return None
    buffers = state.get("buffers")
    if not isinstance(buffers, Vector):
        raise ValueError("'buffers' is missing: the run's model.buffers is 'average'")
    buffers.check_specs(expected.specs(), "buffers")
    return buffers


def _checkpoint_fields(state: State) -> tuple[Vector, list[dict[str, Any]], dict[str, int]]:
    """The weights, history and base rounds of a checkpoint, checked (ValueError if not)."""
    weights, history, base_rounds = state["weights"], state["history"], state.get("base_rounds", {})
    if not isinstance(weights, Vector):
        raise ValueError(f"'weights' is a {type(weights).__name__}, expected a Vector")
    if not isinstance(state["round"], int) or state["round"] < 0:
        raise ValueError(f"'round' is {state['round']!r}, expected a non-negative int")
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        raise ValueError("'history' is not a list of round records")
    if not isinstance(base_rounds, dict) or not all(
        isinstance(r, int) and not isinstance(r, bool) for r in base_rounds.values()
    ):
        raise ValueError("'base_rounds' is not a map of client names to rounds")
    return weights, history, base_rounds  # type: ignore[return-value]
