"""The aggregator API: client updates in, one global update out.

Aggregation is split in two:

1. each client calls :meth:`Aggregator.prepare` on its own update, giving a
   :class:`~fedpipe.common.summable.Summable` partial;
2. the server passes each partial through :meth:`Aggregator.admit` (what the server counts:
   its own weighting of the client's reported samples, norm bounding, a validation scale),
   folds it into the accumulator :meth:`Aggregator.start` makes of the first one (``add_``
   for each later one, in any order), then calls :meth:`Aggregator.finalize` once on it.

``admit`` acts on a whole reply: a norm bound needs the norm of the reply's update, which no
chunk of it has. A transport that streams replies stages each reply's Vectors on disk as
its chunks arrive (:class:`~fedpipe.common.spilled_vector.SpilledVector`), then
:meth:`Aggregator.admit_spilled` gives the one factor the reply is folded with (reading the
spill back for its norm only when a bound needs it) and :meth:`Aggregator.fold_chunk` adds
it into the running sum chunk by chunk, bit for bit as ``admit`` then ``add_`` would.

This base class is the *streaming* kind: the accumulator is a running sum, so the server
holds one model-sized total whatever the number of clients. The *buffered* kind
(:class:`~fedpipe.common.aggregators.buffered.BufferedAggregator`: median, Krum...) keeps
every reply until the round closes. The round loop and the transports cannot tell them apart.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from fedpipe.common.half import is_float_dtype, numpy_dtype
from fedpipe.common.registry import Registrable, declare_family
from fedpipe.common.spilled_vector import SpilledVector
from fedpipe.common.summable import Summable
from fedpipe.common.vector import ArraySpec, Vector, describe_spec_mismatch

__all__ = ["Aggregator", "InvalidPartialError"]


class InvalidPartialError(ValueError):
    """A client's prepared update does not have the fields or specs the aggregator expects."""


@declare_family
class Aggregator(Registrable):
    """Combines client updates into one global update."""

    family: ClassVar[str] = "aggregator"
    name: ClassVar[str]
    #: Names of the Vector fields of a partial (each with the model's specs).
    vector_fields: ClassVar[tuple[str, ...]]
    #: Names of the scalar fields of a partial (finite, non-negative).
    scalar_fields: ClassVar[tuple[str, ...]]

    @abstractmethod
    def prepare(self, updates: Vector, n_samples: int, n_steps: int) -> Summable:
        """Client side: turn one client's update into a partial that sums across clients.

        ``updates`` belongs to the aggregator from then on (its buffers may be reused).
        """

    def update_norm(
        self, partial: Summable, spilled: Mapping[str, SpilledVector] | None = None
    ) -> float:
        """Server side: the L2 norm of the client update ``partial`` carries (its first
        Vector field here, from disk if ``spilled``; averaging divides out the client's
        weight)."""
        key = self.vector_fields[0]
        return spilled[key].norm() if spilled and key in spilled else partial.vector(key).norm()

    def admit(self, partial: Summable, scale: float = 1.0) -> Summable:
        """Server side, before folding: ``partial`` as the server counts it, its update
        multiplied by ``scale`` (``< 1``: a down-weighted outlier). Works in place: the
        partial belongs to the aggregator."""
        if scale != 1.0:
            partial.vector(self.vector_fields[0]).mul_(scale)
        return partial

    def admit_spilled(
        self, partial: Summable, spilled: Mapping[str, SpilledVector], scale: float = 1.0
    ) -> float:
        """Server side, streaming: :meth:`admit` for a reply whose Vector fields are on disk
        (``partial`` holds its numbers, admitted in place): the factor its update is folded
        with by :meth:`fold_chunk`."""
        return scale

    def empty_total(self, specs: Mapping[str, ArraySpec]) -> Summable:
        """Server side, streaming: the running sum before any reply, for a model with
        ``specs``: each Vector field ``-0.0`` (``-0.0 + x`` is ``x`` bit for bit, so folding the
        first reply in keeps it exactly, as :meth:`start` does), float32 for half precision;
        each number 0."""

        def zeros(spec: ArraySpec) -> np.ndarray:
            dtype = numpy_dtype(spec.dtype)
            wide = np.float32 if is_float_dtype(dtype) and dtype.itemsize < 4 else dtype
            return np.full(spec.shape, -0.0, dtype=wide)

        fields = self.vector_fields
        vectors = {key: Vector({n: zeros(s) for n, s in specs.items()}) for key in fields}
        return Summable({**vectors, **dict.fromkeys(self.scalar_fields, 0)})

    def fold_chunk(
        self, total: Summable, key: str, name: str, start: int, values: np.ndarray, factor: float
    ) -> None:
        """Server side, streaming: add elements ``start:start + values.size`` of array ``name``
        of the reply's Vector field ``key``, times ``factor``, into ``total`` (the running sum;
        numpy). The reply's numbers are added by the caller."""
        target = total.vector(key).coefs[name].reshape(-1)[start : start + values.size]
        np.add(target, values * factor if factor != 1.0 else values, out=target)

    def start(self, first: Summable) -> Summable:
        """Server side: the round's accumulator, holding its first valid partial; later
        partials go in with its ``add_``. Streaming: the first partial is the running sum."""
        return first

    @property
    def stacks(self) -> bool:
        """Whether :meth:`admit_stacked` folds K clients at once (else a stacked simulation's
        round folds client by client)."""
        return False

    @property
    def streams(self) -> bool:
        """Whether a reply may be folded from disk: only where :meth:`admit_spilled` comes
        from the class that last defined :meth:`admit` (or a subclass of it), and
        :meth:`fold_chunk` from the one that last defined :meth:`start`. A subclass that
        changes how a reply is admitted or summed without its streaming twins gets whole
        replies."""
        cls = type(self)
        admits = overrides_follow(cls, ("admit_spilled",), ("admit",))
        return admits and overrides_follow(cls, ("fold_chunk",), ("start",))

    def weigh_stacked(
        self, updates: Mapping[str, Any], n_samples: Sequence[int]
    ) -> Mapping[str, Any]:
        """Server side, K clients at once (a stacked simulation): the Vector field each
        client's :meth:`prepare` would send for the update ``updates[name][k]`` of a client
        with ``n_samples[k]`` samples, row by row in the update's dtype (the caller checks
        each row finite, as it checks a reply). ``updates`` belongs to the aggregator."""
        raise NotImplementedError(f"aggregator {self.name!r} has no stacked form")

    def admit_stacked(
        self, weighted: Mapping[str, Any], n_samples: Sequence[int], into: Summable | None = None
    ) -> Summable:
        """Server side, K clients at once: the rows of :meth:`weigh_stacked` admitted and added
        up in client order onto ``into`` (the sum of earlier clients, reused) if given: what
        :meth:`admit`, :meth:`start` and ``add_`` give one by one, with the same bits."""
        raise NotImplementedError(f"aggregator {self.name!r} has no stacked form")

    @abstractmethod
    def finalize(self, total: Summable) -> Vector:
        """Server side: the global update from the sum of all partials.

        ``total`` belongs to the aggregator from then on: implementations may reuse its
        buffers (the server hands over its running sum, so no model-sized copy is made).
        """

    def aggregate(self, partials: Iterable[Summable]) -> Vector:
        """Admit and sum ``partials`` (streaming, one running sum, float32 for half-precision
        updates) and finalize: the result is in the running sum's dtypes. The partials belong
        to the aggregator (:meth:`admit` may scale them)."""
        total: Summable | None = None
        for partial in partials:
            partial = self.admit(partial)
            total = partial.accumulator() if total is None else total.add_(partial)
        if total is None:
            raise ValueError("cannot aggregate zero client updates")
        return self.finalize(total)

    def validate(
        self,
        partial: Summable,
        specs: Mapping[str, ArraySpec],
        spilled: Mapping[str, SpilledVector] | None = None,
    ) -> None:
        """Raise :class:`InvalidPartialError` unless ``partial`` (with its Vector fields
        ``spilled`` to disk, if any) is a well-formed partial for a model with ``specs``: the
        expected fields, the model's specs, finite values."""
        spilled = spilled or {}
        expected = set(self.vector_fields) | set(self.scalar_fields)
        if set(partial.fields) | set(spilled) != expected or set(partial.fields) & set(spilled):
            raise InvalidPartialError(
                f"{self.name} partial has fields {sorted([*partial.fields, *spilled])}, "
                f"expected {sorted(expected)}"
            )
        for key, disk in spilled.items():
            if key not in self.vector_fields:
                raise InvalidPartialError(f"field {key!r} must be a number")
            problem = describe_spec_mismatch(disk.specs, specs)
            if problem:
                raise InvalidPartialError(f"field {key!r}: {problem}")
            if disk.nonfinite is not None:
                raise InvalidPartialError(
                    f"field {key!r} holds NaN or infinite values ({disk.nonfinite})"
                )
        for key in self.vector_fields:
            if key in spilled:
                continue
            value = partial.fields[key]
            if not isinstance(value, Vector):
                raise InvalidPartialError(
                    f"field {key!r} must be a Vector, got {type(value).__name__}"
                )
            try:
                value.check_specs(specs, f"field {key!r}")
            except ValueError as exc:
                raise InvalidPartialError(str(exc)) from None
            if not value.is_finite():
                raise InvalidPartialError(f"field {key!r} holds NaN or infinite values")
        for key in self.scalar_fields:
            value = partial.fields[key]
            if isinstance(value, Vector) or isinstance(value, bool):
                raise InvalidPartialError(f"field {key!r} must be a number")
            if not math.isfinite(value) or value < 0:
                raise InvalidPartialError(
                    f"field {key!r} is {value}, expected a finite non-negative number"
                )


def overrides_follow(cls: type, twins: Sequence[str], bases: Sequence[str]) -> bool:
    """Whether every method named in ``twins`` is defined in ``cls``'s MRO no later (no
    further from ``cls``) than every method named in ``bases``."""

    def depth(name: str) -> int:
        return next(i for i, owner in enumerate(cls.__mro__) if name in vars(owner))

    return max(map(depth, twins)) <= min(map(depth, bases))
