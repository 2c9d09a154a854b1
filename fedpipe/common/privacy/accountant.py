"""The privacy accountant: ε spent so far, from ``dp-accounting``.

fedpipe does no privacy arithmetic of its own: each round of client-level DP (on the server),
each step of sample-level DP-SGD (on a client), is one sampled Gaussian mechanism handed to
Google's ``dp-accounting`` library (the ``privacy`` extra), whose RDP accountant (Mironov 2017;
Mironov, Talwar and Zhang 2019 for Poisson subsampling; Wang, Balle and Kasiviswanathan 2019
for sampling without replacement) or PLD accountant (Koskela et al. 2020; Doroshenko et al.
2022: tighter, slower) turns them into ε at the run's δ.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

from fedpipe.common.state import State

__all__ = ["AccountantKind", "PrivacyAccountant", "RoundEvent"]

AccountantKind = Literal["rdp", "pld"]


@dataclass(frozen=True)
class RoundEvent:
    """One round's mechanism: a Gaussian of ``noise_multiplier`` on clients sampled either
    by Poisson with rate ``q`` (``population == 0``), or ``sample_size`` of ``population``
    uniformly without replacement."""

    noise_multiplier: float
    q: float = 0.0
    population: int = 0
    sample_size: int = 0

    def dp_event(self) -> Any:
        import dp_accounting

        if self.population == 0:
            gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier)
            return dp_accounting.PoissonSampledDpEvent(self.q, gaussian)
        # Replace-one neighbours: swapping one client's clipped update for another's moves the
        # sum by up to 2 x clip, and the library's without-replacement bound takes the noise
        # over that whole distance (Wang, Balle and Kasiviswanathan 2019): z / 2.
        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier / 2)
        return dp_accounting.SampledWithoutReplacementDpEvent(
            self.population, self.sample_size, gaussian
        )

    def to_state(self) -> list[float]:
        return [self.noise_multiplier, self.q, float(self.population), float(self.sample_size)]


def new_accountant(kind: AccountantKind, poisson: bool) -> Any:
    """A fresh ``dp-accounting`` accountant: add-or-remove-one neighbours under Poisson
    sampling, replace-one under fixed-size sampling (what each amplification bound needs)."""
    try:
        import dp_accounting
        from dp_accounting import pld, rdp
    except ImportError as exc:
        raise ImportError(
            "differential privacy needs its accountant: pip install 'fedpipe[privacy]'"
        ) from exc
    relation = dp_accounting.NeighboringRelation
    neighbours = relation.ADD_OR_REMOVE_ONE if poisson else relation.REPLACE_ONE
    if kind == "rdp":
        return rdp.RdpAccountant(neighboring_relation=neighbours)
    return pld.PLDAccountant(neighboring_relation=neighbours)


@functools.lru_cache(maxsize=64)
def _event_rdp(event: RoundEvent) -> tuple[Any, Any]:
    """The RDP orders and curve of one ``event``, from ``dp-accounting`` (cached: a client
    accounts thousands of identical DP-SGD steps every round)."""
    accountant = new_accountant("rdp", event.population == 0)
    accountant.compose(event.dp_event())
    return accountant.orders, accountant.rdp


def _rdp_epsilon(rounds: list[tuple[RoundEvent, int]], delta: float) -> float:
    """ε of ``rounds`` at ``delta``: the RDP accountant's own composition (RDP curves add,
    ``count`` times each) and its own conversion (``compute_epsilon``)."""
    from dp_accounting.rdp import rdp_privacy_accountant

    orders, total = _event_rdp(rounds[0][0])[0], 0.0
    for event, count in rounds:
        total = total + count * _event_rdp(event)[1]
    return float(rdp_privacy_accountant.compute_epsilon(orders, total, delta)[0])


class PrivacyAccountant:
    """Counts the rounds of a run (runs of identical rounds kept as one entry with a count)
    and reports ε at ``delta`` for them; its state goes in the server's checkpoint."""

    def __init__(self, kind: AccountantKind, delta: float) -> None:
        self.kind = kind
        self.delta = float(delta)
        self.rounds: list[tuple[RoundEvent, int]] = []

    def supports(self, event: RoundEvent) -> bool:
        return bool(new_accountant(self.kind, event.population == 0).supports(event.dp_event()))

    def spend(self, event: RoundEvent, count: int = 1) -> None:
        """Count ``count`` more rounds of ``event``."""
        if self.rounds and self.rounds[-1][0] == event:
            self.rounds[-1] = (event, self.rounds[-1][1] + count)
        elif count:
            self.rounds.append((event, count))

    def epsilon(self, extra: RoundEvent | None = None, count: int = 1) -> float:
        """ε at ``delta`` of the rounds counted (and of ``count`` more rounds of ``extra``)."""
        rounds = self.rounds + ([(extra, count)] if extra is not None and count else [])
        if not rounds:
            return 0.0
        if self.kind == "rdp":
            return _rdp_epsilon(rounds, self.delta)
        accountant = new_accountant(self.kind, rounds[0][0].population == 0)
        for event, count in rounds:
            accountant.compose(event.dp_event(), count)
        return float(accountant.get_epsilon(self.delta))

    def get_state(self) -> State:
        return {"rounds": [[*event.to_state(), float(count)] for event, count in self.rounds]}

    def set_state(self, state: State) -> None:
        rounds = state.get("rounds")
        if not isinstance(rounds, list) or not all(
            isinstance(r, list) and len(r) == 5 and all(isinstance(v, float) for v in r)
            for r in rounds
        ):
            raise ValueError(f"privacy accountant state 'rounds' is {rounds!r}, expected 5 floats")
        values = [[float(v) for v in r] for r in rounds]  # type: ignore[union-attr, arg-type]
        self.rounds = [
            (RoundEvent(sigma, q, int(n), int(m)), int(count)) for sigma, q, n, m, count in values
        ]
