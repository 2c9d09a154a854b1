"""The model's loss, averaged over samples."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from fedpipe.common.metrics.base import Metric
from fedpipe.common.summable import Summable

__all__ = ["LossMetric"]


class LossMetric(Metric):
    """Sample-weighted mean of the batch losses passed to :meth:`update` (``loss=``): each
    batch's mean loss counts as many times as the batch has samples. Result key: ``loss``."""

    name: ClassVar[str] = "loss"

    def initial_state(self) -> Summable:
        return Summable({"loss_sum": 0.0, "n": 0})

    def update_state(
        self, state: Summable, y_true: np.ndarray, y_pred: np.ndarray, loss: float | None
    ) -> None:
        if loss is None:
            raise ValueError("metric 'loss' needs the batch's mean loss: update(..., loss=...)")
        n = len(y_true)
        state.fields["loss_sum"] = state.number("loss_sum") + float(loss) * n
        state.fields["n"] = int(state.number("n")) + n

    def compute(self, state: Summable) -> dict[str, float]:
        n = state.number("n")
        return {"loss": state.number("loss_sum") / n if n else float("nan")}
