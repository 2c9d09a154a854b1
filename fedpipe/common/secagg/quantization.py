"""Fixed-point encoding of updates into the ring of integers modulo ``2**bits``, where masks
cancel (Bonawitz et al., 2017, §3: inputs are vectors over Z_R).

Each value is clipped to ``[-clip, clip]`` and mapped to ``q = round((x + clip) * scale)``, an
integer in ``[0, levels]`` with ``levels = (2**bits - 1) // clients``: the sum of the inputs
of every client of the session stays below ``2**bits``, so it never wraps around, and
``sum_q / scale - count * clip`` decodes the sum of ``count`` inputs.

Error bound: for inputs within ``[-clip, clip]`` each element of the decoded sum of ``count``
inputs is within :meth:`FixedPoint.error_bound` of the exact sum, that is ``count`` times half
a quantization step (``clip / levels``), plus float64 rounding (the ``2**-51`` and ``2**-50``
terms). Values beyond ``clip`` are clipped first, an error the bound does not cover: choose
``clip`` to bound the updates (for instance the clipping norm of client-level DP).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from fedpipe.common.vector import ArraySpec, Vector, VectorSpecs

__all__ = ["MAX_BITS", "MIN_BITS", "FixedPoint"]

logger = logging.getLogger(__name__)

MIN_BITS = 8
#: Above 48 bits the float64 encoding, not the quantization step, would bound the error.
MAX_BITS = 48


@dataclass(frozen=True)
class FixedPoint:
    """Fixed-point encoding of ``clients`` summed inputs in ``[-clip, clip]`` modulo
    ``2**bits``; see the module docstring for the error bound."""

    bits: int
    clip: float
    clients: int

    def __post_init__(self) -> None:
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits: {self.bits}, expected an integer in [{MIN_BITS}, {MAX_BITS}]")
        if not (np.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip: {self.clip}, expected a finite number > 0")
        if self.clients < 1 or self.levels < 2:
            raise ValueError(
                f"clients: {self.clients}, expected 1 <= clients <= {(2**self.bits - 1) // 2} "
                f"for {self.bits} bits (each client needs at least 2 levels of headroom)"
            )

    @property
    def dtype(self) -> np.dtype:
        """The unsigned words that hold ring elements: uint32 up to 32 bits, else uint64."""
        return np.dtype(np.uint32 if self.bits <= 32 else np.uint64)

    @property
    def levels(self) -> int:
        return (2**self.bits - 1) // self.clients

    @property
    def scale(self) -> float:
        return self.levels / (2 * self.clip)

    def error_bound(self, count: int) -> float:
        """Largest absolute error of one element of the decoded sum of ``count`` inputs
        within ``[-clip, clip]``."""
        return count * ((0.5 + self.levels * 2.0**-51) / self.scale + self.clip * 2.0**-50)

    def ring_specs(self, specs: VectorSpecs) -> VectorSpecs:
        """The specs of the encoded (and masked) arrays of a Vector of ``specs``."""
        return {n: ArraySpec(s.shape, self.dtype.name) for n, s in specs.items()}

    def encode(self, vector: Vector) -> Vector:
        """``vector`` (any backend) as ring elements, clipped to ``[-clip, clip]`` first."""
        out, clipped = {}, 0
        for name, array in vector.to_numpy().coefs.items():
            values = np.asarray(array, dtype=np.float64)
            if not np.isfinite(values).all():
                raise ValueError(f"array {name!r}: not finite, cannot be encoded")
            clipped += int(np.count_nonzero(np.abs(values) > self.clip))
            shifted = (np.clip(values, -self.clip, self.clip) + self.clip) * self.scale
            out[name] = np.rint(shifted).astype(self.dtype)
        if clipped:
            logger.warning(
                "secure aggregation clipped %d of %d values to [-%g, %g]: the sum is biased",
                clipped,
                vector.size,
                self.clip,
                self.clip,
            )
        return Vector(out)

    def decode(self, total: Vector, count: int) -> Vector:
        """The sum of ``count`` inputs (float64 arrays) from the sum of their encodings,
        reduced modulo ``2**bits``."""
        offset = count * self.clip
        return total.apply(lambda a: np.asarray(a, dtype=np.float64) / self.scale - offset)
