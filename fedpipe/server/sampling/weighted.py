"""Sampling weighted by data size: clients with more training samples train more often."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from fedpipe.server.sampling.base import (
    C,
    Candidate,
    ClientSampler,
    check_fraction_count,
    draw_count,
)

__all__ = ["WeightedSampler", "draw_by_size"]

log = logging.getLogger(__name__)


class WeightedSampler(ClientSampler):
    """``count`` clients, or ``ceil(fraction * n)`` of the ``n`` candidates, drawn without
    replacement with probability proportional to their reported training-sample counts
    (Li et al. 2020, "On the convergence of FedAvg on non-IID data", draw their scheme I
    with replacement; here a client trains at most once per round).

    Draws are successive: each pick is proportional to the sizes of the clients not yet
    picked, so with more than one pick the largest clients are included somewhat less than
    in proportion. A count is the client's own word: ``max_samples`` caps what one client's
    report can weigh. Clients reporting no training sample are never drawn.
    """

    name: ClassVar[str] = "weighted"

    def __init__(
        self,
        fraction: float | None = None,
        count: int | None = None,
        max_samples: int | None = None,
    ) -> None:
        check_fraction_count(self.name, fraction, count)
        check_max_samples(self.name, max_samples)
        self.fraction = fraction
        self.count = count
        self.max_samples = max_samples

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"fraction": self.fraction, "count": self.count}
        config["max_samples"] = self.max_samples
        return {key: value for key, value in config.items() if value is not None}

    def sample(
        self, candidates: Sequence[C], rng: np.random.Generator, round_number: int
    ) -> list[C]:
        k = draw_count(len(candidates), self.fraction, self.count) if candidates else 0
        chosen = draw_by_size(candidates, k, rng, self.max_samples)
        return [candidates[i] for i in sorted(chosen)]


def check_max_samples(owner: str, max_samples: int | None) -> None:
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    ):
        raise ValueError(f"{owner} sampler: max_samples={max_samples!r}; expected an integer >= 1")


def draw_by_size(
    candidates: Sequence[Candidate], k: int, rng: np.random.Generator, max_samples: int | None
) -> list[int]:
    """Indices of ``k`` candidates drawn without replacement, each draw proportional to the
    (capped) sizes of those left, in draw order; fewer when fewer candidates hold data."""
    sizes = np.array([max(c.n_train_samples, 0) for c in candidates], dtype=np.float64)
    if max_samples is not None:
        sizes = np.minimum(sizes, max_samples)
    holding = int(np.count_nonzero(sizes))
    if holding < k:
        log.warning("%d of %d candidate(s) reported training data", holding, len(candidates))
        k = holding
    if k == 0:
        return []
    return [int(i) for i in rng.choice(len(sizes), size=k, replace=False, p=sizes / sizes.sum())]
