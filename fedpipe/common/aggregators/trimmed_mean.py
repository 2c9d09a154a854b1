"""Coordinate-wise trimmed mean (Yin et al. 2018, "Byzantine-Robust Distributed Learning:
Towards Optimal Statistical Rates", ICML): for each coordinate, drop the ``k = floor(beta * K)``
largest and ``k`` smallest of the ``K`` clients' values and average the rest (Flower's
``FedTrimmedAvg`` with ``beta`` its ``proportiontocut``). A rank statistic: sample counts are
ignored."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from fedpipe.common.aggregators.buffered import BufferedAggregator
from fedpipe.common.aggregators.replies import ReplyBuffer
from fedpipe.common.vector import Vector

__all__ = ["TrimmedMean"]


class TrimmedMean(BufferedAggregator):
    """Coordinate-wise mean of the values left after trimming a ``beta`` fraction each side.

    Parameters
    ----------
    beta:
        Fraction of the clients trimmed at each end, in [0, 0.5).
    """

    name: ClassVar[str] = "trimmed-mean"

    def __init__(self, beta: float = 0.1) -> None:
        if not 0.0 <= beta < 0.5:
            raise ValueError(f"trimmed-mean: beta={beta}; expected a fraction in [0, 0.5)")
        self.beta = float(beta)

    def get_config(self) -> dict[str, Any]:
        return {"beta": self.beta}

    def reduce(self, replies: ReplyBuffer, weights: Any) -> Vector:
        k = int(self.beta * len(replies))
        return replies.coordinatewise(
            lambda block: np.sort(block, axis=0)[k : len(block) - k].mean(axis=0)
        )
