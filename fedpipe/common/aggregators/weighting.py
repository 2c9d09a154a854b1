"""How the server weighs each client's update: by the sample count the client reports,
capped, or not at all.

A sample count is self-reported, and a client can lie: one claiming a million samples would
own a sample-weighted average. ``weighting = "uniform"`` ignores counts, ``"capped"`` bounds
them by ``max_samples``, ``"samples"`` takes them as they come (FedAvg, McMahan et al. 2017).
Every aggregator that uses weights takes these two parameters and applies them on the
server, streaming and buffered alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = ["ClientWeighting", "Weighting"]

Weighting = Literal["samples", "uniform", "capped"]


@dataclass(frozen=True)
class ClientWeighting:
    """A weighting scheme, checked on construction.

    Parameters
    ----------
    owner:
        The aggregator's name, for error messages.
    weighting:
        ``"samples"``, ``"uniform"`` or ``"capped"``.
    max_samples:
        The cap of ``"capped"`` (an integer >= 1); unused otherwise.
    """

    owner: str
    weighting: str
    max_samples: int | None = None

    def __post_init__(self) -> None:
        if self.weighting not in ("samples", "uniform", "capped"):
            raise ValueError(
                f"{self.owner}: weighting={self.weighting!r}; "
                "expected 'samples', 'uniform' or 'capped'"
            )
        cap = self.max_samples
        if self.weighting == "capped" and (
            isinstance(cap, bool) or not isinstance(cap, int) or cap < 1
        ):
            raise ValueError(
                f"{self.owner}: weighting='capped' needs max_samples, an integer >= 1; got {cap!r}"
            )

    def weight(self, n_samples: float) -> float:
        """One client's weight. Idempotent (``weight(weight(n)) == weight(n)``), so the server
        can re-apply it to a weight a client computed."""
        if self.weighting == "uniform":
            return 1.0
        if self.weighting == "capped":
            return float(min(n_samples, self.max_samples or 0))
        return float(n_samples)

    def normalized(self, n_samples: Sequence[float]) -> Any:
        """Each client's weight, summing to 1 (float64 array)."""
        weights = np.array([self.weight(n) for n in n_samples], dtype=np.float64)
        if weights.sum() <= 0:
            raise ValueError("total client weight is 0: no client reported any sample")
        return weights / weights.sum()

    def get_config(self) -> dict[str, Any]:
        """The constructor's keywords (``max_samples`` only when it is set)."""
        config: dict[str, Any] = {"weighting": self.weighting}
        return config | ({"max_samples": self.max_samples} if self.max_samples else {})
