"""What :func:`fedpipe.simulate` returns: a finished run's rounds, final model and outcome.

Named ``RunHistory`` so that it is never confused with
:class:`fedpipe.server.history.History`, the server's writer of ``metrics.jsonl`` and
``metrics.csv``: this object is what that writer wrote, read back as Python values.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedpipe.common.outcome import RunError
from fedpipe.common.vector import Vector

if TYPE_CHECKING:
    from fedpipe.common.config import SimulationConfig
    from fedpipe.server.rounds import RunStatus, RunSummary

__all__ = ["RunHistory", "UnknownMetricError"]

#: Record keys that describe a round rather than measure it.
_BOOKKEEPING = frozenset({"round", "clients", "failed"})


class UnknownMetricError(KeyError):
    """No round of the run recorded a metric of this name."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


@dataclass(frozen=True)
class RunHistory:
    """A finished run: per-round records, the final global model and how the run ended.

    Attributes
    ----------
    records:
        One dict per round, as in ``metrics.jsonl``: ``round``, ``sampled``, ``replied``,
        ``clients`` (names), ``train_loss``, the evaluation metrics (``loss``, ``accuracy``...)
        when the round evaluated, ``seconds``, and ``failed`` (why) for a round whose model
        stayed unchanged.
    weights:
        The final global model (``weights["w"]`` is a numpy array; :attr:`arrays` gives a
        plain dict); the same arrays as ``model.npz``.
    status, reason, rounds_completed, stopped_early:
        As in ``summary.json``: ``status`` is ``completed``, ``failed`` or ``stopped``.
    config:
        The validated configuration that ran.
    """

    records: list[dict[str, Any]]
    weights: Vector
    status: RunStatus
    reason: str
    rounds_completed: int
    stopped_early: bool
    config: SimulationConfig

    @classmethod
    def from_summary(cls, summary: RunSummary, config: SimulationConfig) -> RunHistory:
        return cls(
            records=list(summary.history),
            weights=summary.weights,
            status=summary.status,
            reason=summary.reason,
            rounds_completed=summary.rounds_completed,
            stopped_early=summary.stopped_early,
            config=config,
        )

    @property
    def output_dir(self) -> Path:
        """Where the run wrote its metrics, checkpoint, ``model.npz`` and ``summary.json``."""
        return Path(self.config.server.output_dir)

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """The final weights as a plain ``{name: array}`` dict (the arrays are not copied)."""
        return dict(self.weights.coefs)

    @property
    def metric_names(self) -> list[str]:
        """Names of the numeric columns of the records, in the order they first appear."""
        names: list[str] = []
        for record in self.records:
            names += [k for k, v in record.items() if _is_metric(k, v) and k not in names]
        return names

    def metric(self, name: str) -> list[tuple[int, float]]:
        """``(round, value)`` for every round that recorded ``name``, in round order
        (evaluation metrics exist only for the rounds that evaluated: see ``eval_every``).

        Raises
        ------
        UnknownMetricError
            No round recorded ``name`` (a ``KeyError``); the message lists those that exist.
        """
        values = [
            (int(r["round"]), float(r[name])) for r in self.records if _is_metric(name, r.get(name))
        ]
        if not values:
            known = ", ".join(self.metric_names) or "none (no round ran)"
            raise UnknownMetricError(
                f"no round recorded a metric {name!r}; recorded metrics: {known}"
            )
        return values

    def raise_for_status(self) -> RunHistory:
        """Raise :class:`~fedpipe.common.outcome.RunError` with the reason if the run failed;
        else return self."""
        if self.status == "failed":
            raise RunError(self.reason)
        return self

    def to_pandas(self) -> Any:
        """The records as a ``pandas.DataFrame`` indexed by round, one column per metric
        (and ``sampled``, ``replied``, ``failed``); client lists are left out.

        Raises
        ------
        ImportError
            pandas is not installed (it is not a dependency of fedpipe).
        """
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError(
                "RunHistory.to_pandas() needs pandas, which fedpipe does not install: "
                "`pip install pandas`, or use history.records / history.metric(name)"
            ) from exc
        rows = [{k: v for k, v in r.items() if not isinstance(v, list)} for r in self.records]
        return pd.DataFrame(rows).set_index("round") if rows else pd.DataFrame()


def _is_metric(key: str, value: Any) -> bool:
    return (
        key not in _BOOKKEEPING and isinstance(value, numbers.Real) and not isinstance(value, bool)
    )
