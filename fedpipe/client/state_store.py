"""A client's module state per (run, round): what lets a crashed run resume bit for bit.

The rule. Each train task for round ``t`` names a *base round* ``r`` (``base_round`` in its
settings): the latest round whose reply from this client the server aggregated, as its global
model knows it (0: none). The client trains round ``t`` from its module state as of the end of
round ``r`` (round 0: a fresh state) and keeps the state after ``t``. So the client's state
always matches the global model it trains:

- a server resumed from its checkpoint of round ``c`` replays round ``c + 1``, and every client
  rolls back to the state that checkpoint's model knew, whatever it did after;
- a reply the server never aggregated (past the deadline, below ``min_results``, lost in a
  crash) is undone at the client's next task, as its update was;
- with partial participation ``r`` is the client's own latest aggregated round.

Only ``r`` and ``t`` can be named again (rounds are aggregated in order, and a resume goes
back to a checkpoint no older than the one that named ``r``), so two states are kept at most:
in memory (a copy of the base; the optimizer holds the other) or, with ``state_dir``, as
files ``state-<round>.fpk`` (the codec's state file, no pickle), written atomically before the
reply leaves, so that a client killed at any moment finds every state the server may name.

Re-joining. A client restarted with its ``state_dir`` continues exactly. One without the
state of the base round it is asked for (no ``state_dir``, files lost, a damaged file, logged
as an error naming it, or another run's) re-joins with a fresh module state and tells its
modules so (:meth:`~fedpipe.common.optim.Optimizer.on_state_lost`): Scaffold then takes the
global control variate for its lost one (the server counts clients by name: still once). Its
results from then on differ from an uninterrupted run's. A server that names no base round
gets the state the client is at. Simulated in-process clients keep no snapshots: they die
with the server.

DP-SGD. Each file also carries the client's DP-SGD accountant, which a rollback never rewinds
and a restart takes back: :mod:`fedpipe.client.privacy_record`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from fedpipe.client.privacy_record import RECORD_KEY, check_record, restore_record
from fedpipe.common.config import OptimizerConfig
from fedpipe.common.optim import Optimizer
from fedpipe.common.state import State, copy_state
from fedpipe.common.state_file import (
    StateFileError,
    read_state_file,
    remove_stale_temp_files,
    write_state_file,
)
from fedpipe.common.training import LocalTrainer, RunSetup

__all__ = ["ClientStateStore", "StateStoreError"]

log = logging.getLogger(__name__)

MAGIC = b"FEDPIPE-CLIENT-STATE-2\n"  # 2: a CRC-32 trailer

R = TypeVar("R")


class StateStoreError(ValueError):
    """A train task cannot run with the state it names, or its state cannot be saved."""


class ClientStateStore:
    """The module states a client may be asked to train from (see the module docstring)."""

    def __init__(self, client: str, state_dir: Path | None) -> None:
        self.client = client
        self.state_dir = state_dir
        self._lock = threading.Lock()  # a train runs in a worker thread: one at a time
        self._run = ""
        self._live: int | None = 0  # round the optimizer's state is the end of (None: none)
        self._kept: dict[int, State] = {}  # in-memory base state, without state_dir
        self._privacy_lost: str | None = None  # why the run's DP-SGD record is lost

    def start_run(self, trainer: LocalTrainer) -> None:
        """A new ``trainer`` (its optimizer is fresh: round 0); with DP-SGD, its accountant
        takes back what the run already spent here from ``state_dir``."""
        with self._lock:
            self._run = run_digest(trainer.setup, self.client)
            self._live, self._kept, self._privacy_lost = 0, {}, None
            if self.state_dir is None:
                return
            self.state_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(self.state_dir, "state-*.fpk")
            if trainer.dp_sgd is not None:
                saved = {
                    str(p): self._read_saved(p) for p in sorted(self.state_dir.glob("state-*.fpk"))
                }
                ours = {path: state for path, state in saved.items() if state is not None}
                self._privacy_lost = restore_record(trainer.dp_sgd, ours, str(self.state_dir))

    def train(
        self,
        trainer: LocalTrainer,
        base_round: int | None,
        round_number: int,
        work: Callable[[], R],
    ) -> R:
        """Run ``work`` (round ``round_number``'s training) from the state of ``base_round``
        (None: the state the optimizer is at), then keep its end state.

        Raises
        ------
        StateStoreError
            ``base_round`` is not a round before ``round_number``, or the state cannot be saved.
        """
        if base_round is not None and (
            isinstance(base_round, bool)
            or not isinstance(base_round, int)
            or not 0 <= base_round < round_number
        ):
            raise StateStoreError(
                f"train task for round {round_number} names base round {base_round!r}, "
                f"expected a round from 0 to {round_number - 1}"
            )
        with self._lock:
            where = (
                f"no state file of this run in {self.state_dir}"
                if self.state_dir
                else "no state_dir"
            )
            check_record(trainer.dp_sgd, self._privacy_lost, base_round, round_number, where)
            base = self._restore(trainer, round_number, base_round)
            self._live = None  # a failed round leaves a state that is no round's
            result = work()
            self._keep(trainer, base, round_number)
            return result

    def _restore(self, trainer: LocalTrainer, round_number: int, base: int | None) -> int | None:
        if base is None or base == self._live:
            if base and self.state_dir is None and base not in self._kept:
                # the base must outlive this round's steps, in case the round is not aggregated
                self._kept = {base: copy_state(trainer.optimizer.get_state())}
            return base
        log.info(
            "round %d: the server continues from this client's round %d, not %s: rolling back",
            round_number,
            base,
            self._live,
        )
        trainer.optimizer = self._fresh_optimizer(trainer)
        state = self._load(base, round_number) if base > 0 else None
        if state is not None:
            try:
                trainer.optimizer.set_state(state)
            except ValueError as exc:  # a file of this run's whose values do not fit
                log.error(
                    "round %d: the state of round %d is unusable: %s", round_number, base, exc
                )
                trainer.optimizer, state = self._fresh_optimizer(trainer), None
        if base > 0 and state is None:
            trainer.optimizer.on_state_lost()
        self._live = base
        return base

    @staticmethod
    def _fresh_optimizer(trainer: LocalTrainer) -> Optimizer:
        optimizer: Optimizer = OptimizerConfig.model_validate(
            trainer.setup.client_optimizer
        ).build()
        return optimizer

    def _load(self, base: int, round_number: int) -> State | None:
        """The state after round ``base`` (a private copy), or None if it is lost."""
        if self.state_dir is None:
            if base in self._kept:
                return copy_state(self._kept[base])
            where = "this process kept it in memory only (no state_dir)"
        else:
            path = self._path(base)
            state = self._read(path, base)
            if state is not None:
                log.info(
                    "round %d: continuing from the state of round %d in %s",
                    round_number,
                    base,
                    path,
                )
                return state
            where = f"no usable {path}"
        log.warning(
            "round %d: the server continues from this client's round %d, whose module state "
            "is lost (%s): re-joining with a fresh module state",
            round_number,
            base,
            where,
        )
        return None

    def _read(self, path: Path, base: int) -> State | None:
        """The optimizer state in ``path`` if it is this run's state of round ``base``."""
        saved = self._read_saved(path)
        if saved is None:
            return None
        if saved.get("round") != base:
            log.warning("%s belongs to another client, run or round: not used", path)
            return None
        state = saved.get("optimizer")
        if not isinstance(state, dict):
            log.error("cannot use the client state file %s: it holds no optimizer state", path)
            return None
        return state

    def _read_saved(self, path: Path) -> State | None:
        """All ``path`` holds if it is a state file of this client and run, else None."""
        if not path.exists():
            return None
        try:
            saved = read_state_file(path, MAGIC, "client state file")
        except (StateFileError, OSError) as exc:
            log.error("cannot use the client state file %s: %s", path, exc)
            return None
        if (saved.get("client"), saved.get("run")) != (self.client, self._run):
            log.warning("%s belongs to another client, run or round: not used", path)
            return None
        return saved

    def _keep(self, trainer: LocalTrainer, base: int | None, round_number: int) -> None:
        self._live = round_number
        self._kept = {r: s for r, s in self._kept.items() if r == base}
        if self.state_dir is None:
            return
        path = self._path(round_number)
        saved: State = {
            "client": self.client,
            "run": self._run,
            "round": round_number,
            "optimizer": trainer.optimizer.get_state(),
        }
        if trainer.dp_sgd is not None:  # every step so far: a rollback never rewinds it
            saved[RECORD_KEY] = trainer.dp_sgd.accountant.get_state()
        try:
            write_state_file(path, saved, MAGIC)
            for other in self.state_dir.glob("state-*.fpk"):
                if other.name not in {path.name, self._path(base or 0).name}:
                    other.unlink(missing_ok=True)
        except OSError as exc:
            raise StateStoreError(
                f"cannot save the module state of round {round_number} to {path}: {exc}"
            ) from exc

    def _path(self, round_number: int) -> Path:
        assert self.state_dir is not None
        return self.state_dir / f"state-{round_number}.fpk"


def run_digest(setup: RunSetup, client: str) -> str:
    """What ties a saved state to its run and client."""
    text = json.dumps({"setup": setup.to_data(), "client": client}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
