"""Learning-rate schedulers."""

from fedpipe.common.schedulers.base import Scheduler
from fedpipe.common.schedulers.constant import Constant, Piecewise
from fedpipe.common.schedulers.decay import (
    CosineAnnealing,
    ExponentialDecay,
    InverseTimeDecay,
    PolynomialDecay,
)
from fedpipe.common.schedulers.warmup import Warmup

__all__ = [
    "Constant",
    "CosineAnnealing",
    "ExponentialDecay",
    "InverseTimeDecay",
    "Piecewise",
    "PolynomialDecay",
    "Scheduler",
    "Warmup",
]
