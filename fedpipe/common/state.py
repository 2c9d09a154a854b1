"""The shape of a module's state: what ``get_state()`` returns and ``set_state()`` takes.

A state is a nested mapping whose leaves are ``None``, bools, ints, floats, strings, numpy
arrays and :class:`~fedpipe.common.vector.Vector`; containers are lists and string-keyed dicts.
That is exactly what :mod:`fedpipe.common.codec` can put on the wire, so a state always crosses
a process boundary without pickle.
"""

from __future__ import annotations

import numpy as np

from fedpipe.common.vector import Vector

__all__ = ["State", "StateValue", "copy_state", "state_vector", "states_equal"]

StateValue = (
    None
    | bool
    | int
    | float
    | str
    | np.ndarray
    | Vector
    | list["StateValue"]
    | dict[str, "StateValue"]
)
State = dict[str, StateValue]


def states_equal(left: StateValue, right: StateValue) -> bool:
    """Deep, exact equality of two states (arrays and Vectors compared bit for bit)."""
    if isinstance(left, Vector) or isinstance(right, Vector):
        return isinstance(left, Vector) and isinstance(right, Vector) and left.array_equal(right)
    if isinstance(left, np.ndarray) or isinstance(right, np.ndarray):
        return (
            isinstance(left, np.ndarray)
            and isinstance(right, np.ndarray)
            and left.dtype == right.dtype
            and np.array_equal(left, right, equal_nan=True)
        )
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(states_equal(left[k], right[k]) for k in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(map(states_equal, left, right))
    if isinstance(left, float) and isinstance(right, float) and left != left and right != right:
        return True  # both NaN
    return type(left) is type(right) and left == right


def state_vector(state: State, key: str, owner: str) -> Vector | None:
    """``state[key]`` checked to be a Vector or ``None`` (missing keys read as ``None``)."""
    value = state.get(key)
    if value is not None and not isinstance(value, Vector):
        raise ValueError(f"{owner} state {key!r} must be a Vector or None, got {value!r}")
    return value


def copy_state(state: State) -> State:
    """A deep copy of ``state``: arrays and Vectors copied, plain values shared."""
    return {key: _copy_value(value) for key, value in state.items()}


def _copy_value(value: StateValue) -> StateValue:
    if isinstance(value, (Vector, np.ndarray)):
        return value.copy()
    if isinstance(value, dict):
        return copy_state(value)
    if isinstance(value, list):
        return [_copy_value(item) for item in value]
    return value
