"""Uniform sampling without replacement: a fixed number of clients per round."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from fedpipe.server.sampling.base import C, ClientSampler, check_fraction_count, draw_count

__all__ = ["UniformSampler"]


class UniformSampler(ClientSampler):
    """``count`` clients, or ``ceil(fraction * n)`` of the ``n`` candidates (default: all),
    each subset of that size equally likely (McMahan et al. 2017, FedAvg's client fraction C).

    When every candidate is drawn, ``rng`` is left untouched.
    """

    name: ClassVar[str] = "uniform"

    def __init__(self, fraction: float | None = None, count: int | None = None) -> None:
        check_fraction_count(self.name, fraction, count)
        self.fraction = fraction
        self.count = count

    def get_config(self) -> dict[str, Any]:
        if self.count is not None:
            return {"count": self.count}
        return {} if self.fraction is None else {"fraction": self.fraction}

    def sample(
        self, candidates: Sequence[C], rng: np.random.Generator, round_number: int
    ) -> list[C]:
        n = len(candidates)
        if n == 0:
            return []
        k = draw_count(n, self.fraction, self.count)
        if k == n:
            return list(candidates)
        chosen = rng.choice(n, size=k, replace=False)
        return [candidates[i] for i in sorted(chosen)]
