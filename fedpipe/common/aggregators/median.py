"""Coordinate-wise median (Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", ICML): each coordinate of the global update is the median of the
clients' values, as numpy's ``median`` takes it (the mean of the two middle values for an
even count; Flower's ``FedMedian``). A rank statistic: sample counts are ignored."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from fedpipe.common.aggregators.buffered import BufferedAggregator
from fedpipe.common.aggregators.replies import ReplyBuffer
from fedpipe.common.vector import Vector

__all__ = ["CoordinateMedian"]


class CoordinateMedian(BufferedAggregator):
    """Coordinate-wise median of the client updates."""

    name: ClassVar[str] = "median"

    def reduce(self, replies: ReplyBuffer, weights: Any) -> Vector:
        return replies.coordinatewise(lambda block: np.median(block, axis=0))
