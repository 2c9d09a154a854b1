from __future__ import annotations

import itertools
import random

import pytest

from fedpipe.common.secagg.shamir import (
    PRIME,
    lagrange_weights,
    reconstruct,
    share_from_bytes,
    share_to_bytes,
    split,
)
from tests.common.secagg_run import seeded

SECRET = int.from_bytes(bytes(range(32)), "big")


def test_any_threshold_subset_reconstructs_the_secret() -> None:
    shares = {x: s for x, (s,) in split([SECRET], [1, 2, 3, 4, 5], 3, seeded(0)).items()}
    for subset in itertools.combinations(shares.items(), 3):
        assert reconstruct(dict(subset), 3) == SECRET


def test_fewer_shares_than_the_threshold_do_not_give_the_secret() -> None:
    shares = {x: s for x, (s,) in split([SECRET], [1, 2, 3, 4, 5], 3, seeded(0)).items()}
    two = dict(list(shares.items())[:2])
    assert reconstruct(two, 2) != SECRET
    with pytest.raises(ValueError, match="shares: 2 given, expected at least 3"):
        reconstruct(two, 3)


def test_threshold_one_gives_the_secret_to_each_holder() -> None:
    assert set(split([SECRET], [7, 9], 1, seeded(0)).values()) == {(SECRET,)}


def test_shares_differ_between_draws() -> None:
    assert split([SECRET], [1, 2], 2, seeded(0)) != split([SECRET], [1, 2], 2, seeded(1))


def test_share_bytes_round_trip_and_validation() -> None:
    value = PRIME - 1
    assert share_from_bytes(share_to_bytes(value)) == value
    with pytest.raises(ValueError, match="65 bytes, expected 66"):
        share_from_bytes(bytes(65))
    with pytest.raises(ValueError, match="not a field element"):
        share_from_bytes(b"\xff" * 66)


@pytest.mark.parametrize(
    ("holders", "threshold", "message"),
    [([1, 1], 2, "distinct nonzero"), ([0, 1], 2, "distinct nonzero"), ([1, 2], 3, "<= 2")],
)
def test_split_rejects_bad_holders_and_thresholds(
    holders: list[int], threshold: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        split([SECRET], holders, threshold, seeded(0))


def _horner(coefficients: list[int], x: int) -> int:
    result = 0
    for coefficient in reversed(coefficients):
        result = (result * x + coefficient) % PRIME
    return result


def _interpolate_at_zero(points: list[tuple[int, int]]) -> int:
    total = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                numerator = numerator * -xj % PRIME
                denominator = denominator * (xi - xj) % PRIME
        total = (total + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    return total


def test_batched_split_equals_the_scalar_reference_polynomials() -> None:
    rng = random.Random(3)
    secrets = [rng.randrange(PRIME) for _ in range(3)]
    holders, threshold = rng.sample(range(1, 200), 12), 7
    draws: list[bytes] = []

    def recorded(n: int) -> bytes:
        draws.append(seeded(len(draws))(n))
        return draws[-1]

    shares = split(secrets, holders, threshold, recorded)
    # The same random coefficients, read back in the order they were drawn (secret by secret).
    coefficients = [int.from_bytes(d, "big") % PRIME for d in draws]
    for k, secret in enumerate(secrets):
        poly = [secret, *coefficients[k * (threshold - 1) : (k + 1) * (threshold - 1)]]
        assert [shares[x][k] for x in holders] == [_horner(poly, x) for x in holders]


def test_cached_lagrange_reconstruction_equals_the_scalar_reference() -> None:
    rng = random.Random(4)
    for threshold in (2, 5, 26):
        xs = rng.sample(range(1, 100), threshold + 3)
        points = {x: rng.randrange(PRIME) for x in xs}  # any values: a polynomial fits them
        first = sorted(points.items())[:threshold]
        assert reconstruct(points, threshold) == _interpolate_at_zero(first)
    assert lagrange_weights((1, 2)) == (2, PRIME - 1)  # f(0) = 2 f(1) - f(2)
