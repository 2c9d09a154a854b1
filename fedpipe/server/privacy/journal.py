"""The privacy a run spent before its last checkpoint: a round's model that left the server.

A round's noised model leaves the server with the round's evaluation tasks, before the round's
checkpoint is written. A server that crashes in between resumes from the previous checkpoint
and runs the round again with fresh noise: a second release of that round, which its accountant,
taken from the checkpoint, would count once. So before the model first leaves, the accountant
(the round counted) is written to ``privacy_spent.json`` in the run directory; a resumed run
takes it when it counts more rounds than the checkpoint's, and the replayed round counts again.
Privacy spent is never refunded (as a client's DP-SGD record, docs/privacy.md).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import BinaryIO

from fedpipe.common.privacy.accountant import PrivacyAccountant
from fedpipe.common.state_file import atomic_write

__all__ = ["JOURNAL_NAME", "counted_rounds", "take_journal", "write_journal"]

log = logging.getLogger(__name__)

JOURNAL_NAME = "privacy_spent.json"


def counted_rounds(accountant: PrivacyAccountant) -> int:
    """The number of rounds ``accountant`` counts."""
    return sum(count for _, count in accountant.rounds)


def write_journal(directory: Path, round_number: int, accountant: PrivacyAccountant) -> None:
    """Record, before round ``round_number``'s model leaves the server, what the run spent."""
    data = json.dumps({"round": round_number, "accountant": accountant.get_state()}).encode()

    def write(fh: BinaryIO) -> None:
        fh.write(data)

    atomic_write(directory / JOURNAL_NAME, write)


def take_journal(directory: Path, accountant: PrivacyAccountant) -> None:
    """Put the journal's record in ``accountant`` when it counts more rounds (a resumed run
    whose crashed server released a model past its checkpoint).

    Raises
    ------
    ValueError
        The journal is unreadable: the run cannot know what it spent.
    """
    path = directory / JOURNAL_NAME
    if not path.exists():
        return
    try:
        data = json.loads(path.read_text())
        journal = PrivacyAccountant(accountant.kind, accountant.delta)
        journal.set_state(data["accountant"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is unreadable ({exc}): what this run spent is unknown") from None
    if counted_rounds(journal) <= counted_rounds(accountant):
        return
    accountant.rounds = journal.rounds
    log.warning(
        "privacy: round %s's model left the server (evaluation) before the crash and its "
        "checkpoint; it stays counted and its replay counts again: ε=%.4g so far",
        data.get("round"),
        accountant.epsilon(),
    )
