"""The best round of a run by one metric, whose weights are kept as ``best_model.npz``."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from fedpipe.common.config import ConfigError, ServerConfig

__all__ = ["BEST_MODEL_NAME", "BestRound"]

BEST_MODEL_NAME = "best_model.npz"


@dataclass
class BestRound:
    """The round whose ``metric`` was best so far (strictly: a tie keeps the earlier round).

    A round's metrics describe the weights that round ended with (evaluation follows
    aggregation), so the best round's weights are the best model.
    """

    metric: str
    mode: Literal["min", "max"]
    round: int = 0
    value: float | None = None

    @classmethod
    def from_config(cls, config: ServerConfig, known: Iterable[str]) -> BestRound | None:
        """The tracker ``config`` asks for; None when no metric applies (no ``best_metric``,
        no early stopping and no evaluation).

        Raises
        ------
        ConfigError
            ``best_metric`` is none of ``known`` (the run's metric names).
        """
        known = sorted({*known, "train_loss"})
        if config.best_metric is not None:
            if config.best_metric not in known:
                raise ConfigError(
                    f"best_metric={config.best_metric!r} is not a metric of this run: "
                    f"expected one of {known}"
                )
            assert config.best_mode is not None  # set by the config's validation
            return cls(config.best_metric, config.best_mode)
        if config.early_stop is not None:
            return cls(config.early_stop.metric, config.early_stop.mode)
        if config.eval_every and "loss" in known:
            return cls("loss", "min")
        return None

    def update(self, record: dict[str, Any]) -> bool:
        """Take one round's record; True when its round is the new best."""
        value = record.get(self.metric)
        if not isinstance(value, int | float) or not math.isfinite(value):
            return False
        if self.value is not None and (
            value >= self.value if self.mode == "min" else value <= self.value
        ):
            return False
        self.round, self.value = int(record["round"]), float(value)
        return True

    def replay(self, records: Iterable[dict[str, Any]]) -> None:
        """Rebuild the best round from a resumed run's history."""
        for record in records:
            self.update(record)

    def to_data(self) -> dict[str, Any]:
        """What ``summary.json`` says of it."""
        return {
            "best_metric": self.metric,
            "best_mode": self.mode,
            "best_round": self.round or None,
            "best_value": self.value,
        }
