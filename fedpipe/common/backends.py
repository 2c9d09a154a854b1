"""Array backends of :class:`~fedpipe.common.vector.Vector`: numpy (core) and torch (extra).

A backend is the handful of array operations a Vector needs (element-wise arithmetic,
in-place accumulation, float64 reductions, host transfers). Module, regularizer and
aggregator code only calls Vector methods, so it runs unchanged on either backend, on any
torch device.

Why two small hand-written backends rather than the array API standard
(``array-api-compat``): a Vector needs about twenty operations, several of them outside the
standard (in-place ``out=`` accumulation, float64-accumulated norms without a model-sized
copy, pinned host transfers); the namespace lookup per operation cost measurable time in
simulations with thousands of small clients; and fedpipe's core stays numpy-only — torch is
imported only when a torch tensor is seen.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any, Protocol, cast

import numpy as np

from fedpipe.common.half import is_float_dtype, numpy_dtype

__all__ = ["NUMPY", "ArrayOps", "is_array", "ops_of", "torch_ops"]


class ArrayOps(Protocol):
    """Operations on the arrays of one backend (:data:`NUMPY`, :func:`torch_ops`)."""

    name: str
    add: Callable[[Any, Any], Any]
    subtract: Callable[[Any, Any], Any]
    multiply: Callable[[Any, Any], Any]
    true_divide: Callable[[Any, Any], Any]
    power: Callable[[Any, Any], Any]
    minimum: Callable[[Any, Any], Any]
    maximum: Callable[[Any, Any], Any]
    negative: Callable[[Any], Any]
    sqrt: Callable[[Any], Any]
    abs: Callable[[Any], Any]
    sign: Callable[[Any], Any]
    square: Callable[[Any], Any]
    zeros_like: Callable[[Any], Any]
    copy: Callable[[Any], Any]

    def dtype_name(self, array: Any) -> str: ...
    def numel(self, array: Any) -> int: ...
    def nbytes(self, array: Any) -> int: ...
    def full_like(self, array: Any, value: float) -> Any: ...
    def binary_arrays(self, op: Any, left: Any, right: Any) -> Any: ...
    def keep_dtype(self, result: Any, like: Any) -> Any: ...
    def writable(self, array: Any) -> bool: ...
    def add_all_(self, arrays: list[Any], others: list[Any]) -> None: ...
    def sub_all_(self, arrays: list[Any], others: list[Any]) -> None: ...
    def is_float(self, array: Any) -> bool: ...
    def cast(self, array: Any, dtype: str) -> Any: ...
    def mul_all_(self, arrays: list[Any], factor: float) -> None: ...
    def assign(self, array: Any, value: Any) -> None: ...
    def sum64(self, array: Any) -> float: ...
    def dot64(self, left: Any, right: Any) -> float: ...
    def norm64(self, array: Any) -> float: ...
    def all_finite(self, array: Any) -> bool: ...
    def flat(self, array: Any) -> Any: ...
    def allclose(self, left: Any, right: Any, rtol: float, atol: float) -> bool: ...
    def array_equal(self, left: Any, right: Any) -> bool: ...

    def asarray(self, value: Any, like: Any) -> Any:
        """``value`` (any backend's array) on this backend, on ``like``'s device."""
        ...

    def to_numpy(self, array: Any) -> np.ndarray: ...
    def stack(self, arrays: list[Any]) -> Any: ...
    def clip_norm(self, arrays: dict[str, Any], max_norm: float, per_array: bool) -> dict: ...
    def normal_like(self, array: Any, rng: np.random.Generator) -> Any: ...

    # ---- stacked arrays: a leading client axis, one row per client ----------------------------

    def scale_rows_(self, stacked: Any, factors: Sequence[float]) -> None:
        """Row ``k`` times ``factors[k]``, in place."""
        ...

    def finite_rows(self, stacked: Any) -> np.ndarray:
        """Whether each row holds only finite values (host booleans)."""
        ...

    def sum_rows(self, stacked: Any, start: Any | None) -> Any:
        """``start`` (or zero) plus every row, in float32 for half precision (``stacked`` may
        be overwritten)."""
        ...


class _NumpyOps:
    name = "numpy"
    add, subtract, multiply, true_divide = np.add, np.subtract, np.multiply, np.true_divide
    power, minimum, maximum = np.power, np.minimum, np.maximum
    negative, sqrt, abs, sign, square = np.negative, np.sqrt, np.abs, np.sign, np.square
    zeros_like, copy = staticmethod(np.zeros_like), staticmethod(np.array)

    def dtype_name(self, array: np.ndarray) -> str:
        return _numpy_dtype_name(array.dtype)

    def numel(self, array: np.ndarray) -> int:
        return int(array.size)

    def nbytes(self, array: np.ndarray) -> int:
        return int(array.nbytes)

    def binary_arrays(self, op: Any, left: Any, right: Any) -> np.ndarray:
        return op(left, right)  # type: ignore[no-any-return]

    def full_like(self, array: np.ndarray, value: float) -> np.ndarray:
        return np.full_like(array, value)

    def keep_dtype(self, result: np.ndarray, like: np.ndarray) -> np.ndarray:
        return result if result.dtype == like.dtype else result.astype(like.dtype, copy=False)

    def writable(self, array: np.ndarray) -> bool:
        return bool(array.flags.writeable)

    def add_all_(self, arrays: list[np.ndarray], others: list[np.ndarray]) -> None:
        for array, other in zip(arrays, others, strict=True):
            np.add(array, other, out=array)

    def sub_all_(self, arrays: list[np.ndarray], others: list[np.ndarray]) -> None:
        for array, other in zip(arrays, others, strict=True):
            np.subtract(array, other, out=array)

    def is_float(self, array: np.ndarray) -> bool:
        return is_float_dtype(array.dtype)

    def cast(self, array: np.ndarray, dtype: str) -> np.ndarray:
        return array.astype(numpy_dtype(dtype))

    def mul_all_(self, arrays: list[np.ndarray], factor: float) -> None:
        for array in arrays:
            np.multiply(array, factor, out=array)

    def assign(self, array: np.ndarray, value: np.ndarray) -> None:
        array[...] = value

    def sum64(self, array: np.ndarray) -> float:
        return float(np.sum(array, dtype=np.float64))

    def dot64(self, left: np.ndarray, right: np.ndarray) -> float:
        return float(np.dot(left.ravel().astype(np.float64), right.ravel()))

    def norm64(self, array: np.ndarray) -> float:
        return float(np.linalg.norm(array.ravel().astype(np.float64)))

    def all_finite(self, array: np.ndarray) -> bool:
        return bool(np.isfinite(array).all())

    def flat(self, array: np.ndarray) -> np.ndarray:
        return array.reshape(-1)

    def allclose(self, left: np.ndarray, right: Any, rtol: float, atol: float) -> bool:
        return bool(np.allclose(left, right, rtol=rtol, atol=atol, equal_nan=True))

    def array_equal(self, left: np.ndarray, right: Any) -> bool:
        return bool(np.array_equal(left, right, equal_nan=True))

    def asarray(self, value: Any, like: np.ndarray) -> np.ndarray:
        return value if isinstance(value, np.ndarray) else ops_of(value).to_numpy(value)

    def to_numpy(self, array: np.ndarray) -> np.ndarray:
        return array

    def stack(self, arrays: list[np.ndarray]) -> np.ndarray:
        return np.stack(arrays)

    def clip_norm(
        self, arrays: dict[str, np.ndarray], max_norm: float, per_array: bool
    ) -> dict[str, np.ndarray]:
        norms = {n: self.norm64(a) for n, a in arrays.items()}
        if per_array:
            factors = {n: min(1.0, max_norm / v) if v > 0 else 1.0 for n, v in norms.items()}
        else:
            total = float(np.sqrt(sum(v * v for v in norms.values())))
            factors = dict.fromkeys(arrays, max_norm / total if total > max_norm else 1.0)
        return {n: self.keep_dtype(a * factors[n], a) for n, a in arrays.items()}

    def normal_like(self, array: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if array.dtype in (np.float32, np.float64):
            return rng.standard_normal(array.shape, dtype=array.dtype)
        return rng.standard_normal(array.shape).astype(array.dtype)

    def scale_rows_(self, stacked: np.ndarray, factors: Sequence[float]) -> None:
        column = np.array(factors, dtype=stacked.dtype).reshape(-1, *[1] * (stacked.ndim - 1))
        np.multiply(stacked, column, out=stacked)

    def finite_rows(self, stacked: np.ndarray) -> np.ndarray:
        return np.isfinite(stacked.reshape(len(stacked), -1)).all(axis=1)

    def sum_rows(self, stacked: np.ndarray, start: np.ndarray | None) -> np.ndarray:
        # One row added after the other, as the one-by-one fold adds replies: bit-equal to it
        # (np.add.accumulate is a left fold whatever the shapes; np.add.reduce sums pairwise
        # along a contiguous axis).
        if is_float_dtype(stacked.dtype) and stacked.dtype.itemsize < 4:
            stacked = stacked.astype(np.float32)
        if start is not None:
            stacked[0] = start + stacked[0]  # a + b == b + a, bit for bit
        return np.add.accumulate(stacked, axis=0, out=stacked)[-1].copy()


@cache
def _numpy_dtype_name(dtype: np.dtype) -> str:
    # numpy builds ``dtype.name`` in Python on every access: a hot spot of spec checks
    return dtype.name


#: The numpy backend (the core's only one).
NUMPY = cast(ArrayOps, _NumpyOps())  # a structural match mypy cannot see through ufuncs


def ops_of(array: Any) -> ArrayOps:
    """The backend of ``array``: numpy for numpy arrays, torch for torch tensors."""
    if isinstance(array, np.ndarray):
        return NUMPY
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(array, torch.Tensor):
        return torch_ops()
    raise TypeError(f"expected a numpy array or a torch tensor, got {type(array).__name__}")


def is_array(value: Any) -> bool:
    """True for a numpy array or a torch tensor (torch is not imported to find out)."""
    if isinstance(value, np.ndarray):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


@cache
def torch_ops() -> ArrayOps:
    """The torch backend (imports torch; needs the ``torch`` extra)."""
    from fedpipe.common.torch_backend import TorchOps

    return cast(ArrayOps, TorchOps())
