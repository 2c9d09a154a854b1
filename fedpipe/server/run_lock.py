"""An exclusive lock on a run directory: one run at a time writes its checkpoint and summary.

Two servers started on the same ``output_dir`` would delete each other's temp files and
``summary.json`` and interleave their checkpoints. The lock is an ``flock`` on
``<output_dir>/.lock``, taken before any other file of the directory is touched and held until
the run ends (or its process dies: the kernel drops it with the process). The file keeps the
holder's pid, so that the refusal can name it. The file itself stays: deleting it on release
would let two later servers lock two different files of the same name.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import weakref
from pathlib import Path

from fedpipe.common.outcome import RunError

__all__ = ["LOCK_NAME", "RunDirectoryInUse", "RunLock"]

LOCK_NAME = ".lock"


class RunDirectoryInUse(RunError):
    """Another run (another server, or another run of this process) holds the directory."""


class RunLock:
    """Holds the lock on ``directory`` from construction until :meth:`release` (or until the
    object is garbage collected: a run built in a test and dropped does not keep it)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_NAME
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise RunError(f"the run directory {directory} is not writable: {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunDirectoryInUse(
                f"the run directory {directory} is in use by another run "
                f"({f'process {holder}' if holder else 'its process is unknown'}); "
                "stop it first, or give this run another output_dir"
            ) from None
        except OSError as exc:  # a file system without locks: say so rather than risk it
            os.close(fd)
            raise RunError(f"cannot lock the run directory {directory}: {exc}") from None
        with contextlib.suppress(OSError):  # the pid only improves a refusal's message
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._release = weakref.finalize(self, os.close, fd)

    @property
    def held(self) -> bool:
        return self._release.alive

    def release(self) -> None:
        """Let another run use the directory (idempotent)."""
        self._release()


def _holder(fd: int) -> int | None:
    """The pid the lock's holder wrote, if it did."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
