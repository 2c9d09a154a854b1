"""FedProx proximal term (Li et al., 2020, "Federated Optimization in Heterogeneous Networks")."""

from __future__ import annotations

from typing import Any, ClassVar

from fedpipe.common.regularizers.base import Regularizer
from fedpipe.common.state import State, state_vector
from fedpipe.common.vector import Vector

__all__ = ["FedProxRegularizer"]


class FedProxRegularizer(Regularizer):
    """Penalty ``mu / 2 * ||w - w_0||^2``, gradient ``mu * (w - w_0)``, where the anchor
    ``w_0`` is the global weights at the start of the round (``on_round_start``). If no round
    was started, the weights seen at the first step are the anchor.

    Parameters
    ----------
    mu:
        Strength of the proximal term (non-negative).
    """

    name: ClassVar[str] = "fedprox"

    def __init__(self, mu: float = 0.01) -> None:
        if not mu >= 0:
            raise ValueError(f"fedprox mu={mu}; expected a non-negative number")
        self.mu = float(mu)
        self.anchor: Vector | None = None

    def get_config(self) -> dict[str, Any]:
        return {"mu": self.mu}

    def on_round_start(self, weights: Vector) -> None:
        self.anchor = weights.copy()

    def run(self, gradients: Vector, weights: Vector) -> Vector:
        if self.anchor is None:
            self.anchor = weights.copy()
        return gradients + self.mu * (weights - self.anchor)

    def get_state(self) -> State:
        return {"anchor": self.anchor}

    def set_state(self, state: State) -> None:
        self.anchor = state_vector(state, "anchor", self.name)
