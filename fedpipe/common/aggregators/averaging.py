"""Weighted averaging (FedAvg, McMahan et al. 2017) and plain summation."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from fedpipe.common.aggregators.base import Aggregator
from fedpipe.common.summable import Summable
from fedpipe.common.vector import Vector

__all__ = ["AveragingAggregator", "SumAggregator"]

Weighting = Literal["samples", "steps", "uniform"]


def check_weighting(weighting: str) -> str:
    """Return ``weighting`` if it is a known weighting scheme, else raise ValueError."""
    if weighting not in ("samples", "steps", "uniform"):
        raise ValueError(f"weighting={weighting!r}; expected 'samples', 'steps' or 'uniform'")
    return weighting


def client_weight(weighting: str, n_samples: int, n_steps: int) -> float:
    """A client's averaging weight: its sample count, its step count, or 1."""
    if weighting == "samples":
        return float(n_samples)
    if weighting == "steps":
        return float(n_steps)
    return 1.0


class AveragingAggregator(Aggregator):
    """Weighted average of client updates.

    Parameters
    ----------
    weighting:
        ``"samples"`` (FedAvg: weight by local sample count), ``"steps"`` (by local
        optimization steps) or ``"uniform"``.
    """

    name: ClassVar[str] = "averaging"
    vector_fields = ("weighted_sum",)
    scalar_fields = ("total_weight",)

    def __init__(self, weighting: Weighting = "samples") -> None:
        self.weighting = check_weighting(weighting)

    def get_config(self) -> dict[str, Any]:
        return {"weighting": self.weighting}

    def prepare(self, updates: Vector, n_samples: int, n_steps: int) -> Summable:
        weight = client_weight(self.weighting, n_samples, n_steps)
        return Summable({"weighted_sum": updates.mul_(weight), "total_weight": weight})

    def finalize(self, total: Summable) -> Vector:
        weight = total.number("total_weight")
        if weight <= 0:
            raise ValueError("total client weight is 0: no client reported any sample or step")
        return total.vector("weighted_sum").mul_(1.0 / weight)


class SumAggregator(Aggregator):
    """Sum of client updates (for secure-aggregation masks and custom weighting)."""

    name: ClassVar[str] = "sum"
    vector_fields = ("sum",)
    scalar_fields = ()

    def prepare(self, updates: Vector, n_samples: int, n_steps: int) -> Summable:
        return Summable({"sum": updates})

    def finalize(self, total: Summable) -> Vector:
        return total.vector("sum")
