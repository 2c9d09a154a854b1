"""Krum and multi-Krum (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine
Tolerant Gradient Descent", NeurIPS).

With ``K`` replies of which at most ``f`` are byzantine (``K >= 2f + 3``), each reply's score
is the sum of its squared distances to its ``K - f - 2`` nearest other replies; Krum returns
the reply of lowest score, multi-Krum the weighted mean of the ``m`` replies of lowest scores
(Flower's ``Krum`` with ``num_malicious_clients = f``, ``num_clients_to_keep = m``). Distances
come from dot products accumulated chunk range by chunk range.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from fedpipe.common.aggregators.buffered import BufferedAggregator
from fedpipe.common.aggregators.replies import ReplyBuffer
from fedpipe.common.aggregators.weighting import ClientWeighting, Weighting
from fedpipe.common.vector import Vector

__all__ = ["Krum", "krum_scores"]


def krum_scores(distances: Any, f: int) -> Any:
    """Each row's sum of squared distances to its ``max(1, K - f - 2)`` nearest other rows."""
    k = len(distances)
    closest = max(1, k - f - 2)
    others = np.sort(distances + np.diag(np.full(k, np.inf)), axis=1)[:, :closest]
    return np.where(np.isfinite(others), others, 0.0).sum(axis=1)


class Krum(BufferedAggregator):
    """Krum (``m = 1``) or multi-Krum (``m > 1``).

    Parameters
    ----------
    f:
        Byzantine clients tolerated; a round needs ``2f + 3`` replies.
    m:
        Replies selected and averaged.
    weighting, max_samples:
        Weights of the selected replies' mean: ``"uniform"``, ``"samples"``, ``"capped"``.
    """

    name: ClassVar[str] = "krum"

    def __init__(
        self,
        f: int = 0,
        m: int = 1,
        weighting: Weighting = "uniform",
        max_samples: int | None = None,
    ) -> None:
        if isinstance(f, bool) or not isinstance(f, int) or f < 0:
            raise ValueError(f"krum: f={f!r}; expected an integer >= 0")
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"krum: m={m!r}; expected an integer >= 1")
        self.weights = ClientWeighting("krum", weighting, max_samples)
        self.f, self.m = f, m

    def get_config(self) -> dict[str, Any]:
        return {"f": self.f, "m": self.m} | self.weights.get_config()

    def reduce(self, replies: ReplyBuffer, weights: Any) -> Vector:
        k = len(replies)
        if k < 2 * self.f + 3 or self.m > k:
            raise ValueError(
                f"krum: {k} replies with f={self.f}, m={self.m}; expected at least "
                f"max(2f + 3, m) = {max(2 * self.f + 3, self.m)}"
            )
        selected = np.argsort(krum_scores(replies.distances(), self.f), kind="stable")[: self.m]
        chosen = weights[selected]
        return replies.combine(chosen / chosen.sum(), [int(i) for i in selected])
