from __future__ import annotations

import itertools

import pytest

from fedpipe.common.secagg.shamir import (
    PRIME,
    reconstruct,
    share_from_bytes,
    share_to_bytes,
    split,
)
from tests.common.secagg_run import seeded

SECRET = int.from_bytes(bytes(range(32)), "big")


def test_any_threshold_subset_reconstructs_the_secret() -> None:
    shares = split(SECRET, [1, 2, 3, 4, 5], 3, seeded(0))
    for subset in itertools.combinations(shares.items(), 3):
        assert reconstruct(dict(subset), 3) == SECRET


def test_fewer_shares_than_the_threshold_do_not_give_the_secret() -> None:
    shares = split(SECRET, [1, 2, 3, 4, 5], 3, seeded(0))
    two = dict(list(shares.items())[:2])
    assert reconstruct(two, 2) != SECRET
    with pytest.raises(ValueError, match="shares: 2 given, expected at least 3"):
        reconstruct(two, 3)


def test_threshold_one_gives_the_secret_to_each_holder() -> None:
    assert set(split(SECRET, [7, 9], 1, seeded(0)).values()) == {SECRET}


def test_shares_differ_between_draws() -> None:
    assert split(SECRET, [1, 2], 2, seeded(0)) != split(SECRET, [1, 2], 2, seeded(1))


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
        split(SECRET, holders, threshold, seeded(0))
