"""Classification metrics from exact counts: accuracy; precision, recall and F1."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np

from fedpipe.common.metrics.base import Metric, class_ids, predicted_labels
from fedpipe.common.summable import Summable
from fedpipe.common.vector import Vector

__all__ = ["Accuracy", "PrecisionRecallF1"]


class Accuracy(Metric):
    """Share of correctly predicted labels. Result key: ``accuracy``."""

    name: ClassVar[str] = "accuracy"

    def initial_state(self) -> Summable:
        return Summable({"correct": 0, "n": 0})

    def update_state(
        self, state: Summable, y_true: np.ndarray, y_pred: np.ndarray, loss: float | None
    ) -> None:
        hits = int(np.sum(class_ids(y_true, self.name) == predicted_labels(y_pred)))
        state.fields["correct"] = int(state.number("correct")) + hits
        state.fields["n"] = int(state.number("n")) + len(y_true)

    def compute(self, state: Summable) -> dict[str, float]:
        n = state.number("n")
        return {"accuracy": state.number("correct") / n if n else float("nan")}


Average = Literal["binary", "macro", "micro"]


class PrecisionRecallF1(Metric):
    """Precision, recall and F1 from per-class true-positive, false-positive and false-negative
    counts (int64, so merged states are exact). Result keys: ``precision``, ``recall``, ``f1``.

    Parameters
    ----------
    n_classes:
        Number of classes; labels must lie in ``[0, n_classes)``.
    average:
        ``"binary"``: the scores of class 1 (needs ``n_classes=2``). ``"macro"``: the
        unweighted mean of per-class scores over the classes present in the targets or the
        predictions (as scikit-learn does). ``"micro"``: scores of the pooled counts. Default:
        ``"binary"`` for two classes, else ``"macro"``.

    A ratio with a zero denominator counts as 0 (scikit-learn's ``zero_division=0``).
    """

    name: ClassVar[str] = "precision-recall-f1"

    def __init__(self, n_classes: int = 2, average: Average | None = None) -> None:
        if n_classes < 2:
            raise ValueError(f"n_classes={n_classes}; expected at least 2")
        average = average or ("binary" if n_classes == 2 else "macro")
        if average not in ("binary", "macro", "micro"):
            raise ValueError(f"average={average!r}; expected 'binary', 'macro' or 'micro'")
        if average == "binary" and n_classes != 2:
            raise ValueError(
                f"average='binary' needs n_classes=2, got {n_classes}; use 'macro' or 'micro'"
            )
        self.n_classes = n_classes
        self.average: Average = average
        super().__init__()

    def get_config(self) -> dict[str, Any]:
        return {"n_classes": self.n_classes, "average": self.average}

    def initial_state(self) -> Summable:
        zeros = {key: np.zeros(self.n_classes, np.int64) for key in ("tp", "fp", "fn")}
        return Summable({"counts": Vector(zeros)})

    def update_state(
        self, state: Summable, y_true: np.ndarray, y_pred: np.ndarray, loss: float | None
    ) -> None:
        truth, guess = class_ids(y_true, self.name), predicted_labels(y_pred)
        for what, labels in (("targets", truth), ("predictions", guess)):
            if len(labels) and (labels.min() < 0 or labels.max() >= self.n_classes):
                raise ValueError(
                    f"metric {self.name!r}: {what} hold class ids outside "
                    f"[0, {self.n_classes - 1}]; set n_classes"
                )
        k = self.n_classes
        hit = truth == guess
        counts = state.vector("counts").coefs
        counts["tp"] += np.bincount(truth[hit], minlength=k)
        counts["fp"] += np.bincount(guess[~hit], minlength=k)
        counts["fn"] += np.bincount(truth[~hit], minlength=k)

    def compute(self, state: Summable) -> dict[str, float]:
        counts = state.vector("counts").coefs
        tp, fp, fn = (counts[key].astype(np.float64) for key in ("tp", "fp", "fn"))
        if not (tp + fn).any():  # every sample is a TP or an FN of its true class
            return {"precision": float("nan"), "recall": float("nan"), "f1": float("nan")}
        if self.average == "binary":
            tp, fp, fn = tp[1:], fp[1:], fn[1:]
        elif self.average == "micro":
            tp, fp, fn = tp.sum(keepdims=True), fp.sum(keepdims=True), fn.sum(keepdims=True)
        else:
            present = (tp + fp + fn) > 0
            tp, fp, fn = tp[present], fp[present], fn[present]
        precision = _ratio(tp, tp + fp)
        recall = _ratio(tp, tp + fn)
        f1 = _ratio(2 * tp, 2 * tp + fp + fn)
        return {
            "precision": float(precision.mean()),
            "recall": float(recall.mean()),
            "f1": float(f1.mean()),
        }


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)
