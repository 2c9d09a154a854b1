"""Named collections of arrays with element-wise arithmetic.

A :class:`Vector` is what flows through optimizer modules, aggregators and the codec: model
weights, gradients, updates, optimizer states. Module code only uses the methods and operators
defined here (never ``numpy`` directly), so that another backend (torch) can subclass
:class:`Vector` without any module changing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, Self

import numpy as np

__all__ = ["ArraySpec", "SpecMismatchError", "Vector", "VectorSpecs", "dtype_name"]


#: Elements checked at a time by :meth:`Vector.is_finite` (bounds its temporary mask).
_FINITE_BLOCK = 1 << 22


@cache
def dtype_name(dtype: np.dtype) -> str:
    """``dtype.name``, cached: numpy builds that string in Python on every access, which made
    spec checks a hot spot of simulations with many small clients."""
    return dtype.name


@dataclass(frozen=True)
class ArraySpec:
    """Shape and dtype of one named array."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize


VectorSpecs = dict[str, ArraySpec]


class SpecMismatchError(ValueError):
    """Two Vectors (or a Vector and its expected specs) do not have the same names, shapes or
    dtypes."""


def describe_spec_mismatch(left: Mapping[str, ArraySpec], right: Mapping[str, ArraySpec]) -> str:
    """Say, in one sentence, the first way two spec maps differ (empty string if equal)."""
    missing = sorted(set(right) - set(left))
    extra = sorted(set(left) - set(right))
    if missing or extra:
        return f"names differ: missing {missing}, unexpected {extra}"
    for name, spec in left.items():
        other = right[name]
        if spec.shape != other.shape:
            return f"array {name!r} has shape {spec.shape}, expected {other.shape}"
        if spec.dtype != other.dtype:
            return f"array {name!r} has dtype {spec.dtype}, expected {other.dtype}"
    return ""


class Vector:
    """Named arrays (``{name: array}``) with element-wise arithmetic that preserves specs.

    Parameters
    ----------
    coefs:
        Mapping of array names to numpy arrays. The arrays are not copied.

    Examples
    --------
    >>> v = Vector({"w": np.ones(3, np.float32), "b": np.zeros(1, np.float32)})
    >>> (v * 2 + 1).coefs["w"]
    array([3., 3., 3.], dtype=float32)
    """

    __slots__ = ("coefs",)
    __array_priority__ = 1000  # make ``ndarray * Vector`` defer to Vector.__rmul__

    def __init__(self, coefs: Mapping[str, Any]) -> None:
        self.coefs: dict[str, np.ndarray] = {
            name: value if isinstance(value, np.ndarray) else np.asarray(value)
            for name, value in coefs.items()
        }

    # ---- introspection -------------------------------------------------------------------

    def specs(self) -> VectorSpecs:
        """Names, shapes and dtypes of the arrays."""
        return {
            name: ArraySpec(tuple(int(d) for d in a.shape), dtype_name(a.dtype))
            for name, a in self.coefs.items()
        }

    def check_specs(self, expected: Mapping[str, ArraySpec], what: str = "vector") -> None:
        """Raise :class:`SpecMismatchError` if the specs differ from ``expected``."""
        if self.coefs.keys() == expected.keys() and all(
            a.shape == expected[n].shape and dtype_name(a.dtype) == expected[n].dtype
            for n, a in self.coefs.items()
        ):
            return  # fast path: no spec dicts built (called several times per client and round)
        problem = describe_spec_mismatch(self.specs(), expected)
        if problem:
            raise SpecMismatchError(f"{what}: {problem}")

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.coefs.values())

    @property
    def size(self) -> int:
        return sum(a.size for a in self.coefs.values())

    def __iter__(self) -> Iterator[str]:
        return iter(self.coefs)

    def __len__(self) -> int:
        return len(self.coefs)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.coefs[name]

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}: {s.dtype}{list(s.shape)}" for n, s in self.specs().items())
        return f"{type(self).__name__}({{{inner}}})"

    # ---- construction --------------------------------------------------------------------

    def _new(self, coefs: dict[str, np.ndarray]) -> Self:
        out = object.__new__(type(self))
        out.coefs = coefs
        return out

    def apply(self, func: Callable[[np.ndarray], np.ndarray]) -> Self:
        """Return a Vector of ``func(array)`` for each array (backend code only)."""
        return self._new({name: func(a) for name, a in self.coefs.items()})

    def zeros_like(self) -> Self:
        return self.apply(np.zeros_like)

    def full_like(self, value: float) -> Self:
        return self.apply(lambda a: np.full_like(a, value))

    def copy(self) -> Self:
        return self.apply(np.array)

    @classmethod
    def zeros(cls, specs: Mapping[str, ArraySpec]) -> Vector:
        return cls({n: np.zeros(s.shape, dtype=s.dtype) for n, s in specs.items()})

    # ---- element-wise arithmetic -----------------------------------------------------------

    def _binary(self, other: object, op: Callable[[Any, Any], np.ndarray], sym: str) -> Self:
        if isinstance(other, Vector):
            if self.coefs.keys() != other.coefs.keys():
                left = sorted(self.coefs.keys() - other.coefs.keys())
                right = sorted(other.coefs.keys() - self.coefs.keys())
                raise SpecMismatchError(
                    f"cannot compute Vector {sym} Vector: names differ: "
                    f"only on the left {left}, only on the right {right}"
                )
            out = {}
            for name, a in self.coefs.items():
                b = other.coefs[name]
                if a.shape != b.shape or a.dtype != b.dtype:
                    raise SpecMismatchError(
                        f"cannot compute Vector {sym} Vector: array {name!r} is "
                        f"{a.dtype.name}{list(a.shape)} on the left and "
                        f"{b.dtype.name}{list(b.shape)} on the right"
                    )
                out[name] = op(a, b)
            return self._new(out)
        if isinstance(other, (int, float, np.number)) and not isinstance(other, bool):
            scalar = float(other) if isinstance(other, np.floating) else other
            return self._new({n: _keep_dtype(op(a, scalar), a) for n, a in self.coefs.items()})
        return NotImplemented

    def __add__(self, other: object) -> Self:
        return self._binary(other, np.add, "+")

    def __radd__(self, other: object) -> Self:
        return self._binary(other, lambda a, b: np.add(b, a), "+")

    def __sub__(self, other: object) -> Self:
        return self._binary(other, np.subtract, "-")

    def __rsub__(self, other: object) -> Self:
        return self._binary(other, lambda a, b: np.subtract(b, a), "-")

    def __mul__(self, other: object) -> Self:
        return self._binary(other, np.multiply, "*")

    def __rmul__(self, other: object) -> Self:
        return self._binary(other, lambda a, b: np.multiply(b, a), "*")

    def __truediv__(self, other: object) -> Self:
        return self._binary(other, np.true_divide, "/")

    def __rtruediv__(self, other: object) -> Self:
        return self._binary(other, lambda a, b: np.true_divide(b, a), "/")

    def __pow__(self, other: object) -> Self:
        return self._binary(other, np.power, "**")

    def __neg__(self) -> Self:
        return self.apply(np.negative)

    def __pos__(self) -> Self:
        return self

    def sqrt(self) -> Self:
        return self.apply(np.sqrt)

    def abs(self) -> Self:
        return self.apply(np.abs)

    def sign(self) -> Self:
        return self.apply(np.sign)

    def square(self) -> Self:
        return self.apply(np.square)

    def minimum(self, other: Vector | float) -> Self:
        return self._binary(other, np.minimum, "minimum")

    def maximum(self, other: Vector | float) -> Self:
        return self._binary(other, np.maximum, "maximum")

    def scale(self, factors: Mapping[str, float]) -> Self:
        """Multiply each array by its own scalar factor (``factors[name]``)."""
        return self._new({n: _keep_dtype(a * factors[n], a) for n, a in self.coefs.items()})

    # ---- in-place accumulation (aggregation hot path) ----------------------------------------

    def add_(self, other: Vector, alpha: float = 1.0) -> Self:
        """In place: ``self += alpha * other``. Used to keep one running sum when aggregating."""
        if self.coefs.keys() != other.coefs.keys() or any(
            a.shape != other.coefs[n].shape or a.dtype != other.coefs[n].dtype
            for n, a in self.coefs.items()
        ):
            self.check_specs(other.specs(), "in-place addition")  # raises, saying what differs
        for name, a in self.coefs.items():
            if not a.flags.writeable:
                a = self.coefs[name] = a.copy()
            if alpha == 1.0:
                np.add(a, other.coefs[name], out=a)
            else:
                a += _keep_dtype(other.coefs[name] * alpha, a)
        return self

    def mul_(self, factor: float) -> Self:
        """In place: ``self *= factor`` (dtypes kept). Finalizes an aggregate without a copy."""
        for name, a in self.coefs.items():
            if not a.flags.writeable:
                a = self.coefs[name] = a.copy()
            if a.dtype.kind in "fc":
                np.multiply(a, factor, out=a)
            else:
                a[...] = _keep_dtype(a * factor, a)
        return self

    # ---- reductions ----------------------------------------------------------------------------

    def sum(self) -> float:
        """Sum of every element of every array."""
        return float(sum(float(np.sum(a, dtype=np.float64)) for a in self.coefs.values()))

    def dot(self, other: Vector) -> float:
        """Inner product over all arrays."""
        self.check_specs(other.specs(), "dot product")
        return float(
            sum(
                float(np.dot(a.ravel().astype(np.float64), other.coefs[n].ravel()))
                for n, a in self.coefs.items()
            )
        )

    def norms(self) -> dict[str, float]:
        """L2 norm of each array."""
        return {
            n: float(np.linalg.norm(a.ravel().astype(np.float64))) for n, a in self.coefs.items()
        }

    def norm(self) -> float:
        """Global L2 norm over all arrays."""
        return float(np.sqrt(sum(v * v for v in self.norms().values())))

    def is_finite(self) -> bool:
        """True if no array holds NaN or infinity (checked in blocks: no model-sized mask)."""
        for a in self.coefs.values():
            if a.dtype.kind not in "fc":
                continue
            flat = a.reshape(-1)
            for start in range(0, flat.size, _FINITE_BLOCK):
                if not np.isfinite(flat[start : start + _FINITE_BLOCK]).all():
                    return False
        return True

    def allclose(self, other: Vector, rtol: float = 1e-7, atol: float = 0.0) -> bool:
        """Same names and shapes, and values equal within tolerance."""
        return self.coefs.keys() == other.coefs.keys() and all(
            a.shape == other.coefs[n].shape
            and bool(np.allclose(a, other.coefs[n], rtol=rtol, atol=atol, equal_nan=True))
            for n, a in self.coefs.items()
        )

    def array_equal(self, other: Vector) -> bool:
        """Same specs and bit-identical values."""
        return self.specs() == other.specs() and all(
            np.array_equal(a, other.coefs[n], equal_nan=True) for n, a in self.coefs.items()
        )


def _keep_dtype(result: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Cast a scalar-op result back to the input's dtype (integer arrays times floats...)."""
    return result if result.dtype == like.dtype else result.astype(like.dtype, copy=False)
