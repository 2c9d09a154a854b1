"""The torch backend of :class:`~fedpipe.common.vector.Vector` (tensors on any device).

Needs the ``torch`` extra. Every operation keeps tensors on their device; reductions
accumulate in float64 like the numpy backend's and return Python floats, so results agree
with numpy's on CPU (float64 to ~1e-15, float32 to one rounding). Noise is drawn from the
caller's numpy generator on the host and copied to the device, so a seeded pipeline draws the
same noise on either backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np
import torch

from fedpipe.common.half import BFLOAT16, missing_bfloat16

__all__ = ["TorchOps", "numpy_dtype", "torch_dtype"]

_NUMPY_OF_TORCH: dict[torch.dtype, Any] = {
    torch.bool: np.bool_,
    torch.uint8: np.uint8,
    torch.int8: np.int8,
    torch.int16: np.int16,
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.float16: np.float16,
    torch.float32: np.float32,
    torch.float64: np.float64,
}
if BFLOAT16 is not None:
    _NUMPY_OF_TORCH[torch.bfloat16] = BFLOAT16


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype of a torch dtype (``TypeError`` for one numpy does not have)."""
    try:
        return np.dtype(_NUMPY_OF_TORCH[dtype])
    except KeyError:
        why = missing_bfloat16() if dtype == torch.bfloat16 else ""
        raise TypeError(why or f"torch dtype {dtype} has no numpy equivalent") from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a dtype name (``"float32"``, ``"bfloat16"``...)."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name!r} is not a torch dtype")
    return dtype


@cache
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_COMMUTATIVE = (torch.add, torch.mul)
_FULL_FLOATS = (torch.float32, torch.float64)


def _scalar(value: float | int, like: torch.Tensor) -> torch.Tensor:
    dtype = torch.float64 if isinstance(value, float) else torch.int64
    return torch.tensor(value, dtype=dtype, device=like.device)


def _one_device(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two tensors on one device, as a numpy array meeting a tensor goes to the tensor's
    device: a host tensor (module state restored on the CPU, say) follows the accelerator's."""
    if left.device.type == "cpu":
        return left.to(right.device), right
    return left, right.to(left.device)


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    # torch refuses to share read-only memory (decoded payloads are read-only views)
    array = array if array.flags.writeable else array.copy()
    if BFLOAT16 is not None and array.dtype == BFLOAT16:  # torch has no ml_dtypes bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)  # same bits, no copy
    return torch.from_numpy(array)


class TorchOps:
    """Vector operations on torch tensors."""

    name = "torch"
    add, subtract, multiply, true_divide = torch.add, torch.sub, torch.mul, torch.true_divide
    power, minimum, maximum = torch.pow, torch.minimum, torch.maximum
    negative, sqrt, abs, sign, square = torch.neg, torch.sqrt, torch.abs, torch.sign, torch.square
    zeros_like, copy = torch.zeros_like, torch.clone

    def dtype_name(self, array: torch.Tensor) -> str:
        return _dtype_name(array.dtype)

    def numel(self, array: torch.Tensor) -> int:
        return array.numel()

    def nbytes(self, array: torch.Tensor) -> int:
        return array.numel() * array.element_size()

    def full_like(self, array: torch.Tensor, value: float) -> torch.Tensor:
        return torch.full_like(array, value)

    def binary_arrays(self, op: Any, left: Any, right: Any) -> torch.Tensor:
        # Some torch functions take no Python scalar in some positions: such a scalar becomes
        # a 0-d tensor, which type promotion treats like numpy's "weak" Python scalars. On a
        # GPU making it is a host-to-device copy, which waits for the device: a scalar times
        # (or plus) a float32 or float64 array, a module's every step, swaps sides instead
        # (the same bits; a half-precision array would see the scalar unrounded).
        if not isinstance(left, torch.Tensor):
            if op in _COMMUTATIVE and right.dtype in _FULL_FLOATS:
                return op(right, left)
            left = _scalar(left, right)
        elif not isinstance(right, torch.Tensor):
            if op in (torch.minimum, torch.maximum):
                right = _scalar(right, left)
        elif left.device != right.device:
            left, right = _one_device(left, right)
        return op(left, right)

    def keep_dtype(self, result: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return result if result.dtype == like.dtype else result.to(like.dtype)

    def writable(self, array: torch.Tensor) -> bool:
        return True

    def add_all_(self, arrays: list[torch.Tensor], others: list[torch.Tensor]) -> None:
        # one multi-tensor kernel for every array on a GPU, not one launch per array; under
        # torch.func.vmap (which has no rule for _foreach ops) one by one
        try:
            torch._foreach_add_(arrays, others)
        except RuntimeError:
            for array, other in zip(arrays, others, strict=True):
                array.add_(other)

    def sub_all_(self, arrays: list[torch.Tensor], others: list[torch.Tensor]) -> None:
        try:  # as add_all_
            torch._foreach_sub_(arrays, others)
        except RuntimeError:
            for array, other in zip(arrays, others, strict=True):
                array.sub_(other)

    def is_float(self, array: torch.Tensor) -> bool:
        return array.is_floating_point() or array.is_complex()

    def cast(self, array: torch.Tensor, dtype: str) -> torch.Tensor:
        return array.to(torch_dtype(dtype))

    def mul_all_(self, arrays: list[torch.Tensor], factor: float) -> None:
        try:
            torch._foreach_mul_(arrays, factor)
        except RuntimeError:  # under vmap, as above
            for array in arrays:
                array.mul_(factor)

    def assign(self, array: torch.Tensor, value: torch.Tensor) -> None:
        array.copy_(value)

    def sum64(self, array: torch.Tensor) -> float:
        return float(torch.sum(array, dtype=torch.float64))

    def dot64(self, left: torch.Tensor, right: torch.Tensor) -> float:
        return float(torch.dot(left.reshape(-1).double(), right.reshape(-1).double()))

    def norm64(self, array: torch.Tensor) -> float:
        return float(torch.linalg.vector_norm(array, dtype=torch.float64))

    def all_finite(self, array: torch.Tensor) -> bool:
        return bool(torch.isfinite(array).all())

    def flat(self, array: torch.Tensor) -> torch.Tensor:
        return array.reshape(-1)

    def allclose(self, left: torch.Tensor, right: Any, rtol: float, atol: float) -> bool:
        right = self.asarray(right, left)
        if left.dtype != right.dtype:
            return False
        return bool(torch.allclose(left, right, rtol=rtol, atol=atol, equal_nan=True))

    def array_equal(self, left: torch.Tensor, right: Any) -> bool:
        right = self.asarray(right, left)
        if left.shape != right.shape or left.dtype != right.dtype:
            return False
        same = left == right
        if self.is_float(left):
            same |= torch.isnan(left) & torch.isnan(right)
        return bool(same.all())

    def asarray(self, value: Any, like: torch.Tensor) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            value = _from_numpy(np.asarray(value))
        return value.to(like.device, non_blocking=False)

    def to_numpy(self, array: torch.Tensor) -> np.ndarray:
        dtype = numpy_dtype(array.dtype)  # TypeError for torch-only dtypes
        host = array.detach().cpu()
        if array.dtype == torch.bfloat16:  # the same 16-bit words, never through float32
            return host.view(torch.int16).numpy().view(dtype)
        return host.numpy()

    def stack(self, arrays: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(arrays)

    def clip_norm(
        self, arrays: dict[str, torch.Tensor], max_norm: float, per_array: bool
    ) -> dict[str, torch.Tensor]:
        # max_norm / 0 is inf, clamped to 1: a zero array is left as it is
        norms = {n: torch.linalg.vector_norm(a, dtype=torch.float64) for n, a in arrays.items()}
        if per_array:
            factors = {n: torch.clamp(max_norm / v, max=1.0) for n, v in norms.items()}
        else:
            total = torch.sqrt(sum(v * v for v in norms.values()))  # type: ignore[arg-type]
            factors = dict.fromkeys(arrays, torch.clamp(max_norm / total, max=1.0))
        return {n: a * factors[n].to(a.dtype) for n, a in arrays.items()}

    def normal_like(self, array: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if array.dtype in (torch.float32, torch.float64):
            draw = rng.standard_normal(tuple(array.shape), dtype=numpy_dtype(array.dtype))
            return torch.from_numpy(draw).to(array.device)
        draw = rng.standard_normal(tuple(array.shape))
        return torch.from_numpy(draw).to(device=array.device, dtype=array.dtype)

    def scale_rows_(self, stacked: torch.Tensor, factors: Sequence[float]) -> None:
        # The kernels of a client's own Vector.mul_ (a Python scalar, no host-to-device copy):
        # the same bits as its prepare, half precision included (torch.mul_ by a scalar
        # rounds a bfloat16 product differently from _foreach_mul_ on a CPU).
        if len(set(factors)) == 1:  # one weight for all (clients of one size)
            self.mul_all_([stacked], factors[0])
            return
        torch._foreach_mul_(list(stacked.unbind(0)), list(factors))

    def finite_rows(self, stacked: torch.Tensor) -> np.ndarray:
        return torch.isfinite(stacked.reshape(len(stacked), -1)).all(dim=1).cpu().numpy()

    def sum_rows(self, stacked: torch.Tensor, start: torch.Tensor | None) -> torch.Tensor:
        # One reduction kernel over the client axis (a row-by-row left fold would launch one
        # kernel per client): the same sum as the one-by-one fold to float rounding.
        wide = torch.float32 if stacked.is_floating_point() and stacked.element_size() < 4 else None
        total = stacked.sum(dim=0, dtype=wide)
        return total if start is None else total.add_(start)
