"""A client's arrays drawn in batches on a torch model's device: copied there once, indexed there.

Drawing a batch on the host (:meth:`~fedpipe.common.data.Dataset.batches`) and copying it to a
GPU makes the host wait for the device at every step (a copy from pageable memory waits for the
stream), which is what bounds a small model's training. Here a client's ``x`` and ``y`` go to
the device in one copy and stay there from round to round (least recently used out first,
within :data:`DEVICE_DATA_BYTES`), an epoch's sample order goes there in one copy, and each
batch is a gather on the device: one wait per client and epoch, none per step. The order is
drawn as ``Dataset.batches`` draws it (``rng.permutation(n)`` per epoch), so that the batches
hold the same samples in the same order.

On a CPU nothing is kept (``x`` is used in place when it already has the model's dtype). Data
larger than the budget is batched on the host, as before. Arrays are taken as they are when
first seen: a Dataset given new arrays (``data.x = ...``) is copied again, but arrays changed
in place afterwards are not seen again on a device.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from fedpipe.common.data import Dataset

__all__ = ["DEVICE_DATA_BYTES", "DeviceBatches"]

#: Bytes of client data a model object keeps on its (non-CPU) device.
DEVICE_DATA_BYTES = 1 << 30

_Tensors = tuple[torch.Tensor, torch.Tensor]
#: Where the tensors go: the device, the inputs' dtype and the targets' dtype.
_Place = tuple[torch.device, torch.dtype, torch.dtype]


class DeviceBatches:
    """Clients' data on one device, for one model's dtypes; batches drawn there.

    Parameters
    ----------
    budget:
        Bytes of data kept on a non-CPU device (and the largest client data drawn there).
    keep_on_cpu:
        Keep tensors on a CPU too (made in the model's dtypes once, not per call).
    """

    def __init__(self, budget: int = DEVICE_DATA_BYTES, keep_on_cpu: bool = False) -> None:
        self.budget, self.keep_on_cpu = budget, keep_on_cpu
        #: By the Dataset's id: its arrays (the ones copied) and their tensors on the device.
        self._kept: OrderedDict[int, tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]]
        self._kept = OrderedDict()
        self._bytes = 0

    def batches(
        self,
        data: Dataset,
        batch_size: int,
        *,
        seed: np.random.Generator,
        drop_remainder: bool,
        place: _Place,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]] | Iterator[tuple[np.ndarray, np.ndarray]]:
        """One epoch of ``data`` in shuffled batches, as tensors on ``place`` (device, inputs'
        dtype, targets' dtype); numpy batches for data over the budget."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; expected at least 1")
        if _nbytes(data, place) > self.budget:
            return data.batches(batch_size, seed=seed, drop_remainder=drop_remainder)
        return self._drawn(data, batch_size, seed, drop_remainder, place)

    def __len__(self) -> int:
        """How many clients' data are kept."""
        return len(self._kept)

    @property
    def nbytes(self) -> int:
        """Bytes of data kept on the device."""
        return self._bytes

    def clear(self) -> None:
        """Forget every client's data (the model moved, say)."""
        self._kept.clear()
        self._bytes = 0

    def _drawn(
        self,
        data: Dataset,
        batch_size: int,
        seed: np.random.Generator,
        drop_remainder: bool,
        place: _Place,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self._on_device(data, place)
        n = len(data)
        order = torch.from_numpy(seed.permutation(n)).to(place[0])  # the epoch's one copy
        stop = n - n % batch_size if drop_remainder else n
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]

    def _on_device(self, data: Dataset, place: _Place) -> _Tensors:
        """``data`` as tensors on ``place``: kept on a device, made afresh on a CPU."""
        return self.tensors([data], place)[0]

    def tensors(self, datas: Sequence[Dataset], place: _Place) -> list[_Tensors]:
        """Each of ``datas`` as tensors on ``place``, copied there once and kept (on a CPU
        only with ``keep_on_cpu``): the least recently used out past the budget, but never
        one of those asked for together here (a vectorized chunk trains on all of them)."""
        if place[0].type == "cpu" and not self.keep_on_cpu:
            return [_tensors(data, place) for data in datas]
        out = [self._kept_tensors(data, place) for data in datas]
        while self._bytes > self.budget and len(self._kept) > len(datas):
            self._drop(next(iter(self._kept)))
        return out

    def __contains__(self, data: Dataset) -> bool:
        """Whether ``data``'s current arrays are kept."""
        kept = self._kept.get(id(data))
        return kept is not None and kept[0] is data.x and kept[1] is data.y

    def _kept_tensors(self, data: Dataset, place: _Place) -> _Tensors:
        key = id(data)
        kept = self._kept.get(key)
        if kept is not None and data in self and _placed(kept[2], kept[3]) == place:
            self._kept.move_to_end(key)
            return kept[2], kept[3]
        if kept is not None:
            self._drop(key)
        x, y = _tensors(data, place)
        self._kept[key] = (data.x, data.y, x, y)  # held: another Dataset's arrays differ
        self._bytes += _bytes(x) + _bytes(y)
        return x, y

    def _drop(self, key: int) -> None:
        _, _, x, y = self._kept.pop(key)
        self._bytes -= _bytes(x) + _bytes(y)


def _tensors(data: Dataset, place: _Place) -> _Tensors:
    return _tensor(data.x, place[0], place[1]), _tensor(data.y, place[0], place[2])


def _tensor(values: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    array = np.ascontiguousarray(values)
    if not array.flags.writeable:  # torch shares no read-only memory
        array = array.copy()
    return torch.from_numpy(array).to(device, dtype)


def _placed(x: torch.Tensor, y: torch.Tensor) -> _Place:
    return x.device, x.dtype, y.dtype


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _nbytes(data: Dataset, place: _Place) -> int:
    """Bytes of ``data`` in ``place``'s dtypes."""
    return data.x.size * place[1].itemsize + data.y.size * place[2].itemsize
