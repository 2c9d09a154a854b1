"""Poisson sampling: each client takes part independently with probability ``q``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from fedpipe.server.sampling.base import C, ClientSampler

__all__ = ["PoissonSampler"]

log = logging.getLogger(__name__)


class PoissonSampler(ClientSampler):
    """Each candidate is drawn independently with probability ``q``: the round's size is
    Binomial(n, q), its mean ``q * n``.

    Privacy amplification by subsampling, as DP-FedAvg's moments accountant uses it (McMahan
    et al. 2018, "Learning differentially private recurrent language models"; Abadi et al.
    2016), holds only if every client's inclusion probability is exactly ``q``. So a round
    is never topped up to ``min_clients`` or ``min_results``: a round may draw no client at
    all. Such a round is empty (logged, recorded with ``sampled = 0``, the model unchanged,
    not a failed round); one that draws fewer than ``min_results`` clients fails as any
    round short of results does (see ``max_failed_rounds``).
    """

    name: ClassVar[str] = "poisson"

    def __init__(self, q: float) -> None:
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q <= 1:
            raise ValueError(f"poisson sampler: q={q!r}; expected a probability in (0, 1]")
        self.q = float(q)

    def get_config(self) -> dict[str, Any]:
        return {"q": self.q}

    def sample(
        self, candidates: Sequence[C], rng: np.random.Generator, round_number: int
    ) -> list[C]:
        if not candidates:
            return []
        drawn = rng.random(len(candidates)) < self.q
        chosen = [c for c, keep in zip(candidates, drawn, strict=True) if keep]
        log.info(
            "round %d: poisson q=%g drew %d of %d client(s) (expected %.1f; never topped up)",
            round_number,
            self.q,
            len(chosen),
            len(candidates),
            self.q * len(candidates),
        )
        return chosen
