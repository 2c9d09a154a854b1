"""The regularizer API: a term added to the gradients of the training loss."""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

from fedpipe.common.registry import Registrable, declare_family
from fedpipe.common.state import State
from fedpipe.common.vector import Vector

__all__ = ["Regularizer"]


@declare_family
class Regularizer(Registrable):
    """Adds the gradient of a penalty term to loss gradients, before the module pipeline.

    :meth:`on_round_start` receives the weights at the start of each federated round
    (FedProx uses them as its anchor).
    """

    family: ClassVar[str] = "regularizer"
    name: ClassVar[str]

    @abstractmethod
    def run(self, gradients: Vector, weights: Vector) -> Vector:
        """Return ``gradients`` plus the penalty's gradient at ``weights``."""

    def on_round_start(self, weights: Vector) -> None:
        """Called with the global weights when a federated round starts."""

    def get_state(self) -> State:
        return {}

    def set_state(self, state: State) -> None:
        if state:
            raise ValueError(f"regularizer {self.name!r} is stateless, got {sorted(state)}")
