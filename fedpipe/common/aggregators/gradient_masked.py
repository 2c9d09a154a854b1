"""Gradient-masked averaging (Tenison et al., 2022, "Gradient Masked Averaging for Federated
Learning", arXiv:2201.11986).

Each coordinate of the weighted average is scaled by how much clients agree on its sign:
the agreement score is ``A = |sum_i sign(u_i)| / n``; coordinates with ``A >= threshold``
are kept whole, the others are multiplied by ``A`` (the paper's soft mask).
"""

from __future__ import annotations

from typing import Any, ClassVar

from fedpipe.common.aggregators.averaging import Weighting, check_weighting, client_weight
from fedpipe.common.aggregators.base import Aggregator
from fedpipe.common.summable import Summable
from fedpipe.common.vector import Vector

__all__ = ["GradientMaskedAveraging"]


class GradientMaskedAveraging(Aggregator):
    """Weighted averaging masked by sign agreement across clients.

    Parameters
    ----------
    threshold:
        Agreement score in [0, 1] above which a coordinate is kept unscaled.
    weighting:
        As for ``averaging``.
    """

    name: ClassVar[str] = "gradient-masked-averaging"
    vector_fields = ("weighted_sum", "sign_sum")
    scalar_fields = ("total_weight", "n_clients")

    def __init__(self, threshold: float = 0.8, weighting: Weighting = "samples") -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold={threshold}; expected a number in [0, 1]")
        self.threshold = float(threshold)
        self.weighting = check_weighting(weighting)

    def get_config(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "weighting": self.weighting}

    def prepare(self, updates: Vector, n_samples: int, n_steps: int) -> Summable:
        weight = client_weight(self.weighting, n_samples, n_steps)
        signs = updates.sign()
        return Summable(
            {
                "weighted_sum": updates.mul_(weight),
                "sign_sum": signs,
                "total_weight": weight,
                "n_clients": 1,
            }
        )

    def finalize(self, total: Summable) -> Vector:
        weight = total.number("total_weight")
        if weight <= 0:
            raise ValueError("total client weight is 0: no client reported any sample or step")
        average = total.vector("weighted_sum") / weight
        agreement = total.vector("sign_sum").abs() / total.number("n_clients")
        keep = (agreement - self.threshold).sign().maximum(0.0)  # 1 where A > threshold
        at_threshold = 1.0 - (agreement - self.threshold).abs().sign()  # 1 where A == threshold
        mask = (keep + at_threshold).minimum(1.0)
        mask = mask + (1.0 - mask) * agreement
        return average * mask
