"""Vector arithmetic, reductions and spec errors."""

from __future__ import annotations

import numpy as np
import pytest

from fedpipe.common.vector import ArraySpec, SpecMismatchError, Vector


def vec(w: list[float], b: list[float], dtype: str = "float32") -> Vector:
    return Vector({"w": np.array(w, dtype), "b": np.array(b, dtype)})


def test_arithmetic_with_scalars_and_vectors_preserves_specs() -> None:
    u, v = vec([1, 2, 3], [4]), vec([2, 2, 2], [-1])
    assert np.array_equal((u + v)["w"], [3, 4, 5]) and np.array_equal((u - v)["b"], [5])
    assert np.array_equal((u * v)["w"], [2, 4, 6]) and np.array_equal((u / v)["b"], [-4])
    assert np.array_equal((u**2)["w"], [1, 4, 9]) and np.array_equal((-u)["b"], [-4])
    assert np.array_equal((2 * u)["w"], [2, 4, 6]) and np.array_equal((1 - u)["w"], [0, -1, -2])
    assert np.array_equal((6 / u)["w"], [6, 3, 2])
    for result in (u + v, u * 2.5, u / 3, u**0.5, 1.0 - u, u.sqrt(), u.abs(), u.sign()):
        assert result.specs() == u.specs()
        assert result["w"].dtype == np.float32


def test_elementwise_functions() -> None:
    u = vec([-4, 0, 9], [1])
    assert np.array_equal(u.abs()["w"], [4, 0, 9])
    assert np.array_equal(u.sign()["w"], [-1, 0, 1])
    assert np.array_equal(u.maximum(0.0)["w"], [0, 0, 9])
    assert np.array_equal(u.minimum(vec([0, 0, 0], [0]))["w"], [-4, 0, 0])
    assert np.array_equal(u.abs().sqrt()["w"], [2, 0, 3])


def test_reductions() -> None:
    u, v = vec([3, 0, 0], [4]), vec([1, 2, 3], [1])
    assert u.sum() == 7.0
    assert u.norm() == pytest.approx(5.0)
    assert u.norms() == {"w": pytest.approx(3.0), "b": pytest.approx(4.0)}
    assert u.dot(v) == pytest.approx(3 + 4)
    assert u.size == 4 and u.nbytes == 16


def test_specs_and_zeros_like() -> None:
    u = Vector({"k": np.ones((2, 3), np.float64)})
    assert u.specs() == {"k": ArraySpec((2, 3), "float64")}
    assert u.zeros_like().array_equal(Vector({"k": np.zeros((2, 3))}))
    assert Vector.zeros(u.specs()).specs() == u.specs()


@pytest.mark.parametrize(
    "other, message",
    [
        (
            Vector({"w": np.ones(4, np.float32), "b": np.ones(1, np.float32)}),
            "array 'w' is float32[3] on the left and float32[4] on the right",
        ),
        (
            Vector({"w": np.ones(3, np.float64), "b": np.ones(1, np.float32)}),
            "array 'w' is float32[3] on the left and float64[3] on the right",
        ),
        (Vector({"w": np.ones(3, np.float32)}), "only on the left ['b'], only on the right []"),
    ],
)
def test_spec_mismatch_names_the_array_and_what_differs(other: Vector, message: str) -> None:
    with pytest.raises(SpecMismatchError) as err:
        vec([1, 2, 3], [1]) + other
    assert message in str(err.value)


def test_check_specs_reports_expected_values() -> None:
    with pytest.raises(
        SpecMismatchError, match=r"weights: array 'w' has shape \(3,\), expected \(2,\)"
    ):
        vec([1, 2, 3], [1]).check_specs(
            {"w": ArraySpec((2,), "float32"), "b": ArraySpec((1,), "float32")}, "weights"
        )


def test_in_place_accumulation_and_read_only_arrays() -> None:
    frozen = np.array([1.0, 1.0], np.float32)
    frozen.flags.writeable = False
    total = Vector({"w": frozen})
    total.add_(Vector({"w": np.array([1.0, 2.0], np.float32)}), alpha=2.0)
    assert np.array_equal(total["w"], [3.0, 5.0])
    assert np.array_equal(frozen, [1.0, 1.0])  # a read-only input is copied, never written


def test_in_place_subtraction_has_the_bits_of_adding_minus_one_times() -> None:
    rng = np.random.default_rng(3)
    start = {n: rng.standard_normal(s).astype(np.float32) for n, s in [("w", (40, 7)), ("b", 7)]}
    end = {n: a + rng.standard_normal(a.shape).astype(np.float32) * 1e-3 for n, a in start.items()}
    end["b"][0] = -0.0
    start["b"][0] = 0.0
    frozen = {n: a.copy() for n, a in start.items()}
    for array in frozen.values():
        array.flags.writeable = False
    by_sub = Vector(frozen).sub_(Vector(end))
    by_add = Vector({n: a.copy() for n, a in start.items()}).add_(Vector(end), alpha=-1.0)
    assert by_sub.array_equal(by_add)
    assert np.signbit(by_sub["b"][0]) == np.signbit(by_add["b"][0])
    assert all(np.array_equal(a, start[n]) for n, a in frozen.items())  # read-only: copied


def test_in_place_subtraction_of_half_precision_into_float32_and_its_errors() -> None:
    total = Vector({"w": np.array([1.0, 2.0], np.float32)})
    total.sub_(Vector({"w": np.array([0.5, 0.25], np.float16)}))
    assert np.array_equal(total["w"], [0.5, 1.75]) and total["w"].dtype == np.float32
    with pytest.raises(SpecMismatchError, match="in-place subtraction: array 'w' has shape"):
        total.sub_(Vector({"w": np.zeros(3, np.float32)}))


def test_a_vector_of_fedpipes_own_numpy_arrays_is_a_vector_like_any() -> None:
    arrays = {"w": np.ones(3, np.float32), "b": np.zeros(1, np.float32)}
    wrapped = Vector.of_numpy(arrays)
    assert wrapped.coefs is arrays and wrapped.backend == "numpy"
    assert wrapped.array_equal(Vector(arrays)) and (wrapped * 2)["w"].tolist() == [2.0] * 3


def test_is_finite_and_comparisons() -> None:
    assert vec([1, 2, 3], [0]).is_finite()
    assert not vec([1, np.nan, 3], [0]).is_finite()
    assert not vec([1, 2, 3], [np.inf]).is_finite()
    assert Vector({"i": np.array([1, 2]), "w": np.ones(2, np.float32)}).is_finite()
    assert vec([1, 2, 3], [0]).allclose(vec([1, 2, 3 + 1e-9], [0]), rtol=1e-6)
    assert not vec([1, 2, 3], [0]).array_equal(vec([1, 2, 3], [0], "float64"))


def test_in_place_scaling_keeps_dtypes() -> None:
    v = Vector({"f": np.array([1.0, 2.0], np.float32), "i": np.array([3, 4])})
    v.mul_(0.5)
    assert np.array_equal(v["f"], [0.5, 1.0]) and v["f"].dtype == np.float32
    assert np.array_equal(v["i"], [1, 2]) and v["i"].dtype == np.int64
