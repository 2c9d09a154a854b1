"""Linear warm-up in front of another learning-rate scheduler."""

from __future__ import annotations

from typing import Any, ClassVar

from fedpipe.common.registry import build_spec, spec_of
from fedpipe.common.schedulers.base import Scheduler

__all__ = ["Warmup"]


class Warmup(Scheduler):
    """Ramp the learning rate up linearly for ``steps`` steps, then hand over to another
    scheduler (Goyal et al., 2017, "Accurate, Large Minibatch SGD").

    At step ``s < steps`` the rate is ``inner(0) * (s + 1) / (steps + 1)``; from ``steps`` on
    it is ``inner(s - steps)``: the wrapped schedule starts when the warm-up ends.

    Parameters
    ----------
    scheduler:
        The wrapped scheduler: an instance, a name or a ``[name, config]`` pair.
    steps:
        Length of the warm-up (non-negative).
    """

    name: ClassVar[str] = "warmup"

    def __init__(self, scheduler: Any, steps: int = 100) -> None:
        if int(steps) != steps or steps < 0:
            raise ValueError(f"warmup steps={steps}; expected a non-negative integer")
        self.scheduler: Scheduler = build_spec("scheduler", scheduler)
        self.steps = int(steps)

    def get_config(self) -> dict[str, Any]:
        return {"scheduler": spec_of(self.scheduler), "steps": self.steps}

    def value(self, step: int) -> float:
        if step < self.steps:
            return self.scheduler.value(0) * (step + 1) / (self.steps + 1)
        return self.scheduler.value(step - self.steps)
