"""Summable records: field-wise sums, in place or not, with clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from fedpipe.common.summable import Summable
from fedpipe.common.vector import SpecMismatchError, Vector


def record(x: float, n: int) -> Summable:
    return Summable({"delta": Vector({"w": np.full(2, x)}), "count": n})


def test_addition_is_field_wise_and_leaves_operands_alone() -> None:
    a, b = record(1.0, 1), record(2.5, 3)
    total = a + b
    assert np.array_equal(total.vector("delta")["w"], [3.5, 3.5]) and total.number("count") == 4
    assert np.array_equal(a.vector("delta")["w"], [1.0, 1.0]) and a.number("count") == 1


def test_in_place_addition_accumulates_into_the_left_operand() -> None:
    total = record(0.0, 0)
    buffer = total.vector("delta")["w"]
    for i in range(1, 4):
        total.add_(record(float(i), 1))
    assert total.vector("delta")["w"] is buffer  # no new allocation per client
    assert np.array_equal(buffer, [6.0, 6.0]) and total.number("count") == 3


def test_mismatched_records_raise() -> None:
    with pytest.raises(SpecMismatchError, match=r"fields \['count', 'delta'\] and \['delta'\]"):
        record(1.0, 1) + Summable({"delta": Vector({"w": np.ones(2)})})
    with pytest.raises(TypeError, match="field 'count': cannot add a Vector to a number"):
        record(1.0, 1).add_(
            Summable({"delta": Vector({"w": np.ones(2)}), "count": Vector({"w": np.ones(2)})})
        )


def test_finite_checks_and_typed_access() -> None:
    assert record(1.0, 1).is_finite()
    assert not record(float("nan"), 1).is_finite()
    assert not Summable({"x": float("inf")}).is_finite()
    with pytest.raises(TypeError, match="field 'count' is int, expected a Vector"):
        record(1.0, 1).vector("count")


def test_check_like_accepts_a_compatible_record_and_names_what_differs() -> None:
    reference = record(0.0, 0)
    record(5.0, 2).check_like(reference, "aux")
    with pytest.raises(SpecMismatchError, match=r"aux.delta: array 'w' has shape \(3,\)"):
        Summable({"delta": Vector({"w": np.ones(3)}), "count": 1}).check_like(reference, "aux")
    with pytest.raises(TypeError, match=r"aux\.count must be a number, got Vector"):
        Summable(
            {"delta": Vector({"w": np.ones(2)}), "count": Vector({"w": np.ones(2)})}
        ).check_like(reference, "aux")
    with pytest.raises(SpecMismatchError, match=r"aux has fields \['delta'\]"):
        Summable({"delta": Vector({"w": np.ones(2)})}).check_like(reference, "aux")


def test_check_like_refuses_non_finite_numbers() -> None:
    with pytest.raises(ValueError, match=r"m\.count is nan, expected a finite number"):
        Summable({"delta": Vector({"w": np.ones(2)}), "count": float("nan")}).check_like(
            record(0.0, 0), "m"
        )


def test_a_record_moves_to_a_device_and_back_keeping_its_numbers() -> None:
    torch = pytest.importorskip("torch")
    rec = record(1.5, 2)
    assert rec.to_numpy() is rec  # already on the host: nothing copied
    on_torch = rec.like(Vector({"w": torch.zeros(2, dtype=torch.float64)}))
    assert on_torch.vector("delta").backend == "torch" and on_torch.number("count") == 2
    assert rec.vector("delta").backend == "numpy"  # the original is left alone
    back = on_torch.to_numpy()
    assert back.vector("delta").backend == "numpy" and back.number("count") == 2
    assert np.array_equal(back.vector("delta")["w"], [1.5, 1.5])
    assert rec.like(rec.vector("delta")) is rec
