"""L1 (lasso) and L2 (ridge) penalties on the weights."""

from __future__ import annotations

from typing import Any, ClassVar

from fedpipe.common.regularizers.base import Regularizer
from fedpipe.common.vector import Vector

__all__ = ["LassoRegularizer", "RidgeRegularizer"]


def _check_alpha(alpha: float, name: str) -> float:
    if not alpha >= 0:
        raise ValueError(f"{name} alpha={alpha}; expected a non-negative number")
    return float(alpha)


class LassoRegularizer(Regularizer):
    """L1 penalty ``alpha * ||w||_1`` (Tibshirani, 1996), (sub)gradient ``alpha * sign(w)``.

    Parameters
    ----------
    alpha:
        Strength of the penalty (non-negative).
    """

    name: ClassVar[str] = "lasso"

    def __init__(self, alpha: float = 0.01) -> None:
        self.alpha = _check_alpha(alpha, self.name)

    def get_config(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def run(self, gradients: Vector, weights: Vector) -> Vector:
        return gradients + self.alpha * weights.sign()


class RidgeRegularizer(Regularizer):
    """L2 penalty ``alpha * ||w||_2^2`` (Tikhonov / Hoerl & Kennard, 1970), gradient
    ``2 * alpha * w``.

    torch's L2-coupled ``weight_decay=wd`` (SGD, Adam, RMSprop, Adagrad add ``wd * w`` to the
    gradients) is this regularizer with ``alpha = wd / 2``.

    Parameters
    ----------
    alpha:
        Strength of the penalty (non-negative).
    """

    name: ClassVar[str] = "ridge"

    def __init__(self, alpha: float = 0.01) -> None:
        self.alpha = _check_alpha(alpha, self.name)

    def get_config(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def run(self, gradients: Vector, weights: Vector) -> Vector:
        return gradients + (2.0 * self.alpha) * weights
