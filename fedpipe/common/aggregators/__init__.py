"""Aggregators: client updates in, one global update out (streaming or buffered)."""

from fedpipe.common.aggregators.averaging import AveragingAggregator, SumAggregator
from fedpipe.common.aggregators.base import Aggregator, InvalidPartialError
from fedpipe.common.aggregators.buffered import BufferedAggregator
from fedpipe.common.aggregators.bulyan import Bulyan
from fedpipe.common.aggregators.fltrust import FLTrust
from fedpipe.common.aggregators.geometric_median import GeometricMedian
from fedpipe.common.aggregators.gradient_masked import GradientMaskedAveraging
from fedpipe.common.aggregators.krum import Krum
from fedpipe.common.aggregators.median import CoordinateMedian
from fedpipe.common.aggregators.trimmed_mean import TrimmedMean

__all__ = [
    "Aggregator",
    "AveragingAggregator",
    "BufferedAggregator",
    "Bulyan",
    "CoordinateMedian",
    "FLTrust",
    "GeometricMedian",
    "GradientMaskedAveraging",
    "InvalidPartialError",
    "Krum",
    "SumAggregator",
    "TrimmedMean",
]
