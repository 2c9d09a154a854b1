from __future__ import annotations

import logging

import numpy as np
import pytest

from fedpipe.common.secagg.quantization import FixedPoint
from fedpipe.common.vector import Vector


def _encoded_sum(
    encoding: FixedPoint, vectors: list[Vector], weights: list[int] | None = None
) -> Vector:
    weights = weights or [1] * len(vectors)
    total = encoding.encode(vectors[0], weights[0])
    for vector, weight in zip(vectors[1:], weights[1:], strict=True):
        total.add_(encoding.encode(vector, weight))
    mask = (1 << encoding.bits) - 1
    return total.apply(lambda a: a & a.dtype.type(mask))


@pytest.mark.parametrize(("bits", "clip"), [(16, 1.0), (32, 0.05), (48, 10.0)])
def test_decoded_sum_is_within_the_documented_bound(bits: int, clip: float) -> None:
    rng = np.random.default_rng(bits)
    clients = 20
    encoding = FixedPoint(bits, clip, clients)
    vectors = [Vector({"w": rng.uniform(-clip, clip, 2000)}) for _ in range(clients)]
    decoded, count = encoding.decode(_encoded_sum(encoding, vectors))
    decoded = decoded.coefs["w"]
    assert count == clients
    exact = np.sum([v.coefs["w"] for v in vectors], axis=0)
    error = np.abs(decoded - exact).max()
    bound = encoding.error_bound(clients)
    assert error <= bound
    assert bound <= clients * clip / encoding.levels * 1.05  # half a step per client
    assert error >= bound / 10  # the bound is not loose by orders of magnitude


def test_the_largest_sum_of_every_client_does_not_wrap() -> None:
    encoding = FixedPoint(16, 1.0, 300)
    vectors = [Vector({"w": np.full(4, 1.0)}) for _ in range(300)]
    decoded = encoding.decode(_encoded_sum(encoding, vectors))[0].coefs["w"]
    np.testing.assert_allclose(decoded, 300.0, atol=encoding.error_bound(300))
    lowest = [Vector({"w": np.full(4, -1.0)}) for _ in range(300)]
    decoded = encoding.decode(_encoded_sum(encoding, lowest))[0].coefs["w"]
    np.testing.assert_allclose(decoded, -300.0, atol=encoding.error_bound(300))


def test_weighted_sum_with_the_largest_weights_does_not_wrap() -> None:
    """FedAvg's partial: each update times its sample count, and the total count."""
    rng = np.random.default_rng(3)
    encoding = FixedPoint(32, 0.5, 10, max_weight=600)
    vectors = [Vector({"w": rng.uniform(-0.5, 0.5, 500)}) for _ in range(10)]
    vectors[0] = Vector({"w": np.full(500, 0.5)})
    weights = [600, *rng.integers(1, 601, 9).tolist()]
    decoded, total_weight = encoding.decode(_encoded_sum(encoding, vectors, weights))
    exact = np.sum([w * v.coefs["w"] for w, v in zip(weights, vectors, strict=True)], axis=0)
    assert total_weight == sum(weights)
    assert np.abs(decoded.coefs["w"] - exact).max() <= encoding.error_bound(total_weight)
    with pytest.raises(ValueError, match="weight: 601, expected an integer in \\[1, 600\\]"):
        encoding.encode(vectors[0], 601)


def test_words_are_uint32_up_to_32_bits_then_uint64() -> None:
    assert FixedPoint(32, 1.0, 2).dtype == np.uint32
    assert FixedPoint(33, 1.0, 2).dtype == np.uint64
    encoded = FixedPoint(32, 1.0, 2).encode(Vector({"w": np.zeros((2, 3), np.float32)}))
    assert encoded.coefs["w"].dtype == np.uint32 and encoded.coefs["w"].shape == (2, 3)


def test_values_beyond_clip_are_clipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    encoding = FixedPoint(24, 0.5, 1)
    with caplog.at_level(logging.WARNING):
        encoded = encoding.encode(Vector({"w": np.array([3.0, -3.0, 0.25])}))
    np.testing.assert_allclose(
        encoding.decode(encoded)[0].coefs["w"], [0.5, -0.5, 0.25], atol=encoding.error_bound(1)
    )
    assert "clipped 2 of 3 values to [-0.5, 0.5]" in caplog.text


def test_non_finite_values_are_refused() -> None:
    with pytest.raises(ValueError, match="array 'w': not finite"):
        FixedPoint(16, 1.0, 2).encode(Vector({"w": np.array([np.nan])}))


@pytest.mark.parametrize(
    ("bits", "clip", "clients", "message"),
    [
        (7, 1.0, 2, "bits: 7, expected an integer in \\[8, 48\\]"),
        (49, 1.0, 2, "bits: 49"),
        (16, 0.0, 2, "clip: 0.0, expected a finite number > 0"),
        (8, 1.0, 200, "clients: 200, expected 1 <= clients <= 127 for 8 bits and max_weight 1"),
    ],
)
def test_invalid_encodings_are_explained(
    bits: int, clip: float, clients: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        FixedPoint(bits, clip, clients)


@pytest.mark.parametrize(("bits", "clients"), [(32, 1), (32, 2), (48, 1), (16, 3)])
def test_the_encoding_reaches_every_level_exactly(bits: int, clients: int) -> None:
    """Both ends of [-clip, clip] and the middle, in separate arrays laid out in name order:
    the top level of one client is 2**bits - 1, which a signed word of 32 bits cannot hold."""
    encoding = FixedPoint(bits, 1.0, clients)
    vector = Vector({"top": np.array([1.0, 0.0]), "bottom": np.array([[-1.0]], np.float32)})
    encoded = encoding.encode(vector)
    assert encoded.coefs["top"].tolist() == [encoding.levels, round(encoding.levels / 2)]
    assert encoded.coefs["bottom"].tolist() == [[0]]
    assert encoded.coefs["secagg/weight"].tolist() == [1]
    assert list(encoded.coefs) == ["secagg/weight", "top", "bottom"]
    assert encoding.levels == (2**bits - 1) // clients


def test_a_value_not_finite_is_refused_naming_its_array() -> None:
    vector = Vector({"a": np.zeros(3), "b": np.array([0.0, np.nan]), "c": np.array([np.inf])})
    with pytest.raises(ValueError, match="array 'b': not finite"):
        FixedPoint(32, 1.0, 2).encode(vector)


def test_clipped_values_are_counted_across_chunks_and_a_later_nan_still_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    values = np.zeros(20_000)  # more than one chunk of conversion
    values[[5, 9_000, 19_999]] = [2.0, -3.0, 1.5]
    encoding = FixedPoint(32, 1.0, 2)
    with caplog.at_level(logging.WARNING):
        encoded = encoding.encode(Vector({"w": values}))
    assert "clipped 3 of 20000 values" in caplog.text
    assert encoded.coefs["w"][[5, 9_000, 19_999]].tolist() == [encoding.levels, 0, encoding.levels]
    values[19_000] = np.nan
    with pytest.raises(ValueError, match="array 'w': not finite"):
        encoding.encode(Vector({"w": values}))


def test_a_weighted_sum_encodes_as_its_update_divided_in_float64() -> None:
    """FedAvg's partial (the float32 update times the sample count) is divided back by the
    encoding itself: the same words as dividing it first, to the bit."""
    rng = np.random.default_rng(4)
    encoding = FixedPoint(32, 0.5, 20, max_weight=700)
    for weight in (1, 3, 697):
        update = rng.uniform(-0.6, 0.6, (40, 500)).astype(np.float32)
        summed = Vector({"w": update * np.float32(weight), "b": np.float32(weight) * update[0]})
        divided = summed.apply(lambda a: np.asarray(a, np.float64) / weight)  # noqa: B023
        expected = encoding.encode(divided, weight)
        encoded = encoding.encode(summed, weight, weighted=True)
        for name, words in expected.coefs.items():
            assert np.array_equal(encoded.coefs[name], words), (weight, name)
