"""Quantities that add up across clients: aggregator partials and auxiliary variables.

A :class:`Summable` is a flat record of Vectors and numbers. Two of them with the same fields
add field by field, in any order, so the server can fold client replies into one running sum as
they arrive (memory O(model), not O(model x clients)). A running sum of half-precision Vectors
(float16, bfloat16) is kept in float32 (:meth:`Summable.accumulator`): an fp16 sum of a thousand
small updates would stall once its ulp exceeds them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Self

from fedpipe.common.vector import SpecMismatchError, Vector

__all__ = ["Summable"]

Field = Vector | float | int


class Summable:
    """Named fields (Vectors, floats, ints) that add up field by field.

    Parameters
    ----------
    fields:
        The record's values.
    """

    __slots__ = ("fields",)

    def __init__(self, fields: Mapping[str, Field]) -> None:
        self.fields: dict[str, Field] = dict(fields)

    def __getitem__(self, key: str) -> Field:
        return self.fields[key]

    def vector(self, key: str) -> Vector:
        value = self.fields[key]
        if not isinstance(value, Vector):
            raise TypeError(f"field {key!r} is {type(value).__name__}, expected a Vector")
        return value

    def number(self, key: str) -> float:
        value = self.fields[key]
        if isinstance(value, Vector):
            raise TypeError(f"field {key!r} is a Vector, expected a number")
        return float(value)

    def check_like(self, reference: Summable, what: str) -> None:
        """Raise unless this record can be added to ``reference``: same fields, a Vector where
        it has a Vector (with the same specs, or half precision where it has float32: see
        :meth:`accumulator`), a finite number where it has a number.

        Raises
        ------
        SpecMismatchError
            Different fields, or a Vector with other names, shapes or dtypes.
        TypeError
            A Vector where a number is expected, or the reverse.
        """
        if self.fields.keys() != reference.fields.keys():
            raise SpecMismatchError(
                f"{what} has fields {sorted(self.fields)}, expected {sorted(reference.fields)}"
            )
        for key, expected in reference.fields.items():
            value = self.fields[key]
            if isinstance(expected, Vector):
                if not isinstance(value, Vector):
                    raise TypeError(f"{what}.{key} must be a Vector, got {type(value).__name__}")
                expected.check_accumulates(value, f"{what}.{key}")
            elif isinstance(value, Vector) or isinstance(value, bool):
                raise TypeError(f"{what}.{key} must be a number, got {type(value).__name__}")
            elif not math.isfinite(value):
                raise ValueError(f"{what}.{key} is {value}, expected a finite number")

    def _check_fields(self, other: Summable) -> None:
        if self.fields.keys() != other.fields.keys():
            raise SpecMismatchError(
                f"cannot add records with fields {sorted(self.fields)} and {sorted(other.fields)}"
            )

    def __add__(self, other: Summable) -> Self:
        self._check_fields(other)
        return type(self)({k: v + other.fields[k] for k, v in self.fields.items()})  # type: ignore[operator]

    def add_(self, other: Summable) -> Self:
        """In place ``self += other``; Vectors are accumulated without new allocations."""
        self._check_fields(other)
        for key, value in self.fields.items():
            theirs = other.fields[key]
            if isinstance(value, Vector):
                if not isinstance(theirs, Vector):
                    raise TypeError(f"field {key!r}: cannot add a number to a Vector")
                value.add_(theirs)
            else:
                if isinstance(theirs, Vector):
                    raise TypeError(f"field {key!r}: cannot add a Vector to a number")
                self.fields[key] = value + theirs
        return self

    def accumulator(self, copy: bool = True) -> Self:
        """A record to keep a running sum in: half-precision Vectors (float16, bfloat16) as
        float32 copies, which :meth:`add_` adds half-precision records into; the other Vectors
        copied, or shared with ``copy=False`` (when this record is handed over).
        """
        return type(self)(
            {
                k: v.widened(copy=copy) if isinstance(v, Vector) else v
                for k, v in self.fields.items()
            }
        )

    def copy(self) -> Self:
        return type(self)(
            {k: v.copy() if isinstance(v, Vector) else v for k, v in self.fields.items()}
        )

    def like(self, other: Vector) -> Self:
        """This record with its Vectors on ``other``'s backend and device (itself if none
        moved)."""
        moved = {k: v.like(other) if isinstance(v, Vector) else v for k, v in self.fields.items()}
        return self if all(moved[k] is v for k, v in self.fields.items()) else type(self)(moved)

    def to_numpy(self) -> Self:
        """This record with its Vectors as numpy arrays on the host (itself if none moved)."""
        moved = {k: v.to_numpy() if isinstance(v, Vector) else v for k, v in self.fields.items()}
        return self if all(moved[k] is v for k, v in self.fields.items()) else type(self)(moved)

    def is_finite(self) -> bool:
        return all(
            v.is_finite() if isinstance(v, Vector) else math.isfinite(v)
            for v in self.fields.values()
        )

    def __repr__(self) -> str:
        return f"Summable({self.fields!r})"
