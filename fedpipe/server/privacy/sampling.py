"""Which client samplers the accountant can model, and the mechanism event of a round."""

from __future__ import annotations

import dataclasses

from fedpipe.common.config import ConfigError
from fedpipe.common.privacy.accountant import RoundEvent
from fedpipe.server.sampling import ClientSampler, PoissonSampler, UniformSampler
from fedpipe.server.sampling.base import draw_count

__all__ = ["check_sampler", "round_event"]


def check_sampler(sampler: ClientSampler) -> None:
    """Raise ConfigError unless the accountant can model ``sampler``: Poisson with rate q,
    or a fixed-size uniform draw without replacement."""
    if not isinstance(sampler, PoissonSampler | UniformSampler):
        raise ConfigError(
            f"sampler {sampler.name!r}: the privacy accountant models only Poisson sampling "
            "(sampler = ['poisson', {q = ...}]) or a fixed-size uniform draw (sampler = "
            "['uniform', {count = ...}]); a sampler that favours some clients has no "
            "amplification bound"
        )


def round_event(
    sampler: ClientSampler, noise_multiplier: float, population: int, sampled: int | None = None
) -> RoundEvent:
    """The round's mechanism: ``sampled`` of ``population`` candidates (by default, the count
    a uniform sampler draws from them)."""
    if isinstance(sampler, PoissonSampler):
        return RoundEvent(noise_multiplier, q=sampler.q)
    assert isinstance(sampler, UniformSampler)
    if sampled is None:
        sampled = draw_count(population, sampler.fraction, sampler.count)
    return RoundEvent(noise_multiplier, population=population, sample_size=max(sampled, 1))


def with_multiplier(event: RoundEvent, noise_multiplier: float) -> RoundEvent:
    return dataclasses.replace(event, noise_multiplier=noise_multiplier)
