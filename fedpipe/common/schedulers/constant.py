"""Constant and piecewise-constant learning rates."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from itertools import pairwise
from typing import Any, ClassVar

from fedpipe.common.schedulers.base import Scheduler

__all__ = ["Constant", "Piecewise"]


class Constant(Scheduler):
    """The same learning rate at every step.

    Parameters
    ----------
    value:
        The learning rate.
    """

    name: ClassVar[str] = "constant"

    def __init__(self, value: float = 0.01) -> None:
        self.rate = float(value)

    def get_config(self) -> dict[str, Any]:
        return {"value": self.rate}

    def value(self, step: int) -> float:
        return self.rate


class Piecewise(Scheduler):
    """Piecewise-constant learning rate: ``values[0]`` before ``boundaries[0]``, ``values[i]``
    for ``boundaries[i - 1] <= step < boundaries[i]``, ``values[-1]`` from ``boundaries[-1]``
    on (torch's ``MultiStepLR`` milestones, with explicit values).

    Parameters
    ----------
    boundaries:
        Strictly increasing positive steps at which the value changes.
    values:
        One more value than boundaries.
    """

    name: ClassVar[str] = "piecewise"

    def __init__(self, boundaries: Sequence[int], values: Sequence[float]) -> None:
        self.boundaries = [int(b) for b in boundaries]
        self.values = [float(v) for v in values]
        if len(self.values) != len(self.boundaries) + 1:
            raise ValueError(
                f"piecewise has {len(self.boundaries)} boundaries and {len(self.values)} values; "
                f"expected {len(self.boundaries) + 1} values (one more than boundaries)"
            )
        steps = [0, *self.boundaries]
        if any(b <= a for a, b in pairwise(steps)):
            raise ValueError(
                f"piecewise boundaries={self.boundaries}; expected strictly increasing "
                f"positive steps"
            )

    def get_config(self) -> dict[str, Any]:
        return {"boundaries": list(self.boundaries), "values": list(self.values)}

    def value(self, step: int) -> float:
        return self.values[bisect_right(self.boundaries, step)]
