"""Aggregators: client updates in, one global update out, streaming."""

from fedpipe.common.aggregators.averaging import AveragingAggregator, SumAggregator
from fedpipe.common.aggregators.base import Aggregator, InvalidPartialError
from fedpipe.common.aggregators.gradient_masked import GradientMaskedAveraging

__all__ = [
    "Aggregator",
    "AveragingAggregator",
    "GradientMaskedAveraging",
    "InvalidPartialError",
    "SumAggregator",
]
