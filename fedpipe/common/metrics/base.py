"""The metric API: accumulate counts and sums, merge them across clients, compute at the end.

A metric's :meth:`~Metric.state` holds only counts and sums (a
:class:`~fedpipe.common.summable.Summable`), so states from several clients add up field by
field and the merged result equals the metric computed on the union of their data.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import numpy as np

from fedpipe.common.registry import Registrable, declare_family
from fedpipe.common.summable import Summable

__all__ = ["Metric", "predicted_labels"]


@declare_family
class Metric(Registrable):
    """A mergeable evaluation metric.

    Subclasses implement :meth:`initial_state`, :meth:`update_state` (the contribution of one
    batch) and :meth:`compute` (values from a total state). A result is ``nan`` when the
    state holds no sample.
    """

    family: ClassVar[str] = "metric"
    name: ClassVar[str]

    def __init__(self) -> None:
        self._state = self.initial_state()

    @abstractmethod
    def initial_state(self) -> Summable:
        """The state before any update (zeros)."""

    @abstractmethod
    def update_state(
        self, state: Summable, y_true: np.ndarray, y_pred: np.ndarray, loss: float | None
    ) -> None:
        """Add one batch to ``state`` in place."""

    @abstractmethod
    def compute(self, state: Summable) -> dict[str, float]:
        """Metric values from a (possibly merged) state."""

    def update(self, y_true: np.ndarray, y_pred: np.ndarray, loss: float | None = None) -> None:
        """Accumulate one batch.

        Parameters
        ----------
        y_true:
            Targets: class ids for classification, values for regression.
        y_pred:
            The model's ``predict`` output: probabilities of class 1 ``(n,)`` (binary,
            thresholded at 0.5), class probabilities ``(n, k)`` (arg-max), or values.
            Integer predictions are taken as class ids as they are.
        loss:
            The batch's mean loss (only the ``loss`` metric uses it).
        """
        y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
        if len(y_true) != len(y_pred):
            raise ValueError(
                f"metric {self.name!r}: {len(y_true)} targets but {len(y_pred)} predictions"
            )
        self.update_state(self._state, y_true, y_pred, loss)

    def state(self) -> Summable:
        """A copy of the accumulated counts and sums (safe to send and to add up)."""
        return self._state.copy()

    def result(self, state: Summable | None = None) -> dict[str, float]:
        """Metric values of ``state`` (e.g. merged from clients), or of this metric's own."""
        return self.compute(self._state if state is None else state)

    def reset(self) -> None:
        self._state = self.initial_state()


def predicted_labels(y_pred: np.ndarray) -> np.ndarray:
    """Class ids from a ``predict`` output: arg-max of ``(n, k)`` probabilities, 0.5 threshold
    of ``(n,)`` / ``(n, 1)`` probabilities; integer or boolean arrays are already ids."""
    if y_pred.dtype.kind in "iub":
        return y_pred.reshape(len(y_pred)).astype(np.int64)
    if y_pred.ndim == 2 and y_pred.shape[1] > 1:
        return np.argmax(y_pred, axis=1)
    return (y_pred.reshape(len(y_pred)) >= 0.5).astype(np.int64)


def class_ids(y_true: np.ndarray, metric: str) -> np.ndarray:
    """Targets as int64 class ids of shape (n,), or a clear error."""
    labels = y_true.reshape(len(y_true)) if y_true.ndim == 2 and y_true.shape[1] == 1 else y_true
    ids = labels.astype(np.int64)
    if labels.ndim != 1 or not np.array_equal(ids, labels):
        raise ValueError(
            f"metric {metric!r} needs integer class ids of shape (n,), "
            f"got {y_true.dtype.name}{list(y_true.shape)}"
        )
    return ids
