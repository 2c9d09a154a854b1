"""Gradient-masked averaging (Tenison et al., 2022, "Gradient Masked Averaging for Federated
Learning", arXiv:2201.11986).

Each coordinate of the weighted average is scaled by how much clients agree on its sign:
the agreement score is ``A = |sum_i sign(u_i)| / n``; coordinates with ``A >= threshold``
are kept whole, the others are multiplied by ``A`` (the paper's soft mask).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from fedpipe.common.aggregators.averaging import AveragingAggregator
from fedpipe.common.aggregators.weighting import Weighting
from fedpipe.common.spilled_vector import SpilledVector
from fedpipe.common.summable import Summable
from fedpipe.common.vector import Vector

__all__ = ["GradientMaskedAveraging"]


class GradientMaskedAveraging(AveragingAggregator):
    """Weighted averaging masked by sign agreement across clients.

    The server counts each client's signs from its (admitted) weighted update and counts it
    once, whatever ``sign_sum`` and ``n_clients`` the client sent.

    Parameters
    ----------
    threshold:
        Agreement score in [0, 1] above which a coordinate is kept unscaled.
    weighting, max_samples, max_norm:
        As for ``averaging``.
    """

    name: ClassVar[str] = "gradient-masked-averaging"
    vector_fields: ClassVar[tuple[str, ...]] = ("weighted_sum", "sign_sum")
    scalar_fields: ClassVar[tuple[str, ...]] = ("total_weight", "n_clients")

    def __init__(
        self,
        threshold: float = 0.8,
        weighting: Weighting = "samples",
        max_samples: int | None = None,
        max_norm: float | None = None,
    ) -> None:
        super().__init__(weighting, max_samples, max_norm)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold={threshold}; expected a number in [0, 1]")
        self.threshold = float(threshold)

    def get_config(self) -> dict[str, Any]:
        return {"threshold": self.threshold} | super().get_config()

    def prepare(self, updates: Vector, n_samples: int, n_steps: int) -> Summable:
        partial = super().prepare(updates, n_samples, n_steps)
        partial.fields |= {"sign_sum": partial.vector("weighted_sum").sign(), "n_clients": 1}
        return partial

    def admit(self, partial: Summable, scale: float = 1.0) -> Summable:
        partial = super().admit(partial, scale)
        partial.fields |= {"sign_sum": partial.vector("weighted_sum").sign(), "n_clients": 1}
        return partial

    def admit_spilled(
        self, partial: Summable, spilled: Mapping[str, SpilledVector], scale: float = 1.0
    ) -> float:
        factor = super().admit_spilled(partial, spilled, scale)
        partial.fields["n_clients"] = 1
        return factor

    def fold_chunk(
        self, total: Summable, key: str, name: str, start: int, values: np.ndarray, factor: float
    ) -> None:
        if key != "weighted_sum":
            return  # the client's signs: the server counts its own
        scaled = values * factor if factor != 1.0 else values
        for field, add in (("weighted_sum", scaled), ("sign_sum", np.sign(scaled))):
            target = total.vector(field).coefs[name].reshape(-1)[start : start + values.size]
            np.add(target, add, out=target)

    def finalize(self, total: Summable) -> Vector:
        weight = total.number("total_weight")
        if weight <= 0:
            raise ValueError("total client weight is 0: no client reported any sample")
        average = total.vector("weighted_sum") / weight
        agreement = total.vector("sign_sum").abs() / total.number("n_clients")
        keep = (agreement - self.threshold).sign().maximum(0.0)  # 1 where A > threshold
        at_threshold = 1.0 - (agreement - self.threshold).abs().sign()  # 1 where A == threshold
        mask = (keep + at_threshold).minimum(1.0)
        mask = mask + (1.0 - mask) * agreement
        return average * mask
