"""Fixed-point encoding of updates into the ring of integers modulo ``2**bits``, where masks
cancel (Bonawitz et al., 2017, §3: inputs are vectors over Z_R).

Each value is clipped to ``[-clip, clip]`` and mapped to ``q = round((x + clip) * scale)``, an
integer in ``[0, levels]`` with ``levels = (2**bits - 1) // (clients * max_weight)``, then
multiplied by the client's integer weight ``w <= max_weight`` (its sample count, for FedAvg:
Flower's SecAgg+ does the same); ``w`` itself travels exactly, as the array
:data:`WEIGHT`. The sum over every client of the session stays below ``2**bits``, so it
never wraps around, and ``sum_q / scale - W * clip`` decodes the weighted sum, where ``W`` is
the sum of the weights (the number of inputs when every weight is 1).

Error bound: for inputs within ``[-clip, clip]`` each element of the decoded weighted sum is
within :meth:`FixedPoint.error_bound` of the exact one, that is ``W`` times half a
quantization step (``clip / levels``), plus float64 rounding (the ``2**-51`` and ``2**-50``
terms). Values beyond ``clip`` are clipped first, an error the bound does not cover: choose
``clip`` to bound the updates (for instance the clipping norm of client-level DP).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

import numpy as np

from fedpipe.common.vector import Vector

if TYPE_CHECKING:  # the encoding itself needs no cryptography
    from fedpipe.common.secagg.prg import MaskStreams

__all__ = ["MAX_BITS", "MIN_BITS", "WEIGHT", "FixedPoint"]

logger = logging.getLogger(__name__)

MIN_BITS = 8
#: Above 48 bits the float64 encoding, not the quantization step, would bound the error.
MAX_BITS = 48

#: Values converted at a time (128 KiB of float64): the chunk stays in cache through every step.
_CHUNK_VALUES = 16384

#: The name of the array that carries a client's weight in an encoded (masked) input.
WEIGHT = "secagg/weight"


@dataclass(frozen=True)
class FixedPoint:
    """Fixed-point encoding of ``clients`` summed inputs in ``[-clip, clip]``, each weighted
    by an integer in ``[1, max_weight]``, modulo ``2**bits``; see the module docstring for the
    error bound."""

    bits: int
    clip: float
    clients: int
    max_weight: int = 1

    def __post_init__(self) -> None:
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits: {self.bits}, expected an integer in [{MIN_BITS}, {MAX_BITS}]")
        if not (np.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip: {self.clip}, expected a finite number > 0")
        if self.max_weight < 1:
            raise ValueError(f"max_weight: {self.max_weight}, expected an integer >= 1")
        if self.clients < 1 or self.levels < 2:
            most = (2**self.bits - 1) // (2 * self.max_weight)
            raise ValueError(
                f"clients: {self.clients}, expected 1 <= clients <= {most} for {self.bits} "
                f"bits and max_weight {self.max_weight} (each client needs 2 levels or more)"
            )

    @property
    def dtype(self) -> np.dtype:
        """The unsigned words that hold ring elements: uint32 up to 32 bits, else uint64."""
        return np.dtype(np.uint32 if self.bits <= 32 else np.uint64)

    @property
    def levels(self) -> int:
        return (2**self.bits - 1) // (self.clients * self.max_weight)

    @property
    def scale(self) -> float:
        return self.levels / (2 * self.clip)

    def error_bound(self, total_weight: int) -> float:
        """Largest absolute error of one element of the decoded weighted sum of inputs within
        ``[-clip, clip]`` whose weights add up to ``total_weight``."""
        return total_weight * ((0.5 + self.levels * 2.0**-51) / self.scale + self.clip * 2.0**-50)

    def encode(
        self,
        vector: Vector,
        weight: int = 1,
        masks: MaskStreams | None = None,
        *,
        weighted: bool = False,
    ) -> Vector:
        """``vector`` (any backend) as ring elements, clipped to ``[-clip, clip]`` first, times
        ``weight``; the weight is the array :data:`WEIGHT`. ``weighted``: ``vector`` is the
        input already times ``weight`` (a FedAvg weighted sum), divided by it in float64 first.
        ``masks`` are folded in (laid over the arrays in sorted name order, as
        :func:`~fedpipe.common.secagg.prg.add_masks` does).

        The arrays are encoded in sorted name order, a cache-sized chunk at a time, each chunk
        masked as soon as it is encoded: the input is read from memory once. They are views of
        one buffer.
        """
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise TypeError(f"weight: {weight!r}, expected an int")
        if not 1 <= weight <= self.max_weight:
            raise ValueError(f"weight: {weight}, expected an integer in [1, {self.max_weight}]")
        if WEIGHT in vector.coefs:
            raise ValueError(f"array name {WEIGHT!r} is reserved for the weight")
        arrays = vector.to_numpy().coefs
        shapes = {WEIGHT: (1,), **{n: np.shape(a) for n, a in arrays.items()}}
        ring = np.empty(sum(math.prod(s) for s in shapes.values()), self.dtype)
        out = _laid_out(ring, shapes)
        out[WEIGHT][0] = weight
        scratch, clipped = np.empty(_CHUNK_VALUES, np.float64), 0
        for name in sorted(shapes):
            target = out[name].reshape(-1)
            source = np.ravel(arrays[name]) if name != WEIGHT else None
            for start in range(0, target.size, _CHUNK_VALUES):
                chunk = target[start : start + _CHUNK_VALUES]
                if source is not None:
                    part = source[start : start + chunk.size]
                    count = self._quantize(part, chunk, scratch, weight, weighted)
                    if count < 0:
                        _raise_not_finite(arrays)
                    clipped += count
                if masks is not None:
                    masks.fold(chunk)
        if clipped:
            logger.warning(
                "secure aggregation clipped %d of %d values to [-%g, %g]: the sum is biased",
                clipped,
                vector.size,
                self.clip,
                self.clip,
            )
        return Vector.of_numpy(out)

    def _quantize(
        self,
        source: np.ndarray,
        target: np.ndarray,
        scratch: np.ndarray,
        weight: int,
        weighted: bool,
    ) -> int:
        """``target = rint((clip(x) + clip) * scale) * weight`` for ``x`` the chunk ``source``
        in float64 (divided by ``weight`` if ``weighted``), through ``scratch``; how many values
        were clipped, or -1 if one is not finite."""
        values = scratch[: source.size]
        np.copyto(values, source, "unsafe")
        if weighted:
            values /= weight
        low, high = values.min(), values.max()  # NaN propagates through both
        if not (np.isfinite(low) and np.isfinite(high)):
            return -1
        clipped = 0
        if low < -self.clip or high > self.clip:
            clipped = int(np.count_nonzero(np.abs(values) > self.clip))
            np.clip(values, -self.clip, self.clip, out=values)
        values += self.clip
        values *= self.scale
        np.rint(values, out=values)
        # Every value is an integer in [0, levels]: below 2**(8 * itemsize - 1), the signed
        # words of the same size hold it exactly, and float64 converts to them several times
        # faster than to unsigned ones.
        signed = self.levels < 2 ** (8 * target.itemsize - 1)
        np.copyto(target.view(f"i{target.itemsize}") if signed else target, values, "unsafe")
        np.multiply(target, target.dtype.type(weight), out=target)
        return clipped

    def decode(self, total: Vector) -> tuple[Vector, int]:
        """The weighted sum of the inputs (float64 arrays) and the sum of their weights, from
        the sum of their encodings reduced modulo ``2**bits``."""
        total_weight = int(total.coefs[WEIGHT][0])
        offset = total_weight * self.clip
        return (
            Vector(
                {
                    n: np.asarray(a, dtype=np.float64) / self.scale - offset
                    for n, a in total.coefs.items()
                    if n != WEIGHT
                }
            ),
            total_weight,
        )


def _laid_out(flat: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Arrays of ``shapes`` (in that key order) that are consecutive views of ``flat`` in
    sorted name order."""
    views, start = {}, 0
    for name in sorted(shapes):
        size = math.prod(shapes[name])
        views[name] = flat[start : start + size].reshape(shapes[name])
        start += size
    return {name: views[name] for name in shapes}


def _raise_not_finite(arrays: dict[str, np.ndarray]) -> NoReturn:
    """Raise ValueError naming the first of ``arrays`` with a value not finite."""
    for name, array in arrays.items():
        if not np.isfinite(np.asarray(array, dtype=np.float64)).all():
            raise ValueError(f"array {name!r}: not finite, cannot be encoded")
    raise ValueError("a value is not finite once divided by the weight, cannot be encoded")
