"""Named collections of arrays with element-wise arithmetic.

A :class:`Vector` is what flows through optimizer modules, aggregators and the codec: model
weights, gradients, updates, optimizer states. Module code only uses the methods and operators
defined here (never ``numpy`` directly), so that they run unchanged on every array backend
(:mod:`fedpipe.common.backends`): numpy arrays, or torch tensors on any device.

A Vector's arrays all belong to one backend (and, for torch, one device). An operation between
a numpy Vector and a torch Vector gives a torch Vector on the torch side's device, so a module
state restored from a checkpoint (numpy) moves to the device at its first step; in-place
accumulation (:meth:`Vector.add_`) keeps the accumulator's backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, Self

import numpy as np

from fedpipe.common.backends import NUMPY, ArrayOps, is_array, ops_of
from fedpipe.common.half import HALF_DTYPES, accumulator_dtype, numpy_dtype

__all__ = [
    "ArraySpec",
    "SpecMismatchError",
    "Vector",
    "VectorSpecs",
    "dtype_name",
    "widened_specs",
]


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
        return math.prod(self.shape)  # exact: a hostile shape cannot overflow int64

    @property
    def nbytes(self) -> int:
        return self.size * numpy_dtype(self.dtype).itemsize

    def widened(self) -> ArraySpec:
        """This spec with a half-precision dtype's float32 accumulator (others as they are)."""
        return ArraySpec(self.shape, accumulator_dtype(self.dtype))


VectorSpecs = dict[str, ArraySpec]


def widened_specs(specs: VectorSpecs) -> VectorSpecs:
    """``specs`` with half-precision dtypes widened to float32 (:meth:`ArraySpec.widened`)."""
    return {name: spec.widened() for name, spec in specs.items()}


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
        Mapping of array names to numpy arrays or torch tensors (all of one backend and
        device); anything else is converted with ``np.asarray``. Arrays are not copied.

    Examples
    --------
    >>> v = Vector({"w": np.ones(3, np.float32), "b": np.zeros(1, np.float32)})
    >>> (v * 2 + 1).coefs["w"]
    array([3., 3., 3.], dtype=float32)
    """

    __slots__ = ("coefs", "ops")
    __array_priority__ = 1000  # make ``ndarray * Vector`` defer to Vector.__rmul__

    def __init__(self, coefs: Mapping[str, Any]) -> None:
        self.coefs: dict[str, Any] = {
            name: value if is_array(value) else np.asarray(value) for name, value in coefs.items()
        }
        self.ops: ArrayOps = _backend(self.coefs)

    @classmethod
    def of_numpy(cls, arrays: dict[str, np.ndarray]) -> Vector:
        """A Vector of numpy arrays fedpipe made itself (a built-in model's weights or
        gradients), taken as they are: the constructor's per-array type check is left out,
        which matters to simulations with thousands of small clients."""
        out = object.__new__(cls)
        out.coefs, out.ops = arrays, NUMPY
        return out

    # ---- introspection -------------------------------------------------------------------

    def specs(self) -> VectorSpecs:
        """Names, shapes and dtypes of the arrays."""
        dtype_of = self.ops.dtype_name
        return {
            name: ArraySpec(tuple(int(d) for d in a.shape), dtype_of(a))
            for name, a in self.coefs.items()
        }

    def check_specs(self, expected: Mapping[str, ArraySpec], what: str = "vector") -> None:
        """Raise :class:`SpecMismatchError` if the specs differ from ``expected``."""
        dtype_of = self.ops.dtype_name
        if self.coefs.keys() == expected.keys() and all(
            tuple(a.shape) == expected[n].shape and dtype_of(a) == expected[n].dtype
            for n, a in self.coefs.items()
        ):
            return  # fast path: no spec dicts built (called several times per client and round)
        problem = describe_spec_mismatch(self.specs(), expected)
        if problem:
            raise SpecMismatchError(f"{what}: {problem}")

    def check_accumulates(self, other: Vector, what: str = "vector") -> None:
        """Raise :class:`SpecMismatchError` unless :meth:`add_` can add ``other`` into this
        Vector: the same specs, except half-precision arrays meeting float32 arrays of their
        shape (a running sum of half-precision updates, see :meth:`widened`)."""
        own = self.specs()
        theirs = {n: own[n] if own.get(n) == s.widened() else s for n, s in other.specs().items()}
        problem = describe_spec_mismatch(theirs, own)
        if problem:
            raise SpecMismatchError(f"{what}: {problem}")

    @property
    def nbytes(self) -> int:
        return sum(map(self.ops.nbytes, self.coefs.values()))

    @property
    def size(self) -> int:
        return sum(map(self.ops.numel, self.coefs.values()))

    @property
    def backend(self) -> str:
        """``"numpy"`` or ``"torch"``."""
        return self.ops.name

    @property
    def device(self) -> str:
        """Where the arrays live: ``"cpu"`` for numpy, the tensors' device for torch."""
        first = next(iter(self.coefs.values()), None)
        return str(getattr(first, "device", "cpu"))

    def __iter__(self) -> Iterator[str]:
        return iter(self.coefs)

    def __len__(self) -> int:
        return len(self.coefs)

    def __getitem__(self, name: str) -> Any:
        return self.coefs[name]

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}: {s.dtype}{list(s.shape)}" for n, s in self.specs().items())
        return f"{type(self).__name__}({{{inner}}})"

    # ---- construction --------------------------------------------------------------------

    def _new(self, coefs: dict[str, Any], ops: ArrayOps | None = None) -> Self:
        out = object.__new__(type(self))
        out.coefs = coefs
        out.ops = self.ops if ops is None else ops
        return out

    def apply(self, func: Callable[[Any], Any]) -> Self:
        """Return a Vector of ``func(array)`` for each array (backend code only)."""
        return self._new({name: func(a) for name, a in self.coefs.items()})

    def zeros_like(self) -> Self:
        return self.apply(self.ops.zeros_like)

    def full_like(self, value: float) -> Self:
        full_like = self.ops.full_like
        return self.apply(lambda a: full_like(a, value))

    def copy(self) -> Self:
        return self.apply(self.ops.copy)

    def normal_like(self, rng: np.random.Generator) -> Self:
        """Standard normal draws of the same specs, from ``rng`` (drawn on the host, so the
        same generator gives the same numbers on every backend)."""
        normal_like = self.ops.normal_like
        return self.apply(lambda a: normal_like(a, rng))

    def to_numpy(self) -> Vector:
        """The same arrays as numpy arrays on the host (itself on the numpy backend)."""
        if self.ops is NUMPY:
            return self
        to_numpy = self.ops.to_numpy
        return Vector({n: to_numpy(a) for n, a in self.coefs.items()})

    def astype(self, dtypes: Mapping[str, ArraySpec]) -> Self:
        """The arrays cast to the dtypes of ``dtypes`` (a spec map); arrays already of their
        dtype are shared, not copied."""
        ops = self.ops
        return self._new(
            {
                n: a if ops.dtype_name(a) == dtypes[n].dtype else ops.cast(a, dtypes[n].dtype)
                for n, a in self.coefs.items()
            }
        )

    def widened(self, copy: bool = False) -> Self:
        """Half-precision arrays (float16, bfloat16) as float32 copies, the others shared (or
        copied with ``copy``): what a running sum of such Vectors starts from (see :meth:`add_`).
        """
        # an optimizer step asks every time: each distinct dtype named once, not specs()
        one_per_dtype = {a.dtype: a for a in self.coefs.values()}.values()
        if not copy and not any(self.ops.dtype_name(a) in HALF_DTYPES for a in one_per_dtype):
            return self
        out = self.astype(widened_specs(self.specs()))
        if copy:
            out.coefs = {
                n: self.ops.copy(a) if a is self.coefs[n] else a for n, a in out.coefs.items()
            }
        return out

    def like(self, other: Vector) -> Vector:
        """These arrays on ``other``'s backend and device (itself when already there)."""
        first = next(iter(other.coefs.values()), None)
        if first is None or (
            self.ops is other.ops and (self.ops is NUMPY or self.device == other.device)
        ):
            return self
        asarray = other.ops.asarray
        return other._new({n: asarray(a, first) for n, a in self.coefs.items()})

    @classmethod
    def zeros(cls, specs: Mapping[str, ArraySpec]) -> Vector:
        return cls({n: np.zeros(s.shape, dtype=s.dtype) for n, s in specs.items()})

    # ---- element-wise arithmetic -----------------------------------------------------------

    def _binary(self, other: object, name: str, sym: str, reflected: bool = False) -> Self:
        ops = self.ops
        if isinstance(other, Vector):
            if other.ops is not ops:
                if ops is NUMPY:  # numpy with torch: the result is torch, on its device
                    return self.like(other)._binary(other, name, sym, reflected)  # type: ignore[return-value]
                other = other.like(self)
            op = _operation(ops, name, reflected)
            if self.coefs.keys() != other.coefs.keys():
                left = sorted(self.coefs.keys() - other.coefs.keys())
                right = sorted(other.coefs.keys() - self.coefs.keys())
                raise SpecMismatchError(
                    f"cannot compute Vector {sym} Vector: names differ: "
                    f"only on the left {left}, only on the right {right}"
                )
            out = {}
            for key, a in self.coefs.items():
                b = other.coefs[key]
                if a.shape != b.shape or a.dtype != b.dtype:
                    raise SpecMismatchError(
                        f"cannot compute Vector {sym} Vector: array {key!r} is "
                        f"{ops.dtype_name(a)}{list(a.shape)} on the left and "
                        f"{ops.dtype_name(b)}{list(b.shape)} on the right"
                    )
                out[key] = op(a, b)
            return self._new(out)
        if isinstance(other, (int, float, np.number)) and not isinstance(other, bool):
            scalar = other.item() if isinstance(other, np.generic) else other
            op, keep = _operation(ops, name, reflected), ops.keep_dtype
            return self._new({n: keep(op(a, scalar), a) for n, a in self.coefs.items()})
        return NotImplemented

    def __add__(self, other: object) -> Self:
        return self._binary(other, "add", "+")

    def __radd__(self, other: object) -> Self:
        return self._binary(other, "add", "+", reflected=True)

    def __sub__(self, other: object) -> Self:
        return self._binary(other, "subtract", "-")

    def __rsub__(self, other: object) -> Self:
        return self._binary(other, "subtract", "-", reflected=True)

    def __mul__(self, other: object) -> Self:
        return self._binary(other, "multiply", "*")

    def __rmul__(self, other: object) -> Self:
        return self._binary(other, "multiply", "*", reflected=True)

    def __truediv__(self, other: object) -> Self:
        return self._binary(other, "true_divide", "/")

    def __rtruediv__(self, other: object) -> Self:
        return self._binary(other, "true_divide", "/", reflected=True)

    def __pow__(self, other: object) -> Self:
        return self._binary(other, "power", "**")

    def __neg__(self) -> Self:
        return self.apply(self.ops.negative)

    def __pos__(self) -> Self:
        return self

    def sqrt(self) -> Self:
        return self.apply(self.ops.sqrt)

    def abs(self) -> Self:
        return self.apply(self.ops.abs)

    def sign(self) -> Self:
        return self.apply(self.ops.sign)

    def square(self) -> Self:
        return self.apply(self.ops.square)

    def minimum(self, other: Vector | float) -> Self:
        return self._binary(other, "minimum", "minimum")

    def maximum(self, other: Vector | float) -> Self:
        return self._binary(other, "maximum", "maximum")

    def scale(self, factors: Mapping[str, float]) -> Self:
        """Multiply each array by its own scalar factor (``factors[name]``)."""
        keep = self.ops.keep_dtype
        return self._new({n: keep(a * factors[n], a) for n, a in self.coefs.items()})

    # ---- in-place accumulation (aggregation hot path) ----------------------------------------

    def add_(self, other: Vector, alpha: float = 1.0) -> Self:
        """In place: ``self += alpha * other``. Used to keep one running sum when aggregating.

        ``other`` has this Vector's specs, except that a float32 array of the accumulator may
        take a half-precision (float16, bfloat16) array of ``other``: a float32 running sum of
        half-precision updates (:meth:`widened`), added without a widened copy.
        """
        targets, sources = self._in_place_operands(other, "in-place addition")
        if alpha != 1.0:
            keep = self.ops.keep_dtype
            sources = [keep(b * alpha, a) for a, b in zip(targets, sources, strict=True)]
        if targets:
            self.ops.add_all_(targets, sources)
        return self

    def sub_(self, other: Vector) -> Self:
        """In place: ``self -= other`` (the same bits as ``add_(other, alpha=-1.0)``, without
        its temporary ``-other``), with :meth:`add_`'s specs."""
        targets, sources = self._in_place_operands(other, "in-place subtraction")
        if targets:
            self.ops.sub_all_(targets, sources)
        return self

    def _in_place_operands(self, other: Vector, what: str) -> tuple[list[Any], list[Any]]:
        """This Vector's arrays (writable copies of read-only ones) and ``other``'s, on this
        backend and device, after checking that they accumulate."""
        ops = self.ops
        if other.ops is not ops or (ops is not NUMPY and other.device != self.device):
            other = other.like(self)  # the accumulator keeps its backend and device
        theirs = other.coefs
        if self.coefs.keys() != theirs.keys() or any(
            a.shape != theirs[n].shape or a.dtype != theirs[n].dtype for n, a in self.coefs.items()
        ):
            self.check_accumulates(other, what)
        targets = []
        for name, a in self.coefs.items():
            if not ops.writable(a):
                a = self.coefs[name] = ops.copy(a)
            targets.append(a)
        return targets, [theirs[name] for name in self.coefs]

    def mul_(self, factor: float) -> Self:
        """In place: ``self *= factor`` (dtypes kept). Finalizes an aggregate without a copy."""
        ops = self.ops
        floats = []
        for name, a in self.coefs.items():
            if not ops.writable(a):
                a = self.coefs[name] = ops.copy(a)
            if ops.is_float(a):
                floats.append(a)
            else:
                ops.assign(a, ops.keep_dtype(a * factor, a))
        if floats:
            ops.mul_all_(floats, factor)
        return self

    # ---- reductions ----------------------------------------------------------------------------

    def sum(self) -> float:
        """Sum of every element of every array."""
        return float(sum(map(self.ops.sum64, self.coefs.values())))

    def dot(self, other: Vector) -> float:
        """Inner product over all arrays."""
        other = other.like(self)
        self.check_specs(other.specs(), "dot product")
        dot64 = self.ops.dot64
        return float(sum(dot64(a, other.coefs[n]) for n, a in self.coefs.items()))

    def norms(self) -> dict[str, float]:
        """L2 norm of each array."""
        norm64 = self.ops.norm64
        return {n: norm64(a) for n, a in self.coefs.items()}

    def norm(self) -> float:
        """Global L2 norm over all arrays."""
        return float(np.sqrt(sum(v * v for v in self.norms().values())))

    def clip_norm(self, max_norm: float, per_array: bool = False) -> Self:
        """Scaled down to an L2 norm of at most ``max_norm``: ``v * min(1, max_norm / ||v||)``
        over the whole Vector, or each array on its own with ``per_array``.

        The factor is computed by the backend without a Python comparison, so that a torch
        Vector clips on its device without waiting for the norm, and under ``torch.func.vmap``
        each client of a stacked batch is clipped by its own norm.
        """
        return self._new(self.ops.clip_norm(self.coefs, max_norm, per_array))

    def is_finite(self) -> bool:
        """True if no array holds NaN or infinity (checked in blocks: no model-sized mask)."""
        ops = self.ops
        for a in self.coefs.values():
            if not ops.is_float(a):
                continue
            if ops.numel(a) <= _FINITE_BLOCK:  # one mask at most a block's size
                if not ops.all_finite(a):
                    return False
                continue
            flat = ops.flat(a)
            for start in range(0, ops.numel(flat), _FINITE_BLOCK):
                if not ops.all_finite(flat[start : start + _FINITE_BLOCK]):
                    return False
        return True

    def allclose(self, other: Vector, rtol: float = 1e-7, atol: float = 0.0) -> bool:
        """Same names and shapes, and values equal within tolerance."""
        allclose = self.ops.allclose
        return self.coefs.keys() == other.coefs.keys() and all(
            tuple(a.shape) == tuple(other.coefs[n].shape)
            and allclose(a, other.coefs[n], rtol, atol)
            for n, a in self.coefs.items()
        )

    def array_equal(self, other: Vector) -> bool:
        """Same specs and bit-identical values."""
        array_equal = self.ops.array_equal
        return self.specs() == other.specs() and all(
            array_equal(a, other.coefs[n]) for n, a in self.coefs.items()
        )


def _backend(coefs: Mapping[str, Any]) -> ArrayOps:
    """The one backend of ``coefs``' arrays (numpy when empty)."""
    arrays = iter(coefs.values())
    first = next(arrays, None)
    if first is None or isinstance(first, np.ndarray):
        ops = NUMPY
    else:
        ops = ops_of(first)
    kind = type(first)
    for array in arrays:
        if type(array) is not kind and ops_of(array) is not ops:
            raise TypeError(
                f"a Vector's arrays must all be numpy arrays or all torch tensors, "
                f"got {kind.__name__} and {type(array).__name__}"
            )
    return ops


def _operation(ops: ArrayOps, name: str, reflected: bool) -> Callable[[Any, Any], Any]:
    op = getattr(ops, name)
    binary = ops.binary_arrays
    if reflected:
        return lambda a, b: binary(op, b, a)
    if ops is NUMPY:
        return op  # type: ignore[no-any-return]
    return lambda a, b: binary(op, a, b)
