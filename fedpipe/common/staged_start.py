"""A round's start weights on disk while a client trains, and its update made from them
chunk by chunk as the reply streams.

A client's reply is ``prepare(start - end)``: the weights it started the round from minus
those it ended with, then the aggregator's own scaling. Kept in memory, the start weights are
a third model-sized array next to the weights being trained and a step's gradient. Here they
wait in an unlinked temporary file (disk, or page cache: no process memory; a ``/tmp`` on
tmpfs is RAM all the same, so a client points ``state_dir`` at a disk), and each chunk of the
reply is ``prepare(start chunk read back - end chunk)``: the same float operations, element
by element, as on the whole arrays, so the reply's bytes are the same.

Only where the preparation works element by element (:func:`why_start_in_memory`): clipping
a whole update (client-level DP), masking it (secure aggregation), a client's own training
function (whose update goes through the modules whole) or an aggregator of its own keep the
start weights in memory.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fedpipe.common.aggregators import Aggregator
from fedpipe.common.aggregators.averaging import AveragingAggregator, SumAggregator
from fedpipe.common.aggregators.buffered import BufferedAggregator
from fedpipe.common.aggregators.gradient_masked import GradientMaskedAveraging
from fedpipe.common.payload import DeferredVector
from fedpipe.common.regularizers.base import Regularizer
from fedpipe.common.regularizers.fedprox import FedProxRegularizer
from fedpipe.common.summable import Summable
from fedpipe.common.vector import ArraySpec, Vector

__all__ = ["StagedStart", "why_start_in_memory"]

#: The ``prepare`` methods that work element by element (a multiplication by the client's
#: weight, a sign), so that preparing each chunk gives the chunks of the prepared update. A
#: subclass that overrides ``prepare`` is not among them.
ELEMENTWISE_PREPARES = {
    AveragingAggregator.prepare,
    SumAggregator.prepare,
    BufferedAggregator.prepare,
    GradientMaskedAveraging.prepare,
}

#: The regularizers' ``on_round_start`` that keep no reference to the start weights (FedProx
#: copies them): they may be given the model's live arrays.
COPYING_ROUND_STARTS = {Regularizer.on_round_start, FedProxRegularizer.on_round_start}


def why_start_in_memory(
    aggregator: Aggregator, regularizers: Sequence[Regularizer], backend: str
) -> str | None:
    """Why a round's start weights must stay in memory with this aggregator, these
    regularizers and a model on ``backend``; None where they may wait on disk."""
    if backend != "numpy":
        return f"the model's weights are {backend} arrays, not numpy arrays"
    if getattr(type(aggregator), "prepare", None) not in ELEMENTWISE_PREPARES:
        return f"aggregator {aggregator.name!r} prepares the whole update at once"
    for regularizer in regularizers:
        if getattr(type(regularizer), "on_round_start", None) not in COPYING_ROUND_STARTS:
            return f"regularizer {regularizer.name!r} may keep the start weights"
    return None


class StagedStart:
    """The arrays ``weights`` (C-contiguous numpy arrays) written to an unlinked temporary
    file in ``directory`` (``None``, or a folder that is not there: the system's temporary
    folder). Closed when dropped; a failed write leaves no file (it never had a name)."""

    def __init__(
        self, weights: Mapping[str, np.ndarray], directory: str | Path | None = None
    ) -> None:
        there = directory is not None and os.path.isdir(directory)
        self._file = tempfile.TemporaryFile(dir=directory if there else None)
        self.specs: dict[str, ArraySpec] = {}
        self._start: dict[str, int] = {}
        offset = 0
        try:
            for name, array in weights.items():
                flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
                data = memoryview(flat)  # type: ignore[arg-type]
                self.specs[name] = ArraySpec(array.shape, array.dtype.name)
                self._start[name] = offset
                for at in range(0, len(data), 64 << 20):
                    part = data[at : at + (64 << 20)]
                    if os.pwrite(self._file.fileno(), part, offset + at) != len(part):
                        raise OSError(f"array {name!r}: short write to the start file")
                offset += len(data)
        except BaseException:
            self.close()
            raise
        self._dtypes = {n: np.dtype(w.dtype) for n, w in weights.items()}

    def values(self, name: str, start: int, stop: int) -> np.ndarray:
        """The flat elements ``[start, stop)`` of array ``name``, read back (a new array)."""
        dtype = self._dtypes[name]
        out = np.empty(stop - start, dtype)
        view = memoryview(out.view(np.uint8))  # type: ignore[arg-type]
        read = os.preadv(self._file.fileno(), [view], self._start[name] + start * dtype.itemsize)
        if read != view.nbytes:
            raise OSError(f"array {name!r}: read {read} of {view.nbytes} bytes back")
        return out

    def prepared(
        self,
        end: Mapping[str, np.ndarray],
        aggregator: Aggregator,
        n_samples: int,
        n_steps: int,
    ) -> tuple[Summable, dict[str, DeferredVector]]:
        """The partial ``aggregator.prepare(start - end)``: its numbers, with empty Vectors
        where its Vector fields go (the fields' order kept), and those fields as
        :class:`DeferredVector`s whose chunks are computed from this file and ``end`` (the
        model's arrays: they must not change until the reply is sent)."""
        empty = Vector.of_numpy({n: np.empty(0, d) for n, d in self._dtypes.items()})
        probe = aggregator.prepare(empty, n_samples=n_samples, n_steps=n_steps)
        flat = {n: a.reshape(-1) for n, a in end.items()}

        def field(key: str) -> DeferredVector:
            kinds = probe.vector(key).coefs

            def values(name: str, start: int, stop: int) -> np.ndarray:
                update = self.values(name, start, stop)
                np.subtract(update, flat[name][start:stop], out=update)  # start - end
                chunk = Vector.of_numpy({name: update})
                part = aggregator.prepare(chunk, n_samples=n_samples, n_steps=n_steps)
                return np.asarray(part.vector(key).coefs[name])

            specs = {n: ArraySpec(s.shape, kinds[n].dtype.name) for n, s in self.specs.items()}
            return DeferredVector(specs, values)

        deferred = {k: field(k) for k, v in probe.fields.items() if isinstance(v, Vector)}
        return probe, deferred

    def close(self) -> None:
        """Drop the file (idempotent)."""
        self._file.close()
