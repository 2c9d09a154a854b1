"""Per-round records: kept in memory (for checkpoints), written as CSV and JSON lines."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from fedpipe.common.config import EarlyStopConfig

__all__ = ["EarlyStopping", "History"]


class History:
    """Round records (``{"round": 1, "train_loss": ..., "accuracy": ...}``).

    ``metrics.jsonl`` gets one JSON object per round as soon as the round ends;
    ``metrics.csv`` gets a row, and is rewritten only when a round brings a new column.
    """

    def __init__(self, output_dir: Path | None, records: list[dict[str, Any]] | None = None):
        self.output_dir = output_dir
        self.records: list[dict[str, Any]] = list(records or [])
        self._columns: list[str] = []

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.output_dir is None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record, default=_jsonable) + "\n")
        path = self.output_dir / "metrics.csv"
        if path.exists() and all(k in self._columns for k in _scalar_keys(record)):
            with open(path, "a", newline="") as fh:
                csv.DictWriter(fh, fieldnames=self._columns, extrasaction="ignore").writerow(record)
        else:
            self.write_csv()

    @classmethod
    def resumed(cls, output_dir: Path | None, records: list[dict[str, Any]]) -> History:
        """The history of a run resumed with ``records`` (its checkpoint's), files rewritten.

        The crashed server may have written rounds after its last checkpoint: they are dropped,
        so that a round replayed after the resume replaces its first line rather than
        duplicating it. Kept rounds keep their ``metrics.jsonl`` line (it has the client lists
        the checkpoint leaves out); a line missing or torn by the crash is written again from
        the checkpoint's record.
        """
        history = cls(output_dir, records)
        if output_dir is None or not output_dir.is_dir():
            return history
        path = output_dir / "metrics.jsonl"
        written = _lines_by_round(path) if path.exists() else {}
        lines = [written.get(r.get("round"), json.dumps(r, default=_jsonable)) for r in records]
        tmp = output_dir / "metrics.jsonl.tmp"
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(path)
        history.write_csv()
        return history

    def write_csv(self) -> None:
        """Rewrite ``metrics.csv`` with the union of every record's scalar columns."""
        if self.output_dir is None:
            return
        columns: list[str] = []
        for record in self.records:
            columns += [k for k in _scalar_keys(record) if k not in columns]
        self._columns = columns
        tmp = self.output_dir / "metrics.csv.tmp"
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.records)
        tmp.replace(self.output_dir / "metrics.csv")


class EarlyStopping:
    """Stop when the monitored metric has not improved for ``patience`` evaluations."""

    def __init__(self, config: EarlyStopConfig) -> None:
        self.config = config
        self.best = math.inf if config.mode == "min" else -math.inf
        self.stale = 0

    def update(self, value: float) -> bool:
        """Record one evaluation; True when training should stop."""
        delta = self.config.min_delta
        improved = (
            value < self.best - delta if self.config.mode == "min" else value > self.best + delta
        )
        if improved:
            self.best, self.stale = value, 0
        else:
            self.stale += 1
        return self.stale >= self.config.patience

    def replay(self, records: list[dict[str, Any]]) -> None:
        """Rebuild the state from a resumed history."""
        for record in records:
            if self.config.metric in record:
                self.update(float(record[self.config.metric]))


def _lines_by_round(path: Path) -> dict[Any, str]:
    """The last complete line of each round in a ``metrics.jsonl`` (torn lines skipped)."""
    lines: dict[Any, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the tail a kill cut in the middle of a write
        if isinstance(record, dict) and "round" in record:
            lines[record["round"]] = line
    return lines


def _scalar_keys(record: dict[str, Any]) -> list[str]:
    return [k for k, v in record.items() if not isinstance(v, list)]


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to metrics.jsonl")
