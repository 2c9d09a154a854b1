"""Power-of-choice: among candidates drawn by data size, the clients with the highest loss."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from fedpipe.common.state import State
from fedpipe.server.sampling.base import C, ClientSampler
from fedpipe.server.sampling.weighted import check_max_samples, draw_by_size

__all__ = ["PowerOfChoiceSampler"]


class PowerOfChoiceSampler(ClientSampler):
    """Draw ``d`` candidates without replacement in proportion to their data size, then keep
    the ``m`` whose local loss is highest (Cho, Wang and Joshi 2020, "Client selection in
    federated learning: convergence analysis and power-of-choice selection strategies").

    This is the paper's communication-free variant, rpow-d: a client's loss is the mean
    training loss it reported the last time its reply was aggregated, so the candidates need
    no extra round trip. A client with no reported loss yet ranks first; ties keep the draw's
    order. ``d = m`` is data-size sampling; a larger ``d`` favours high-loss clients more
    (faster early convergence, more bias). The losses are the sampler's state (checkpointed);
    they are the clients' own word, and ``max_samples`` caps what a size report can weigh.
    """

    name: ClassVar[str] = "power-of-choice"

    def __init__(self, d: int, m: int, max_samples: int | None = None) -> None:
        for key, value in (("d", d), ("m", m)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"power-of-choice sampler: {key}={value!r}; expected an integer >= 1"
                )
        if m > d:
            raise ValueError(
                f"power-of-choice sampler: m={m} exceeds d={d}; the m clients are chosen among d "
                "candidates"
            )
        check_max_samples(self.name, max_samples)
        self.d = d
        self.m = m
        self.max_samples = max_samples
        self.losses: dict[str, float] = {}

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"d": self.d, "m": self.m}
        if self.max_samples is not None:
            config["max_samples"] = self.max_samples
        return config

    def sample(
        self, candidates: Sequence[C], rng: np.random.Generator, round_number: int
    ) -> list[C]:
        drawn = draw_by_size(candidates, min(self.d, len(candidates)), rng, self.max_samples)
        ranked = sorted(drawn, key=lambda i: -self.losses.get(candidates[i].name, math.inf))
        return [candidates[i] for i in sorted(ranked[: self.m])]

    def observe(self, losses: Mapping[str, float]) -> None:
        self.losses.update((name, float(loss)) for name, loss in losses.items())

    def get_state(self) -> State:
        return {"losses": dict(self.losses)}

    def set_state(self, state: State) -> None:
        losses = state.get("losses")
        if not isinstance(losses, dict) or not all(
            isinstance(v, float) and not math.isnan(v) for v in losses.values()
        ):
            raise ValueError(
                f"power-of-choice state 'losses' is {losses!r}, expected client names -> floats"
            )
        self.losses = {str(name): float(loss) for name, loss in losses.items()}  # type: ignore[arg-type]
