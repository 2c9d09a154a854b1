"""Weighted averaging (FedAvg, McMahan et al. 2017), norm-bounded on request, and plain
summation."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from fedpipe.common.aggregators.base import Aggregator, InvalidPartialError, overrides_follow
from fedpipe.common.aggregators.weighting import ClientWeighting, Weighting
from fedpipe.common.backends import ops_of
from fedpipe.common.spilled_vector import SpilledVector
from fedpipe.common.summable import Summable
from fedpipe.common.vector import Vector

__all__ = ["AveragingAggregator", "SumAggregator"]


class AveragingAggregator(Aggregator):
    """Weighted average of client updates, each first bounded to ``max_norm`` if set.

    The client sends ``{weighted_sum: w * u, total_weight: w}``; the server does not trust
    ``w`` (:meth:`admit`): it re-applies its ``weighting`` to it and rescales the sum to
    match, and with ``max_norm`` scales ``u`` down to that L2 norm (norm bounding: Sun et
    al. 2019, "Can You Really Backdoor Federated Learning?"). A partial with weight 0 adds
    nothing.

    Parameters
    ----------
    weighting, max_samples:
        ``"samples"`` (FedAvg: weight by local sample count), ``"uniform"``, or ``"capped"``
        (sample counts capped at ``max_samples``): see
        :mod:`~fedpipe.common.aggregators.weighting`.
    max_norm:
        L2 bound on each client's update (``None``: unbounded).
    """

    name: ClassVar[str] = "averaging"
    vector_fields: ClassVar[tuple[str, ...]] = ("weighted_sum",)
    scalar_fields: ClassVar[tuple[str, ...]] = ("total_weight",)

    def __init__(
        self,
        weighting: Weighting = "samples",
        max_samples: int | None = None,
        max_norm: float | None = None,
    ) -> None:
        self.weights = ClientWeighting(self.name, weighting, max_samples)
        if max_norm is not None and not (math.isfinite(max_norm) and max_norm > 0):
            raise ValueError(f"{self.name}: max_norm={max_norm!r}; expected a number > 0")
        self.max_norm = None if max_norm is None else float(max_norm)

    def get_config(self) -> dict[str, Any]:
        norm = {"max_norm": self.max_norm} if self.max_norm is not None else {}
        return self.weights.get_config() | norm

    def prepare(self, updates: Vector, n_samples: int, n_steps: int) -> Summable:
        weight = self.weights.weight(n_samples)
        return Summable({"weighted_sum": updates.mul_(weight), "total_weight": weight})

    def update_norm(
        self, partial: Summable, spilled: Mapping[str, SpilledVector] | None = None
    ) -> float:
        weight = partial.number("total_weight")
        return super().update_norm(partial, spilled) / weight if weight > 0 else 0.0

    def admit(self, partial: Summable, scale: float = 1.0) -> Summable:
        reported = partial.number("total_weight")
        factor = self._admitted(partial, lambda: partial.vector("weighted_sum").norm(), scale)
        if factor != 1.0:  # 1.0 for an honest client with no bound hit: bits unchanged
            partial.vector("weighted_sum").mul_(factor)
        if factor > 1.0 and not partial.vector("weighted_sum").is_finite():
            raise self._overflow(reported, partial)
        return partial

    def admit_spilled(
        self, partial: Summable, spilled: Mapping[str, SpilledVector], scale: float = 1.0
    ) -> float:
        reported = partial.number("total_weight")
        update = spilled["weighted_sum"]
        factor = self._admitted(partial, update.norm, scale)
        if factor > 1.0 and not update.finite_times(factor):
            raise self._overflow(reported, partial)
        return factor

    def _admitted(self, partial: Summable, norm: Callable[[], float], scale: float) -> float:
        """Count the reply's weight in place; the factor its weighted sum is multiplied by
        (``norm()``: the weighted sum's L2 norm, asked for only under a bound)."""
        reported = partial.number("total_weight")
        counted = self.weights.weight(reported) if reported > 0 else 0.0
        factor = scale * counted / reported if reported > 0 else 0.0
        if self.max_norm is not None:  # bounds the update as scaled (a down-weighted outlier)
            update = scale * norm() / reported if reported > 0 else 0.0
            factor *= min(1.0, self.max_norm / update) if update > 0 else 1.0
        partial.fields["total_weight"] = counted
        return factor

    def _overflow(self, reported: float, partial: Summable) -> InvalidPartialError:
        # only a weight reported below the counted one (uniform) scales a sum up
        return InvalidPartialError(
            f"{self.name}: the update is not finite once weighted (reported weight "
            f"{reported!r}, counted {partial.number('total_weight')!r})"
        )

    @property
    def stacks(self) -> bool:
        # A norm bound scales each update by its own norm; a subclass (gradient masking)
        # that changes prepare, admit or start has no stacked form unless it defines one.
        stacked = ("weigh_stacked", "admit_stacked")
        own = overrides_follow(type(self), stacked, ("prepare", "admit", "start"))
        return own and self.max_norm is None

    def weigh_stacked(
        self, updates: Mapping[str, Any], n_samples: Sequence[int]
    ) -> Mapping[str, Any]:
        """Each row times its client's weight, in place (as each client's prepare)."""
        weights = [self.weights.weight(n) for n in n_samples]
        for stacked in updates.values():
            ops_of(stacked).scale_rows_(stacked, weights)
        return updates

    def admit_stacked(
        self, weighted: Mapping[str, Any], n_samples: Sequence[int], into: Summable | None = None
    ) -> Summable:
        """The weighted sum over the client axis."""
        total_weight = 0.0 if into is None else into.number("total_weight")
        for n in n_samples:  # in client order, as the one-by-one fold adds them
            total_weight += self.weights.weight(n)
        summed = {n: _fold_rows(w, into, "weighted_sum", n) for n, w in weighted.items()}
        return Summable({"weighted_sum": Vector(summed), "total_weight": total_weight})

    def finalize(self, total: Summable) -> Vector:
        weight = total.number("total_weight")
        if weight <= 0:
            raise ValueError("total client weight is 0: no client reported any sample")
        return total.vector("weighted_sum").mul_(1.0 / weight)


class SumAggregator(Aggregator):
    """Sum of client updates (for secure-aggregation masks and custom weighting)."""

    name: ClassVar[str] = "sum"
    vector_fields: ClassVar[tuple[str, ...]] = ("sum",)
    scalar_fields: ClassVar[tuple[str, ...]] = ()

    def prepare(self, updates: Vector, n_samples: int, n_steps: int) -> Summable:
        return Summable({"sum": updates})

    @property
    def stacks(self) -> bool:
        stacked = ("weigh_stacked", "admit_stacked")
        return overrides_follow(type(self), stacked, ("prepare", "admit", "start"))

    def weigh_stacked(
        self, updates: Mapping[str, Any], n_samples: Sequence[int]
    ) -> Mapping[str, Any]:
        return updates

    def admit_stacked(
        self, weighted: Mapping[str, Any], n_samples: Sequence[int], into: Summable | None = None
    ) -> Summable:
        """The sum over the client axis."""
        return Summable(
            {"sum": Vector({n: _fold_rows(u, into, "sum", n) for n, u in weighted.items()})}
        )

    def finalize(self, total: Summable) -> Vector:
        return total.vector("sum")


def _fold_rows(rows: Any, into: Summable | None, field: str, name: str) -> Any:
    """``into``'s array plus every row (:meth:`~fedpipe.common.backends.ArrayOps.sum_rows`:
    a left fold in numpy, bit-equal to adding the replies one by one)."""
    start = None if into is None else into.vector(field).coefs[name]
    return ops_of(rows).sum_rows(rows, start)
