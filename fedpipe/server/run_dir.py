"""Run directories: one run per directory, never a silent overwrite.

A directory where a run recorded a round (its metrics, checkpoint, client lines, best model)
belongs to that run: a new run refuses it unless told to ``overwrite`` (which removes that
run's files and nothing else) or to ``resume`` it. What a run that never finished a round leaves
(a summary saying so, the initial model) is simply replaced. A simulation given no directory
gets a new one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from fedpipe.common.config import ConfigError

__all__ = ["RUN_FILES", "RunDirectoryTaken", "fresh_run_dir", "prepare_run_dir", "run_files_in"]

log = logging.getLogger(__name__)

#: What a run writes in its directory (``logs/`` and ``plots/`` hold more, by pattern).
RUN_FILES = (
    "metrics.jsonl",
    "metrics.csv",
    "clients.jsonl",
    "checkpoint.fpk",
    "summary.json",
    "model.npz",
    "best_model.npz",
    "privacy_spent.json",
)

#: Files written once a round has run: their presence means the directory holds a run.
ROUND_FILES = (
    "metrics.jsonl",
    "checkpoint.fpk",
    "clients.jsonl",
    "best_model.npz",
    "privacy_spent.json",
)

#: Files of the run's own sub-folders: a gRPC simulation's process logs, ``fedpipe plot``'s.
RUN_PATTERNS = ("logs/*.log", "plots/*.png")


class RunDirectoryTaken(ConfigError):
    """The output directory holds another run and neither overwrite nor resume was asked."""


def run_files_in(directory: Path) -> list[str]:
    """The names of the run files in ``directory`` (empty when it holds no run)."""
    return [name for name in RUN_FILES if (directory / name).exists()]


def prepare_run_dir(
    directory: Path, *, resume: bool = False, overwrite: bool = False, can_resume: bool = True
) -> None:
    """Make ``directory`` ready for a new run (or the resumed one).

    Raises
    ------
    RunDirectoryTaken
        The directory holds a run's files and neither ``overwrite`` nor ``resume`` is set.
    ConfigError
        Both ``overwrite`` and ``resume`` are set.
    """
    if resume and overwrite:
        raise ConfigError("--resume continues the run in the directory, --overwrite deletes it")
    if resume or not directory.is_dir():
        return
    found = run_files_in(directory)
    if not any(name in ROUND_FILES for name in found):
        return
    if not overwrite:
        ways = "--resume to continue it, " if can_resume else ""
        raise RunDirectoryTaken(
            f"{directory} already holds a run ({', '.join(found)}): pass --overwrite to "
            f"replace it, {ways}or choose another --output-dir"
        )
    removed = _remove_run_files(directory)
    log.info("--overwrite: removed %d file(s) of the previous run in %s", removed, directory)


def _remove_run_files(directory: Path) -> int:
    """Delete the run's files (and their interrupted temp files); other files stay."""
    doomed: list[Path] = []
    for name in RUN_FILES:
        doomed += [directory / name, directory / f"{name}.tmp"]
        doomed += directory.glob(f".{name}.tmp-*")
    for pattern in RUN_PATTERNS:
        doomed += directory.glob(pattern)
    removed = 0
    for path in doomed:
        if path.is_file():
            path.unlink()
            removed += 1
    return removed


def fresh_run_dir(parent: Path, prefix: str) -> Path:
    """Create and return a new ``parent/prefix-YYYYmmdd-HHMMSS`` directory (``-2``, ``-3``...
    when runs start within the same second)."""
    parent.mkdir(parents=True, exist_ok=True)
    stem = f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    for attempt in range(1, 1000):
        path = parent / (stem if attempt == 1 else f"{stem}-{attempt}")
        try:
            path.mkdir()  # atomic: two runs started together never share a directory
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free run directory named {stem}-N in {parent}")
