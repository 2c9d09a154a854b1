"""The learning-rate scheduler API."""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

from fedpipe.common.registry import Registrable, declare_family

__all__ = ["Scheduler"]


@declare_family
class Scheduler(Registrable):
    """A learning rate as a pure function of the optimizer's step count (0 for the first
    step). Stateless: the step count lives in the optimizer's state."""

    family: ClassVar[str] = "scheduler"
    name: ClassVar[str]

    @abstractmethod
    def value(self, step: int) -> float:
        """The learning rate to use at step ``step``."""
