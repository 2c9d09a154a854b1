"""A live progress bar of a run's rounds in a terminal, drawn with ``rich`` (optional extra).

The CLI uses it only when stdout is a terminal; piped or redirected output keeps one plain
line per round, which scripts read.
"""

from __future__ import annotations

import logging
import sys
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["RoundBar"]

#: Record keys shown in the bar's own columns, or not at all.
HIDDEN = frozenset({"round", "sampled", "replied", "clients", "seconds", "failed"})


class RoundBar:
    """A bar of rounds: clients replied/sampled, elapsed time, ETA and the latest metrics.

    Use as a context manager; call it with each round's record.
    """

    def __init__(self, rounds: int, title: str, console: Console | None = None) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("rounds  clients {task.fields[clients]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=console,
        )
        self.task = self.progress.add_task(title, total=rounds, clients="-", metrics="")
        self._streams: list[tuple[logging.StreamHandler[Any], Any]] = []

    def __call__(self, record: dict[str, Any]) -> None:
        metrics = "  ".join(
            f"{k} {v:.1e}" if 0 < abs(v) < 1e-3 else f"{k} {v:.4f}"  # a DP delta: 1.0e-05
            for k, v in record.items()
            if k not in HIDDEN and isinstance(v, float)
        )
        if record.get("failed"):
            metrics += f"  ({record['failed']}: model unchanged)"
        clients = f"{record.get('replied', 0)}/{record.get('sampled', 0)}"
        self.progress.update(self.task, completed=record["round"], clients=clients, metrics=metrics)

    def __enter__(self) -> RoundBar:
        self.progress.start()
        # While the bar is live, sys.stderr prints above it: log lines go there rather than
        # across the bar.
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.__stderr__:
                previous = handler.setStream(sys.stderr)
                if previous is not None:  # None: sys.stderr was not redirected
                    self._streams.append((handler, previous))
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for handler, stream in self._streams:
            handler.setStream(stream)
        self.progress.stop()
