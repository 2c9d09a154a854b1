"""Regression metrics from sums: MSE, MAE and the coefficient of determination R2."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from fedpipe.common.metrics.base import Metric
from fedpipe.common.summable import Summable
from fedpipe.common.vector import Vector

__all__ = ["MeanAbsoluteError", "MeanSquaredError", "R2Score"]


def _aligned(y_true: np.ndarray, y_pred: np.ndarray, metric: str) -> tuple[np.ndarray, ...]:
    """Targets and predictions as float64 ``(n, k)`` arrays (``(n,)`` counts as ``k = 1``)."""
    t = y_true.reshape(len(y_true), -1).astype(np.float64)
    p = y_pred.reshape(len(y_pred), -1).astype(np.float64)
    if t.shape != p.shape:
        raise ValueError(
            f"metric {metric!r}: targets of shape {y_true.shape} do not match predictions of "
            f"shape {y_pred.shape}"
        )
    return t, p


class MeanSquaredError(Metric):
    """Mean of squared errors over samples and outputs. Result key: ``mse``."""

    name: ClassVar[str] = "mse"

    def initial_state(self) -> Summable:
        return Summable({"sum_squares": 0.0, "count": 0})

    def update_state(
        self, state: Summable, y_true: np.ndarray, y_pred: np.ndarray, loss: float | None
    ) -> None:
        t, p = _aligned(y_true, y_pred, self.name)
        state.fields["sum_squares"] = state.number("sum_squares") + float(np.sum((p - t) ** 2))
        state.fields["count"] = int(state.number("count")) + t.size

    def compute(self, state: Summable) -> dict[str, float]:
        count = state.number("count")
        return {"mse": state.number("sum_squares") / count if count else float("nan")}


class MeanAbsoluteError(Metric):
    """Mean of absolute errors over samples and outputs. Result key: ``mae``."""

    name: ClassVar[str] = "mae"

    def initial_state(self) -> Summable:
        return Summable({"sum_abs": 0.0, "count": 0})

    def update_state(
        self, state: Summable, y_true: np.ndarray, y_pred: np.ndarray, loss: float | None
    ) -> None:
        t, p = _aligned(y_true, y_pred, self.name)
        state.fields["sum_abs"] = state.number("sum_abs") + float(np.sum(np.abs(p - t)))
        state.fields["count"] = int(state.number("count")) + t.size

    def compute(self, state: Summable) -> dict[str, float]:
        count = state.number("count")
        return {"mae": state.number("sum_abs") / count if count else float("nan")}


class R2Score(Metric):
    """Coefficient of determination, ``1 - SS_res / SS_tot``, per output then averaged.

    The state holds, per output, the sums of ``y``, ``y^2`` and squared residuals, and the
    sample count, so merged states give the R2 of the union:
    ``SS_tot = sum(y^2) - sum(y)^2 / n``. (That formula loses precision when the targets'
    mean is huge next to their spread; centre such targets first.) As in scikit-learn, a
    constant target gives 1.0 for a perfect fit, else 0.0. Result key: ``r2``.

    Parameters
    ----------
    n_outputs:
        Number of regression targets (the width of the sums in the state).
    """

    name: ClassVar[str] = "r2"

    def __init__(self, n_outputs: int = 1) -> None:
        if n_outputs < 1:
            raise ValueError(f"n_outputs={n_outputs}; expected at least 1")
        self.n_outputs = n_outputs
        super().__init__()

    def get_config(self) -> dict[str, Any]:
        return {"n_outputs": self.n_outputs}

    def initial_state(self) -> Summable:
        zeros = {key: np.zeros(self.n_outputs) for key in ("sum_y", "sum_y2", "sum_res2")}
        return Summable({"sums": Vector(zeros), "n": 0})

    def update_state(
        self, state: Summable, y_true: np.ndarray, y_pred: np.ndarray, loss: float | None
    ) -> None:
        t, p = _aligned(y_true, y_pred, self.name)
        if t.shape[1] != self.n_outputs:
            raise ValueError(
                f"metric 'r2' was built for {self.n_outputs} outputs, got {t.shape[1]}; "
                f"set n_outputs"
            )
        sums = state.vector("sums").coefs
        sums["sum_y"] += t.sum(axis=0)
        sums["sum_y2"] += (t**2).sum(axis=0)
        sums["sum_res2"] += ((t - p) ** 2).sum(axis=0)
        state.fields["n"] = int(state.number("n")) + len(t)

    def compute(self, state: Summable) -> dict[str, float]:
        n = state.number("n")
        if not n:
            return {"r2": float("nan")}
        sums = state.vector("sums").coefs
        ss_tot = np.maximum(sums["sum_y2"] - sums["sum_y"] ** 2 / n, 0.0)
        ss_res = sums["sum_res2"]
        constant = ss_tot == 0
        scores = np.where(
            constant,
            np.where(ss_res == 0, 1.0, 0.0),
            1.0 - ss_res / np.where(constant, 1.0, ss_tot),
        )
        return {"r2": float(scores.mean())}
