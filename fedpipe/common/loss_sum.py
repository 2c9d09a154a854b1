"""A round's training loss, summed over its batches without waiting for a device at each."""

from __future__ import annotations

import math
from typing import Any, SupportsFloat

from fedpipe.common.backends import is_array, ops_of

__all__ = ["LossSum"]

#: Batch losses held on a device before they are read (one read per this many batches).
CHUNK = 1024


class LossSum:
    """``sum(loss_i * n_i)`` over a round's batches, in float64 and in batch order (a left
    fold): the same bits whatever the model. A batch loss is a float, or a 0-d array left on
    a device (a torch model's): those are kept there and read in one copy per :data:`CHUNK`
    batches (once per round for most clients), since each read makes the host wait for the
    device, and a copy per batch would at every step."""

    def __init__(self) -> None:
        self._total = 0.0
        self._held: list[Any] = []
        self._sizes: list[int] = []

    def add(self, loss: SupportsFloat, n: int) -> None:
        """Add batch loss ``loss`` (a mean: a number, or an array holding one) of ``n``
        samples."""
        if not is_array(loss):
            self._read()
            self._total += float(loss) * n
            return
        shape = tuple(getattr(loss, "shape", ()))  # known without reading the device
        if math.prod(shape) != 1:
            raise ValueError(f"batch loss of shape {shape}; expected one number")
        self._held.append(loss)
        self._sizes.append(n)
        if len(self._held) >= CHUNK:
            self._read()

    def value(self) -> float:
        """The sum so far (reads the losses held on a device)."""
        self._read()
        return self._total

    def _read(self) -> None:
        if not self._held:
            return
        ops = ops_of(self._held[0])
        held = ops.stack(self._held)  # shape [k] or [k, 1, ...]: one number per batch
        values = ops.to_numpy(held).reshape(-1).tolist()  # one copy from the device
        total = self._total
        for value, n in zip(values, self._sizes, strict=True):
            total += value * n
        self._total = total
        self._held, self._sizes = [], []
