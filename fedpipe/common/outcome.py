"""How a run ended, as the server tells each client, and the exit codes of ``fedpipe``.

The server's stop task carries a :class:`RunOutcome`; a client exits 0 only when told the run
completed, so a service manager's ``Restart=on-failure`` revives it in every other case except
the ones that a restart cannot fix (:data:`NO_RESTART`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Literal

__all__ = ["NO_RESTART", "ExitCode", "OutcomeStatus", "RunError", "RunOutcome"]

OutcomeStatus = Literal["completed", "failed", "stopped", "rejected"]
STATUSES: tuple[OutcomeStatus, ...] = ("completed", "failed", "stopped", "rejected")


class RunError(RuntimeError):
    """A run cannot start or go on (no clients in time, an unwritable run directory...)."""


class ExitCode(IntEnum):
    """Exit status of every ``fedpipe`` command."""

    OK = 0  #: the run completed (client: the server said so)
    FAILED = 1  #: the run failed, or the client gave up reaching the server
    USAGE = 2  #: a bad config, flag or file: fix it before starting again
    REFUSED = 3  #: the server refused this client's credentials
    REJECTED = 4  #: this client cannot take part in the run (its data or model does not fit)
    INTERRUPTED = 130  #: a signal stopped the run before its last round (``--resume`` goes on)


#: Exit codes after which restarting the same command cannot help (systemd:
#: ``RestartPreventExitStatus``).
NO_RESTART = (ExitCode.USAGE, ExitCode.REFUSED, ExitCode.REJECTED)


@dataclass(frozen=True)
class RunOutcome:
    """``completed``: the run is over; ``failed``: the server aborted it (``reason``);
    ``stopped``: the server was stopped before the last round and may resume; ``rejected``:
    this client cannot take part (``reason`` says why)."""

    status: OutcomeStatus
    reason: str = ""

    def to_data(self) -> dict[str, Any]:
        return {"status": self.status, "reason": self.reason}

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> RunOutcome:
        """Read a stop task's settings; a stop without any is a completed run."""
        status = data.get("status", "completed")
        if status not in STATUSES:
            raise ValueError(f"run outcome status {status!r}; expected one of {STATUSES}")
        return cls(status, str(data.get("reason", ""))[:2000])
