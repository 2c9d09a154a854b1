"""Learning rates decaying with the step count: exponential, inverse-time, polynomial, cosine."""

from __future__ import annotations

import math
from typing import Any, ClassVar

from fedpipe.common.schedulers.base import Scheduler

__all__ = ["CosineAnnealing", "ExponentialDecay", "InverseTimeDecay", "PolynomialDecay"]


def _positive_steps(decay_steps: int, name: str) -> int:
    if int(decay_steps) != decay_steps or decay_steps < 1:
        raise ValueError(f"{name} decay_steps={decay_steps}; expected a positive integer")
    return int(decay_steps)


class ExponentialDecay(Scheduler):
    """``initial * decay_rate ** (step / decay_steps)``, the exponent floored with
    ``staircase`` (Keras' ``ExponentialDecay``; torch's ``ExponentialLR`` with
    ``decay_steps=1``).

    Parameters
    ----------
    initial:
        Learning rate at step 0.
    decay_rate:
        Factor applied every ``decay_steps`` steps, in (0, 1].
    decay_steps:
        Number of steps over which the rate is multiplied by ``decay_rate``.
    staircase:
        Decay in discrete jumps every ``decay_steps`` steps.
    """

    name: ClassVar[str] = "exponential-decay"

    def __init__(
        self,
        initial: float = 0.01,
        decay_rate: float = 0.96,
        decay_steps: int = 1,
        staircase: bool = False,
    ) -> None:
        if not 0 < decay_rate <= 1:
            raise ValueError(f"exponential-decay decay_rate={decay_rate}; expected (0, 1]")
        self.initial = float(initial)
        self.decay_rate = float(decay_rate)
        self.decay_steps = _positive_steps(decay_steps, self.name)
        self.staircase = bool(staircase)

    def get_config(self) -> dict[str, Any]:
        return {
            "initial": self.initial,
            "decay_rate": self.decay_rate,
            "decay_steps": self.decay_steps,
            "staircase": self.staircase,
        }

    def value(self, step: int) -> float:
        exponent = step / self.decay_steps
        if self.staircase:
            exponent = float(step // self.decay_steps)
        return self.initial * self.decay_rate**exponent


class InverseTimeDecay(Scheduler):
    """``initial / (1 + decay_rate * step / decay_steps)`` (Keras' ``InverseTimeDecay``).

    torch's ``Adagrad(lr, lr_decay=d)`` uses ``lr / (1 + d * step)``: this scheduler with
    ``initial=lr, decay_rate=d, decay_steps=1``.

    Parameters
    ----------
    initial:
        Learning rate at step 0.
    decay_rate:
        Non-negative decay rate.
    decay_steps:
        Step count unit of the decay.
    """

    name: ClassVar[str] = "inverse-time-decay"

    def __init__(
        self, initial: float = 0.01, decay_rate: float = 0.0, decay_steps: int = 1
    ) -> None:
        if not decay_rate >= 0:
            raise ValueError(f"inverse-time-decay decay_rate={decay_rate}; expected >= 0")
        self.initial = float(initial)
        self.decay_rate = float(decay_rate)
        self.decay_steps = _positive_steps(decay_steps, self.name)

    def get_config(self) -> dict[str, Any]:
        return {
            "initial": self.initial,
            "decay_rate": self.decay_rate,
            "decay_steps": self.decay_steps,
        }

    def value(self, step: int) -> float:
        return self.initial / (1 + self.decay_rate * (step / self.decay_steps))


class PolynomialDecay(Scheduler):
    """``(initial - final) * (1 - min(step, decay_steps) / decay_steps) ** power + final``
    (Keras' ``PolynomialDecay`` without cycling; ``power=1`` is a linear decay), then
    ``final`` from ``decay_steps`` on.

    Parameters
    ----------
    initial:
        Learning rate at step 0.
    final:
        Learning rate from ``decay_steps`` on.
    decay_steps:
        Length of the decay.
    power:
        Exponent of the polynomial (positive).
    """

    name: ClassVar[str] = "polynomial-decay"

    def __init__(
        self,
        initial: float = 0.01,
        final: float = 0.0001,
        decay_steps: int = 1000,
        power: float = 1.0,
    ) -> None:
        if not power > 0:
            raise ValueError(f"polynomial-decay power={power}; expected a positive number")
        self.initial = float(initial)
        self.final = float(final)
        self.decay_steps = _positive_steps(decay_steps, self.name)
        self.power = float(power)

    def get_config(self) -> dict[str, Any]:
        return {
            "initial": self.initial,
            "final": self.final,
            "decay_steps": self.decay_steps,
            "power": self.power,
        }

    def value(self, step: int) -> float:
        remaining = 1.0 - min(step, self.decay_steps) / self.decay_steps
        return (self.initial - self.final) * remaining**self.power + self.final


class CosineAnnealing(Scheduler):
    """``final + (initial - final) * (1 + cos(pi * min(step, decay_steps) / decay_steps)) / 2``
    (Loshchilov & Hutter, 2017, "SGDR", without restarts; torch's ``CosineAnnealingLR`` with
    ``T_max=decay_steps, eta_min=final``, held at ``final`` after ``decay_steps``).

    Parameters
    ----------
    initial:
        Learning rate at step 0.
    decay_steps:
        Length of the half cosine.
    final:
        Learning rate from ``decay_steps`` on.
    """

    name: ClassVar[str] = "cosine-annealing"

    def __init__(self, initial: float = 0.01, decay_steps: int = 1000, final: float = 0.0) -> None:
        self.initial = float(initial)
        self.decay_steps = _positive_steps(decay_steps, self.name)
        self.final = float(final)

    def get_config(self) -> dict[str, Any]:
        return {"initial": self.initial, "decay_steps": self.decay_steps, "final": self.final}

    def value(self, step: int) -> float:
        progress = min(step, self.decay_steps) / self.decay_steps
        return self.final + (self.initial - self.final) * (1 + math.cos(math.pi * progress)) / 2
