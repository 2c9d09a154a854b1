"""Several metrics updated together, with states keyed by metric name."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fedpipe.common import registry
from fedpipe.common.metrics.base import Metric
from fedpipe.common.summable import Summable

__all__ = ["MetricSet"]


class MetricSet:
    """The metrics of a run, built from config specs and updated together.

    Parameters
    ----------
    specs:
        Each a registered name (``"accuracy"``), a ``[name, config]`` pair
        (``["precision-recall-f1", {"n_classes": 10}]``) or a :class:`Metric`. Names must be
        distinct.
    """

    def __init__(self, specs: Sequence[Any]) -> None:
        self.metrics: dict[str, Metric] = {}
        for spec in specs:
            metric = registry.build_spec("metric", spec)
            if metric.name in self.metrics:
                raise ValueError(f"metric {metric.name!r} is listed twice")
            self.metrics[metric.name] = metric

    def get_config(self) -> list[Any]:
        """Specs that rebuild this set."""
        return [registry.spec_of(m) for m in self.metrics.values()]

    def update(self, y_true: np.ndarray, y_pred: np.ndarray, loss: float | None = None) -> None:
        """Update every metric with one batch (see :meth:`Metric.update`)."""
        for metric in self.metrics.values():
            metric.update(y_true, y_pred, loss)

    def state(self) -> dict[str, Summable]:
        """Each metric's state (copies), by metric name."""
        return {name: metric.state() for name, metric in self.metrics.items()}

    @staticmethod
    def merge(states: Iterable[Mapping[str, Summable]]) -> dict[str, Summable]:
        """Add up states from several clients, metric by metric."""
        total: dict[str, Summable] = {}
        for state in states:
            if total and state.keys() != total.keys():
                raise ValueError(
                    f"cannot merge metric states for {sorted(state)} into {sorted(total)}"
                )
            for name, value in state.items():
                total[name] = total[name] + value if name in total else value.copy()
        return total

    def result(self, states: Mapping[str, Summable] | None = None) -> dict[str, float]:
        """All metric values in one dict, from merged ``states`` or from this set's own."""
        out: dict[str, float] = {}
        for name, metric in self.metrics.items():
            out.update(metric.result(None if states is None else states[name]))
        return out

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()
