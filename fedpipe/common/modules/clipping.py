"""L2-norm clipping of gradients, per array or over the whole Vector."""

from __future__ import annotations

from typing import Any, ClassVar

from fedpipe.common.modules.base import OptiModule
from fedpipe.common.vector import Vector

__all__ = ["L2Clipping", "L2GlobalClipping"]


def _check_max_norm(max_norm: float, module: str) -> float:
    if not max_norm > 0:
        raise ValueError(f"{module} max_norm={max_norm}; expected a positive number")
    return float(max_norm)


class L2Clipping(OptiModule):
    """Clip each array to an L2 norm of at most ``max_norm``: ``g_k * min(1, max_norm /
    ||g_k||)`` (per-layer clipping, McMahan et al., 2018, "Learning Differentially Private
    Recurrent Language Models").

    Parameters
    ----------
    max_norm:
        Largest L2 norm of each array after clipping.
    """

    name: ClassVar[str] = "l2-clipping"

    def __init__(self, max_norm: float = 1.0) -> None:
        self.max_norm = _check_max_norm(max_norm, self.name)

    def get_config(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm}

    def run(self, gradients: Vector) -> Vector:
        return gradients.clip_norm(self.max_norm, per_array=True)


class L2GlobalClipping(OptiModule):
    """Clip the whole Vector to an L2 norm of at most ``max_norm``: ``g * min(1, max_norm /
    ||g||)`` (Pascanu et al., 2013, "On the difficulty of training recurrent neural
    networks"; torch's ``clip_grad_norm_``).

    Parameters
    ----------
    max_norm:
        Largest global L2 norm after clipping.
    """

    name: ClassVar[str] = "l2-global-clipping"

    def __init__(self, max_norm: float = 1.0) -> None:
        self.max_norm = _check_max_norm(max_norm, self.name)

    def get_config(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm}

    def run(self, gradients: Vector) -> Vector:
        return gradients.clip_norm(self.max_norm)
