"""Buffered aggregators: the server keeps every reply until the round closes, then reduces.

Robust aggregators (coordinate median, trimmed mean, Krum, Bulyan, geometric median) need all
the updates of a round at once, so they cannot be a sum of partials. A buffered aggregator's
client sends its plain update and sample count; the server keeps them in a
:class:`~fedpipe.common.aggregators.replies.ReplyBuffer` (in memory up to
``aggregation_memory_bytes``, in memory-mapped files beyond: see that module for the memory
bound) and calls :meth:`BufferedAggregator.reduce` once the round closes. A new one is a
subclass with a ``name`` and a ``reduce``; the round loop and the transports are unchanged.

Sample counts are self-reported (a client can lie), so weights are applied on the server
per the aggregator's :class:`~fedpipe.common.aggregators.weighting.ClientWeighting`:
``"uniform"`` (the default here: counts ignored), ``"samples"`` or ``"capped"``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

from fedpipe.common.aggregators.base import Aggregator
from fedpipe.common.aggregators.replies import ReplyBuffer
from fedpipe.common.aggregators.weighting import ClientWeighting
from fedpipe.common.summable import Summable
from fedpipe.common.vector import Vector

__all__ = ["DEFAULT_MEMORY_BYTES", "BufferedAggregator"]

#: Bytes of replies a buffered aggregator keeps in memory unless the server config says.
DEFAULT_MEMORY_BYTES = 1 << 30


class BufferedAggregator(Aggregator):
    """Base of the aggregators that see every update of the round before reducing.

    Subclasses implement :meth:`reduce`. Those that use client weights take ``weighting``
    and ``max_samples`` and set ``weights`` (a
    :class:`~fedpipe.common.aggregators.weighting.ClientWeighting`) in their constructor.
    """

    vector_fields: ClassVar[tuple[str, ...]] = ("update",)
    scalar_fields: ClassVar[tuple[str, ...]] = ("n_samples",)
    weights: ClientWeighting = ClientWeighting("buffered", "uniform")
    #: Server side, set by the round loop from its config: the in-memory budget for replies
    #: and the directory (the run's) where the rest is spilled.
    memory_bytes: int = DEFAULT_MEMORY_BYTES
    spill_dir: Path | None = None

    def prepare(self, updates: Vector, n_samples: int, n_steps: int) -> Summable:
        return Summable({"update": updates, "n_samples": n_samples})

    def start(self, first: Summable) -> Summable:
        return ReplyBuffer(self.memory_bytes, self.spill_dir).add_(first)

    def finalize(self, total: Summable) -> Vector:
        """Reduce the kept replies, then remove them (files included), whatever happens."""
        if not isinstance(total, ReplyBuffer):
            raise TypeError(f"{self.name} finalizes a ReplyBuffer, got {type(total).__name__}")
        try:
            if not len(total):
                raise ValueError("cannot aggregate zero client updates")
            return self.reduce(total, self.weights.normalized(total.n_samples))
        finally:
            total.close()

    def aggregate(self, partials: Iterable[Summable]) -> Vector:
        """Keep ``partials`` and reduce them; the result is on the first update's backend."""
        buffer: Summable | None = None
        first: Vector | None = None
        for partial in partials:
            partial = self.admit(partial)
            if buffer is None:
                first, buffer = partial.vector("update"), self.start(partial)
            else:
                buffer.add_(partial)
        if buffer is None or first is None:
            raise ValueError("cannot aggregate zero client updates")
        return self.finalize(buffer).like(first)

    @abstractmethod
    def reduce(self, replies: ReplyBuffer, weights: Any) -> Vector:
        """The global update from the round's ``replies`` (read them chunk range by chunk
        range: :meth:`ReplyBuffer.coordinatewise`, ``combine``, ``distances``) and their
        ``weights`` (float64, summing to 1)."""
