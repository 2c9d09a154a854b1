"""Per-client records: ``clients.jsonl``, one JSON object per sampled client per round.

Each line says whether the client's reply was aggregated (``replied``) or why not (``error``),
its training figures (``train_loss``, ``n_samples``, ``n_samples_seen``, ``n_steps``,
``seconds`` from the round's start until its reply was folded in, ``train_seconds`` as the
client measured them) and its own evaluation metrics (``loss``, ``accuracy``...,
``n_eval_samples``). The lines are written once per round and never kept in the checkpoint:
a checkpoint does not grow with rounds x clients.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedpipe.common.training import TrainResult

__all__ = ["CLIENTS_NAME", "ClientLog", "RoundClients"]

CLIENTS_NAME = "clients.jsonl"


class RoundClients:
    """What each client sampled in one round did."""

    def __init__(self, round_number: int, sampled: list[str]) -> None:
        self.round = round_number
        self.lines: dict[str, dict[str, Any]] = {
            name: {"round": round_number, "client": name, "replied": False} for name in sampled
        }

    def trained(self, name: str, result: TrainResult, seconds: float) -> None:
        """A train reply that was folded into the round's sum."""
        self.replied(
            name,
            float(result.mean_loss),
            result.n_samples,
            result.n_samples_seen,
            result.n_steps,
            seconds,
            result.seconds,
        )
        if result.sample_epsilon is not None:  # its DP-SGD's ε so far, as it reports it
            self.lines[name]["sample_epsilon"] = result.sample_epsilon

    def replied(
        self,
        name: str,
        train_loss: float,
        n_samples: int,
        n_samples_seen: int,
        n_steps: int,
        seconds: float,
        train_seconds: float,
    ) -> None:
        """A client's training figures, its reply folded in (``seconds``: from the round's
        start; ``train_seconds``: as the client measured them)."""
        line = self.lines[name]
        line["replied"] = True
        line["train_loss"] = train_loss
        line["n_samples"] = int(n_samples)
        line["n_samples_seen"] = int(n_samples_seen)
        line["n_steps"] = int(n_steps)
        line["seconds"] = round(seconds, 6)
        if math.isfinite(train_seconds) and train_seconds >= 0:  # the client's own word
            line["train_seconds"] = round(train_seconds, 6)

    def losses(self) -> dict[str, float]:
        """The mean training loss of each client whose reply was folded in."""
        return {name: line["train_loss"] for name, line in self.lines.items() if line["replied"]}

    def evaluated(self, name: str, metrics: dict[str, float], n_samples: int) -> None:
        """A client's evaluation, its metrics computed from its own states."""
        own = {key: float(value) for key, value in metrics.items()}
        self.lines[name].update(own, n_eval_samples=int(n_samples))

    def failed(self, failures: dict[str, str], key: str = "error") -> None:
        """Why clients took no part: ``error`` for training, ``eval_error`` for evaluation."""
        for name, why in failures.items():
            if name in self.lines:
                self.lines[name][key] = why


class ClientLog:
    """Appends each round's :class:`RoundClients` to ``clients.jsonl`` (nothing when
    ``output_dir`` is None)."""

    def __init__(self, output_dir: Path | None) -> None:
        self.path = output_dir / CLIENTS_NAME if output_dir is not None else None

    def append(self, clients: RoundClients) -> None:
        if self.path is None or not clients.lines:
            return
        text = "".join(json.dumps(line) + "\n" for line in clients.lines.values())
        with open(self.path, "a") as fh:
            fh.write(text)  # one write per round

    def truncate(self, last_round: int) -> None:
        """Keep the lines of rounds up to ``last_round`` (a resumed run's checkpoint): the
        rounds replayed after a resume write their lines again."""
        if self.path is None or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the tail a kill cut in the middle of a write
            if isinstance(record, dict) and isinstance(record.get("round"), int):
                if record["round"] <= last_round:
                    kept.append(line + "\n")
        tmp = self.path.with_name(f"{CLIENTS_NAME}.tmp")
        tmp.write_text("".join(kept))
        tmp.replace(self.path)
