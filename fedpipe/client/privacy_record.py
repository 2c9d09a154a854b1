"""A client's DP-SGD privacy record across restarts: ε keeps counting, or the client refuses.

Every state file a client keeps (:mod:`fedpipe.client.state_store`) carries its DP-SGD
accountant as it stands after that round: every step the client ran in the run so far,
including rounds the server never aggregated and rounds run again after a rollback (their
updates left the client, so the privacy they spent is never given back). A rollback to a base
round restores that round's module state, never its accountant. A restarted client takes the
record that counts the most steps among its files of the run (the newest: records only grow).

A client with DP-SGD that cannot know what its run already spent refuses to train, since its
ε would start again from 0 and under-report: when the server continues from a round of this
client's (base round > 0) and no record of the run is at hand (no ``state_dir``, files lost),
or when files of the run hold no record (written without DP-SGD, or by an older fedpipe).
A client whose files are lost and none of whose replies was aggregated yet cannot tell: it
counts from 0 (see docs/privacy.md).
"""

from __future__ import annotations

import logging

from fedpipe.common.privacy.accountant import PrivacyAccountant
from fedpipe.common.privacy.dp_sgd import DpSgd
from fedpipe.common.state import State

__all__ = ["PrivacyRecordLost", "check_record", "restore_record", "spent_steps"]

log = logging.getLogger(__name__)

#: The key of the accountant's state in a client state file.
RECORD_KEY = "dp_sgd"


class PrivacyRecordLost(ValueError):
    """A DP-SGD client does not know the privacy its run already spent: it refuses to train."""


def spent_steps(accountant: PrivacyAccountant) -> int:
    """The number of DP-SGD steps ``accountant`` counts."""
    return sum(count for _, count in accountant.rounds)


def restore_record(dp_sgd: DpSgd, saved: dict[str, State], where: str) -> str | None:
    """Put in ``dp_sgd``'s accountant the record that counts the most steps among ``saved``
    (this run's state files, by path); why the run's record is lost, or None.

    ``where`` names the folder for the messages.
    """
    best: PrivacyAccountant | None = None
    for path, state in saved.items():
        record = state.get(RECORD_KEY)
        candidate = PrivacyAccountant(dp_sgd.config.accountant, dp_sgd.config.delta)
        try:
            if not isinstance(record, dict):
                raise ValueError("it holds none")
            candidate.set_state(record)
        except ValueError as exc:
            log.error("the DP-SGD record of %s is unusable: %s", path, exc)
            continue
        if best is None or spent_steps(candidate) > spent_steps(best):
            best = candidate
    if best is None:
        return f"the state files of this run in {where} hold no DP-SGD record" if saved else None
    dp_sgd.accountant.rounds = best.rounds
    log.info(
        "DP-SGD: this run already spent %d steps here (from %s): ε=%.4g at δ=%g so far",
        spent_steps(best),
        where,
        dp_sgd.epsilon(),
        dp_sgd.config.delta,
    )
    return None


def check_record(
    dp_sgd: DpSgd | None, lost: str | None, base_round: int | None, round_number: int, where: str
) -> None:
    """Refuse to train round ``round_number`` from ``base_round`` when the DP-SGD record of
    the run is ``lost`` or must exist and does not.

    Raises
    ------
    PrivacyRecordLost
        With DP-SGD: ``lost`` says why, or ``base_round`` > 0 (the server aggregated a reply
        of this client's) while the accountant counts no step.
    """
    if dp_sgd is None:
        return
    if lost is None and base_round and not dp_sgd.accountant.rounds:
        lost = (
            f"the server continues from this client's round {base_round}, but no record of "
            f"the privacy spent up to it is at hand ({where})"
        )
    if lost is not None:
        raise PrivacyRecordLost(
            f"dp_sgd: refusing round {round_number}: {lost}; counting ε from 0 would "
            "under-report it. Restart this client with the state_dir it ran with, or start a "
            "new run"
        )
