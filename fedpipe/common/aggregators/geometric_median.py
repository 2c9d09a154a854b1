"""Geometric median by the smoothed Weiszfeld algorithm: robust federated aggregation, RFA
(Pillutla, Kakade and Harchaoui 2022, "Robust Aggregation for Federated Learning", IEEE
Transactions on Signal Processing, Algorithm 2).

Starting from the weighted mean ``v = sum_i a_i w_i``, repeat: ``b_i = a_i / max(nu,
||v - w_i||)``, ``v = sum_i b_i w_i / sum_i b_i``, until the objective ``sum_i a_i ||v - w_i||``
changes by at most ``tol`` relatively, or ``max_iterations``. ``v`` stays a combination of the
replies, so every distance comes from their dot products (one pass over the replies) and the
result from one more pass.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from fedpipe.common.aggregators.buffered import BufferedAggregator
from fedpipe.common.aggregators.replies import ReplyBuffer
from fedpipe.common.aggregators.weighting import ClientWeighting, Weighting
from fedpipe.common.vector import Vector

__all__ = ["GeometricMedian"]


class GeometricMedian(BufferedAggregator):
    """Approximate weighted geometric median of the client updates (RFA).

    Parameters
    ----------
    nu:
        Smoothing: distances below it count as ``nu`` (> 0).
    max_iterations:
        Weiszfeld iterations at most.
    tol:
        Relative change of the objective under which the iterations stop.
    weighting, max_samples:
        The weights ``a_i``: ``"uniform"``, ``"samples"``, ``"capped"``.
    """

    name: ClassVar[str] = "geometric-median"

    def __init__(
        self,
        nu: float = 1e-6,
        max_iterations: int = 100,
        tol: float = 1e-6,
        weighting: Weighting = "uniform",
        max_samples: int | None = None,
    ) -> None:
        if not nu > 0:
            raise ValueError(f"geometric-median: nu={nu}; expected a number > 0")
        if isinstance(max_iterations, bool) or not isinstance(max_iterations, int):
            raise ValueError(f"geometric-median: max_iterations={max_iterations!r}; expected int")
        if max_iterations < 1 or not tol >= 0:
            raise ValueError(
                f"geometric-median: max_iterations={max_iterations}, tol={tol}; "
                "expected max_iterations >= 1 and tol >= 0"
            )
        self.weights = ClientWeighting("geometric-median", weighting, max_samples)
        self.nu, self.max_iterations, self.tol = float(nu), max_iterations, float(tol)

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"nu": self.nu, "max_iterations": self.max_iterations}
        return config | {"tol": self.tol} | self.weights.get_config()

    def reduce(self, replies: ReplyBuffer, weights: Any) -> Vector:
        gram = replies.gram()

        def distances(coefs: Any) -> Any:  # ||sum_j c_j w_j - w_i|| for each i
            squared = np.diag(gram) - 2.0 * gram @ coefs + coefs @ gram @ coefs
            return np.sqrt(np.maximum(squared, 0.0))

        coefs = weights
        objective = float(weights @ distances(coefs))
        for _ in range(self.max_iterations):
            betas = weights / np.maximum(self.nu, distances(coefs))
            coefs = betas / betas.sum()
            previous, objective = objective, float(weights @ distances(coefs))
            if abs(previous - objective) <= self.tol * objective:
                break
        return replies.combine(coefs)
