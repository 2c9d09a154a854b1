"""Host memory that device tensors cross on their way to the wire, and back, once per round.

A GPU client's update leaves the device once per round: each tensor is copied (asynchronously)
into one host buffer, the copies are waited for once, and the payload's chunk frames slice that
buffer's numpy views directly (no second host copy). Incoming weights take the way back: into
the buffer, then one asynchronous copy per tensor to the device, then one wait. The buffer is
page-locked (``pin_memory``) when CUDA is available, which is what lets those copies run
asynchronously at full bus speed, and it is reused from round to round: pinning is slow, so it
happens once (twice if the first round's payload outgrows a first guess).

Numpy arrays and CPU tensors never go through the buffer: a CPU tensor's ``.numpy()`` shares its
memory, so the CPU path stays zero-copy. Torch is imported only when a device tensor is seen.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedpipe.common.backends import torch_ops
from fedpipe.common.vector import Vector

__all__ = ["HostStaging"]

#: Offsets of the tensors in the buffer are multiples of this (any dtype view is aligned).
ALIGN = 64


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class HostStaging:
    """One reusable host buffer for device <-> host transfers.

    Each transfer starts with :meth:`begin`, which lets it reuse the memory the previous one
    was given: finish with a transfer's host arrays (send the payload) before the next begins.
    Use one instance per direction (the client daemon's for updates, the model's for weights).

    Parameters
    ----------
    pin:
        Page-lock the buffer; default: when CUDA is available.
    """

    def __init__(self, pin: bool | None = None) -> None:
        self._pin = pin
        self._buffer: Any = None  # a flat uint8 torch tensor, allocated on first use
        self._used = 0
        self.allocations = 0  # how many buffers were allocated (tests, diagnostics)
        self.host_copies = 0  # arrays copied into the buffer by to_device (tests, diagnostics)

    @property
    def capacity(self) -> int:
        return 0 if self._buffer is None else int(self._buffer.numel())

    @property
    def pinned(self) -> bool:
        return self._buffer is not None and bool(self._buffer.is_pinned())

    def begin(self) -> None:
        """Start a transfer: the memory handed out so far may be overwritten from now on."""
        if self._used > self.capacity:  # the last transfer overflowed: grow once, to its size
            self._buffer = self._allocate(self._used)
        self._used = 0

    def to_host(self, vector: Vector) -> Vector:
        """``vector`` as numpy arrays: the same memory for numpy arrays and CPU tensors, one
        copy into the buffer for tensors on a device."""
        if vector.backend == "numpy" or vector.device == "cpu":
            return vector.to_numpy()
        return self.stage(vector)

    def stage(self, vector: Vector) -> Vector:
        """Copy ``vector``'s tensors into the buffer (one wait for all) and return numpy views
        of the copies, valid until the next :meth:`begin`."""
        import torch

        slots = self._slots(vector.coefs)
        with torch.no_grad():
            for name, tensor in vector.coefs.items():
                slots[name].copy_(tensor, non_blocking=True)
        _wait(vector.device)
        to_numpy = torch_ops().to_numpy
        return Vector({name: to_numpy(slot) for name, slot in slots.items()})

    def landing(self, targets: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
        """Host arrays to receive the next :meth:`to_device` of ``targets``' values into (device
        tensors, in that order): numpy views of the buffer, which that call then copies to the
        device without a host copy. Valid until the next :meth:`begin` (which
        :meth:`to_device` calls: it finds the same memory). None when a dtype has no numpy
        form or a target is on the CPU (CPU tensors are received into their own memory)."""
        if any(t.device.type == "cpu" for t in targets.values()):
            return None
        self.begin()
        slots = self._slots(targets)
        try:
            return {name: torch_ops().to_numpy(slot) for name, slot in slots.items()}
        except TypeError:  # a torch-only dtype
            return None

    def to_device(self, arrays: Mapping[str, np.ndarray], targets: Mapping[str, Any]) -> None:
        """Copy host ``arrays`` into the torch tensors ``targets`` (same names, shapes, dtypes):
        straight in for CPU tensors, through the buffer (one wait for all) for device tensors;
        arrays given by :meth:`landing` are in the buffer already (no host copy)."""
        import torch

        self.begin()
        ops = torch_ops()
        on_device = {n: t for n, t in targets.items() if t.device.type != "cpu"}
        slots = self._slots(on_device)
        with torch.no_grad():
            for name, target in targets.items():
                if name not in slots:
                    _copy_to_cpu_tensor(target, arrays[name])
                    continue
                if not _same_memory(arrays[name], slots[name]):
                    np.copyto(ops.to_numpy(slots[name]), arrays[name])
                    self.host_copies += 1
                target.copy_(slots[name], non_blocking=True)
        for device in {str(t.device) for t in on_device.values()}:
            _wait(device)

    def _slots(self, like: Mapping[str, Any]) -> dict[str, Any]:
        """Memory for tensors like ``like``: one region at the buffer's next aligned offset."""
        if not like:
            return {}
        offsets, end = {}, 0
        for name, tensor in like.items():
            offsets[name] = end
            end = _aligned(end + tensor.numel() * tensor.element_size())
        start = self._used
        self._used = start + end
        if self._buffer is not None and self._used <= self.capacity:
            region = self._buffer[start : start + end]
        elif start == 0:  # nothing of this transfer is in the buffer yet: grow it now
            self._buffer = region = self._allocate(end)
        else:  # a one-off block; the next begin() grows the buffer to this transfer's size
            region = self._allocate(end)
        slots = {}
        for name, tensor in like.items():
            raw = region[offsets[name] : offsets[name] + tensor.numel() * tensor.element_size()]
            slots[name] = raw.view(tensor.dtype).view(tensor.shape)
        return slots

    def _allocate(self, nbytes: int) -> Any:
        import torch

        pin = torch.cuda.is_available() if self._pin is None else self._pin
        self.allocations += 1
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)


def _copy_to_cpu_tensor(target: Any, array: np.ndarray) -> None:
    ops = torch_ops()
    try:
        np.copyto(ops.to_numpy(target), array)  # the tensor's own memory: one copy
    except TypeError:  # a torch-only dtype (bfloat16): through torch
        ops.assign(target, ops.asarray(array, target))


def _same_memory(array: np.ndarray, slot: Any) -> bool:
    """Whether ``array`` is ``slot``'s memory (an array :meth:`HostStaging.landing` gave)."""
    return bool(
        array.size == 0
        or (
            array.ctypes.data == slot.data_ptr()
            and array.nbytes == slot.numel() * slot.element_size()
        )
    )


def _wait(device: str) -> None:
    """Wait for the copies queued on ``device`` (device-to-host copies may be asynchronous)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.current_stream(torch.device(device)).synchronize()
    elif device.startswith("mps"):
        torch.mps.synchronize()
