"""The client sampler API: which of the connected clients train in a round."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar, Protocol, TypeVar

import numpy as np

from fedpipe.common.registry import Registrable, declare_family
from fedpipe.common.state import State

__all__ = ["Candidate", "ClientSampler", "check_fraction_count", "draw_count"]


class Candidate(Protocol):
    """What a sampler may know of a client: its name and the training-sample count it
    reported at its handshake (its own word: a client can lie)."""

    name: str
    n_train_samples: int


C = TypeVar("C", bound=Candidate)


@declare_family
class ClientSampler(Registrable):
    """Draws each round's clients among the candidates (the initialized, connected clients,
    sorted by name).

    Every random draw comes from ``rng``, the run's sampling generator: seeded with the run
    ``seed``, advanced by each round's draw and saved in the checkpoint with the sampler's own
    state (:meth:`get_state`), so a resumed run draws exactly what an uninterrupted one draws.
    Only :class:`~fedpipe.server.sampling.poisson.PoissonSampler` may return no client from
    a non-empty candidate list: the round is then empty (model unchanged, not a failure).
    """

    family: ClassVar[str] = "sampler"
    name: ClassVar[str]

    @abstractmethod
    def sample(
        self, candidates: Sequence[C], rng: np.random.Generator, round_number: int
    ) -> list[C]:
        """This round's clients, a sub-list of ``candidates`` in their order."""

    def observe(self, losses: Mapping[str, float]) -> None:
        """Learn the mean training loss of each client whose reply a round aggregated."""
        return None

    def get_state(self) -> State:
        """What a resumed run needs to sample as the uninterrupted one would."""
        return {}

    def set_state(self, state: State) -> None:
        if state:
            raise ValueError(f"sampler {self.name!r} keeps no state, got keys {sorted(state)}")


def draw_count(n: int, fraction: float | None, count: int | None) -> int:
    """How many of ``n`` candidates to draw: ``count``, or ``ceil(fraction * n)`` (default:
    every one), at least 1 and at most ``n``."""
    k = count if count is not None else math.ceil((1.0 if fraction is None else fraction) * n)
    return max(1, min(k, n))


def check_fraction_count(owner: str, fraction: float | None, count: int | None) -> None:
    """Raise ValueError unless at most one of ``fraction`` in (0, 1] and ``count`` >= 1 is set."""
    if fraction is not None and count is not None:
        raise ValueError(
            f"{owner} sampler: fraction={fraction} and count={count} are two ways to say how "
            "many clients to draw; set one"
        )
    if fraction is not None and not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ValueError(f"{owner} sampler: fraction={fraction!r}; expected a number in (0, 1]")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"{owner} sampler: count={count!r}; expected an integer >= 1")
