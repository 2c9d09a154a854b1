"""Update validation: reject or down-weight a client update whose L2 norm is an outlier
against the median norm of the round's updates, with one log line per update it acts on.

An update of norm ``n`` is an outlier when ``n > max_norm_ratio * median``. ``"reject"``
leaves it out of the round; ``"downweight"`` scales it by ``max_norm_ratio * median / n``
(down to the bound: in an average, its influence shrinks by that factor).

Which median
------------
*Buffered* aggregators (median, Krum...) keep every reply until the round closes, so they
are screened then against the exact median of the round's norms (:meth:`screen`).
*Streaming* aggregators fold each reply as it arrives and cannot take it back, so each is
judged on arrival (:meth:`judge`) against the median of the norms known by then: the
previous round's replies and this round's so far, its own included. A reply is judged once
``min_norms`` norms are known: in the run's first round the first ``min_norms - 1``
replies are folded unjudged (norm bounding, ``max_norm``, covers them). Holding replies back
instead would keep several model-sized replies per round. The previous round's norms are in
the checkpoint (:meth:`get_state`), so a resumed run judges as the first did. Norms are those
of the updates the clients sent, before any ``max_norm`` bound.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from fedpipe.common.aggregators.replies import ReplyBuffer
from fedpipe.common.config import ValidationConfig
from fedpipe.server.clients import ClientError

__all__ = ["OutlierUpdateError", "UpdateValidation"]

log = logging.getLogger(__name__)


class OutlierUpdateError(ClientError):
    """A streamed update's norm is an outlier: the round loop logs it and leaves it out."""


class UpdateValidation:
    """Judges client updates by their norm, per a :class:`ValidationConfig`."""

    def __init__(self, config: ValidationConfig) -> None:
        self.config = config
        self.previous: list[float] = []  # norms of the last round's replies
        self.current: list[float] = []

    def bound(self, norm: float, median: float) -> tuple[float, str]:
        """``(scale, reason)``: scale 1 and no reason for an update within the bound."""
        ratio = self.config.max_norm_ratio
        if norm <= ratio * median:
            return 1.0, ""
        scale = 0.0 if self.config.action == "reject" else ratio * median / norm
        reason = f"update norm {norm:.4g} exceeds {ratio:g} x the median norm {median:.4g}: " + (
            "rejected" if scale == 0.0 else f"down-weighted by {scale:.3g}"
        )
        return scale, reason

    def judge(self, client: str, norm: float) -> float:
        """A streamed update's scale on arrival; raise :class:`OutlierUpdateError` (logged by
        the round loop) if it is rejected."""
        self.current.append(norm)
        known = self.previous + self.current
        if len(known) < self.config.min_norms:
            return 1.0
        scale, reason = self.bound(norm, float(np.median(known)))
        if scale == 0.0:
            raise OutlierUpdateError(reason)
        if reason:
            log.warning("client %s: %s", client, reason)
        return scale

    def screen(self, replies: ReplyBuffer, clients: list[str]) -> list[str]:
        """Act on the outliers among a closed round's kept ``replies`` (sent by ``clients``,
        in order) against the round's median norm; return the clients rejected."""
        median = float(np.median(replies.norms))
        keep, rejected = [], []
        for row, (client, norm) in enumerate(zip(clients, replies.norms, strict=True)):
            scale, reason = self.bound(norm, median)
            if reason:
                log.warning("client %s: %s", client, reason)
            if scale == 0.0:
                rejected.append(client)
                continue
            keep.append(row)
            if scale != 1.0:
                replies.scale_row(row, scale)
        replies.keep(keep)
        return rejected

    def end_round(self) -> None:
        """The round's norms become the reference of the next one."""
        if self.current:
            self.previous, self.current = self.current, []

    def get_state(self) -> dict[str, Any]:
        return {"previous": [float(n) for n in self.previous]}

    def set_state(self, state: dict[str, Any]) -> None:
        previous = state.get("previous", [])
        if not isinstance(previous, list) or not all(isinstance(n, float) for n in previous):
            raise ValueError("'validation.previous' is not a list of norms")
        self.previous, self.current = list(previous), []
