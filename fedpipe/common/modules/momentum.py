"""Momentum modules: heavy-ball / Nesterov momentum (as torch's SGD) and an EWMA of gradients."""

from __future__ import annotations

from typing import Any, ClassVar

from fedpipe.common.modules.base import OptiModule
from fedpipe.common.state import State, state_vector
from fedpipe.common.vector import Vector

__all__ = ["EWMAModule", "MomentumModule"]


class MomentumModule(OptiModule):
    """Heavy-ball momentum (Polyak, 1964) or Nesterov momentum (Sutskever et al., 2013),
    with the exact formulas of ``torch.optim.SGD``.

    ``b_1 = g_1``, then ``b_t = beta * b_{t-1} + (1 - dampening) * g_t``; the output is
    ``b_t``, or ``g_t + beta * b_t`` with ``nesterov=True``.

    torch mapping: ``SGD(lr, momentum=beta, dampening=dampening, nesterov=nesterov)`` is
    ``Optimizer(lrate=lr, modules=[["momentum", {...}]])``; SGD's ``weight_decay=wd`` (added
    to gradients before momentum) is a ``["ridge", {"alpha": wd / 2}]`` regularizer. On the
    server, this module gives FedAvgM (Hsu et al., 2019).

    Parameters
    ----------
    beta:
        Momentum factor, in [0, 1).
    dampening:
        Dampening of the incoming gradient, in [0, 1] (0 for Nesterov).
    nesterov:
        Use Nesterov's look-ahead.
    """

    name: ClassVar[str] = "momentum"

    def __init__(self, beta: float = 0.9, dampening: float = 0.0, nesterov: bool = False) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"momentum beta={beta}; expected a number in [0, 1)")
        if not 0.0 <= dampening <= 1.0:
            raise ValueError(f"momentum dampening={dampening}; expected a number in [0, 1]")
        if nesterov and (beta == 0.0 or dampening != 0.0):
            raise ValueError("Nesterov momentum requires beta > 0 and dampening = 0")
        self.beta = float(beta)
        self.dampening = float(dampening)
        self.nesterov = bool(nesterov)
        self.buffer: Vector | None = None

    def get_config(self) -> dict[str, Any]:
        return {"beta": self.beta, "dampening": self.dampening, "nesterov": self.nesterov}

    def run(self, gradients: Vector) -> Vector:
        if self.buffer is None:
            self.buffer = gradients.copy()
        else:
            self.buffer = self.beta * self.buffer + (1.0 - self.dampening) * gradients
        if self.nesterov:
            return gradients + self.beta * self.buffer
        return self.buffer

    def get_state(self) -> State:
        return {"buffer": self.buffer}

    def set_state(self, state: State) -> None:
        self.buffer = state_vector(state, "buffer", self.name)


class EWMAModule(OptiModule):
    """Exponentially weighted moving average of gradients, ``s_t = beta * s_{t-1} +
    (1 - beta) * g_t`` with ``s_0 = 0`` (the first moment of Adam, Kingma & Ba, 2015, without
    its bias correction; declearn's ``ewma``).

    Parameters
    ----------
    beta:
        Decay of the average, in [0, 1).
    """

    name: ClassVar[str] = "ewma"

    def __init__(self, beta: float = 0.9) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"ewma beta={beta}; expected a number in [0, 1)")
        self.beta = float(beta)
        self.average: Vector | None = None

    def get_config(self) -> dict[str, Any]:
        return {"beta": self.beta}

    def run(self, gradients: Vector) -> Vector:
        if self.average is None:
            self.average = gradients.zeros_like()
        self.average = self.beta * self.average + (1.0 - self.beta) * gradients
        return self.average

    def get_state(self) -> State:
        return {"average": self.average}

    def set_state(self, state: State) -> None:
        self.average = state_vector(state, "average", self.name)
