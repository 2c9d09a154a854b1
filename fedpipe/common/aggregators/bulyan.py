"""Bulyan (El Mhamdi et al. 2018, "The Hidden Vulnerability of Distributed Learning in
Byzantium", ICML).

With ``K >= 4f + 3`` replies: select ``theta = K - 2f`` of them by applying Krum again and
again to those not yet selected; then, for each coordinate, average the ``beta = theta - 2f``
selected values closest to their median (Flower's ``Bulyan`` with Krum as its first rule).
Sample counts are ignored.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from fedpipe.common.aggregators.buffered import BufferedAggregator
from fedpipe.common.aggregators.krum import krum_scores
from fedpipe.common.aggregators.replies import ReplyBuffer
from fedpipe.common.vector import Vector

__all__ = ["Bulyan"]


def closest_to_median_mean(block: Any, beta: int) -> Any:
    """Per column, the mean of the ``beta`` values closest to the column's median."""
    gap = np.abs(block - np.median(block, axis=0))
    nearest = np.argsort(gap, axis=0, kind="stable")[:beta]
    return np.take_along_axis(block, nearest, axis=0).mean(axis=0)


class Bulyan(BufferedAggregator):
    """Bulyan over Krum.

    Parameters
    ----------
    f:
        Byzantine clients tolerated; a round needs ``4f + 3`` replies.
    """

    name: ClassVar[str] = "bulyan"

    def __init__(self, f: int = 0) -> None:
        if isinstance(f, bool) or not isinstance(f, int) or f < 0:
            raise ValueError(f"bulyan: f={f!r}; expected an integer >= 0")
        self.f = f

    def get_config(self) -> dict[str, Any]:
        return {"f": self.f}

    def reduce(self, replies: ReplyBuffer, weights: Any) -> Vector:
        k, f = len(replies), self.f
        if k < 4 * f + 3:
            raise ValueError(
                f"bulyan: {k} replies with f={f}; expected at least 4f + 3 = {4 * f + 3}"
            )
        distances = replies.distances()
        left, selected = list(range(k)), []
        for _ in range(k - 2 * f):
            scores = krum_scores(distances[np.ix_(left, left)], f)
            selected.append(left.pop(int(np.argmin(scores))))
        beta = len(selected) - 2 * f
        return replies.coordinatewise(lambda block: closest_to_median_mean(block, beta), selected)
