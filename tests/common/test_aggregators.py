"""Aggregators: exact values, streaming in any order, validation of untrusted partials."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedpipe.common import registry
from fedpipe.common.aggregators import Aggregator, InvalidPartialError
from fedpipe.common.summable import Summable
from fedpipe.common.vector import Vector

UPDATES = [
    (Vector({"w": np.array([1.0, 2.0, -1.0])}), 10, 2),
    (Vector({"w": np.array([3.0, -2.0, -1.0])}), 30, 6),
    (Vector({"w": np.array([0.0, 4.0, 1.0])}), 60, 1),
]


def aggregate(agg: Aggregator, order: tuple[int, ...]) -> Vector:
    # prepare() takes ownership of the update it is given: hand it a copy
    return agg.aggregate(agg.prepare(UPDATES[i][0].copy(), *UPDATES[i][1:]) for i in order)


def test_averaging_weights_by_samples_capped_samples_or_uniformly() -> None:
    by_samples = aggregate(registry.build("aggregator", "averaging"), (0, 1, 2))
    assert np.allclose(
        by_samples["w"], [(10 + 90 + 0) / 100, (20 - 60 + 240) / 100, (-10 - 30 + 60) / 100]
    )
    capped = aggregate(
        registry.build("aggregator", "averaging", {"weighting": "capped", "max_samples": 30}),
        (0, 1, 2),
    )  # weights 10, 30, 30
    assert np.allclose(
        capped["w"], [(10 + 90 + 0) / 70, (20 - 60 + 120) / 70, (-10 - 30 + 30) / 70]
    )
    uniform = aggregate(
        registry.build("aggregator", "averaging", {"weighting": "uniform"}), (0, 1, 2)
    )
    assert np.allclose(uniform["w"], [4 / 3, 4 / 3, -1 / 3])


LIAR = (Vector({"w": np.array([100.0, 100.0, 100.0])}), 1_000_000, 1)


@pytest.mark.parametrize(
    "name", ["averaging", "gradient-masked-averaging", "krum", "geometric-median"]
)
def test_the_server_reapplies_its_weighting_to_a_client_that_lies_about_its_weight(
    name: str,
) -> None:
    """A client that prepares its partial with a million samples (whatever the configured
    weighting) counts for ``max_samples`` under ``capped`` and for one under ``uniform``."""
    samples = registry.build("aggregator", "averaging")  # what the liar prepares with
    for weighting in ("capped", "uniform"):
        config = {"weighting": weighting} | ({"max_samples": 30} if weighting == "capped" else {})
        agg = registry.build("aggregator", name, config)
        honest = [agg.prepare(u.copy(), n, s) for u, n, s in UPDATES]
        lying = (samples if agg.vector_fields == samples.vector_fields else agg).prepare(
            LIAR[0].copy(), *LIAR[1:]
        )
        if name == "gradient-masked-averaging":
            lying.fields |= {"sign_sum": LIAR[0] * 50.0, "n_clients": 1000}  # lies there too
        got = agg.aggregate([*honest, lying])["w"]
        weights = {"capped": np.array([10, 30, 30, 30.0]), "uniform": np.ones(4)}[weighting]
        rows = np.array([u["w"] for u, _, _ in (*UPDATES, LIAR)])
        mean = weights @ rows / weights.sum()
        if name in ("averaging", "gradient-masked-averaging"):
            agreement = np.abs(np.sign(rows).sum(axis=0)) / 4  # [.75, .5, 0] < 0.8: soft mask
            mask = np.ones(3) if name == "averaging" else agreement
            np.testing.assert_allclose(got, mean * mask)
        else:  # robust: the liar's weight is bounded, its update left out
            assert np.abs(got).max() < 10.0


def test_sum() -> None:
    assert np.allclose(aggregate(registry.build("aggregator", "sum"), (0, 1, 2))["w"], [4, 4, -1])


def test_gradient_masked_averaging_matches_the_paper_mask() -> None:
    agg = registry.build("aggregator", "gradient-masked-averaging", {"threshold": 0.8})
    result = aggregate(agg, (0, 1, 2))
    average = np.array([1.0, 2.0, 0.2])  # sample-weighted average, as above
    # sign agreement |sum sign| / n: [2/3, 1/3, 1/3] -> all below 0.8: scaled by agreement
    assert np.allclose(result["w"], average * np.array([2 / 3, 1 / 3, 1 / 3]))
    lenient = registry.build("aggregator", "gradient-masked-averaging", {"threshold": 0.5})
    assert np.allclose(aggregate(lenient, (0, 1, 2))["w"], average * np.array([1, 1 / 3, 1 / 3]))


def test_gradient_masking_keeps_a_coordinate_whose_agreement_equals_the_threshold() -> None:
    # 4 clients, uniform weights. Signs per coordinate: ++++ (A = 1), +-+- (A = 0),
    # ++-+ (A = |2| / 4 = .5); the mean is [2, .25, 1].
    updates = [[1.0, 1.0, 1.0], [3.0, -2.0, 1.0], [1.0, 3.0, -1.0], [3.0, -1.0, 3.0]]
    expected = {
        0.5: [2.0, 0.0, 1.0],  # A = .5 at the threshold: kept whole; A = 0 scales to 0
        0.5000001: [2.0, 0.0, 0.5],  # just above: A = .5 scales by .5
        1.0: [2.0, 0.0, 0.5],  # A = 1 at the threshold: kept whole
        0.0: [2.0, 0.25, 1.0],  # every A >= 0: nothing masked
    }
    for threshold, values in expected.items():
        agg = registry.build(
            "aggregator",
            "gradient-masked-averaging",
            {"threshold": threshold, "weighting": "uniform"},
        )
        partials = (agg.prepare(Vector({"w": np.array(u)}), 1, 1) for u in updates)
        assert agg.aggregate(partials)["w"].tolist() == values, f"threshold {threshold}"


@pytest.mark.parametrize("name", ["averaging", "gradient-masked-averaging", "sum"])
def test_partials_add_up_in_any_order(name: str) -> None:
    agg = registry.build("aggregator", name)
    results = [aggregate(agg, order) for order in itertools.permutations(range(3))]
    for other in results[1:]:
        assert other.allclose(results[0], rtol=1e-12)


def test_streaming_keeps_one_running_sum_without_touching_inputs() -> None:
    agg = registry.build("aggregator", "averaging")
    partials = [agg.prepare(u.copy(), n, s) for u, n, s in UPDATES]
    snapshot = [p.copy() for p in partials]
    agg.aggregate(iter(partials))
    for before, after in zip(snapshot, partials, strict=True):
        assert before.vector("weighted_sum").array_equal(after.vector("weighted_sum"))


@pytest.mark.parametrize(
    "partial, message",
    [
        (
            Summable({"weighted_sum": Vector({"w": np.ones(3)})}),
            "expected ['total_weight', 'weighted_sum']",
        ),
        (
            Summable({"weighted_sum": Vector({"w": np.ones(4)}), "total_weight": 1.0}),
            "has shape (4,), expected (3,)",
        ),
        (
            Summable(
                {"weighted_sum": Vector({"w": np.array([1, np.nan, 1])}), "total_weight": 1.0}
            ),
            "NaN",
        ),
        (
            Summable({"weighted_sum": Vector({"w": np.ones(3)}), "total_weight": float("inf")}),
            "finite non-negative",
        ),
        (Summable({"weighted_sum": 3.0, "total_weight": 1.0}), "must be a Vector"),
    ],
)
def test_validate_rejects_malformed_partials_with_a_reason(partial: Summable, message: str) -> None:
    agg = registry.build("aggregator", "averaging")
    with pytest.raises(InvalidPartialError) as err:
        agg.validate(partial, UPDATES[0][0].specs())
    assert message in str(err.value)


def test_zero_total_weight_is_an_error() -> None:
    agg = registry.build("aggregator", "averaging")
    with pytest.raises(ValueError, match="total client weight is 0"):
        agg.aggregate([agg.prepare(UPDATES[0][0].copy(), 0, 0)])


def test_a_partial_of_weight_zero_adds_nothing_whatever_its_sum() -> None:
    agg = registry.build("aggregator", "averaging")
    sneaky = Summable({"weighted_sum": Vector({"w": np.full(3, 1e6)}), "total_weight": 0.0})
    honest = agg.prepare(UPDATES[0][0].copy(), *UPDATES[0][1:])
    assert agg.aggregate([honest, sneaky])["w"].tolist() == UPDATES[0][0]["w"].tolist()


@pytest.mark.parametrize("name", ["averaging", "gradient-masked-averaging"])
def test_max_norm_bounds_each_client_update_before_averaging(name: str) -> None:
    """Updates of norms sqrt(6), sqrt(14), sqrt(17) bounded at 3: the first is left as it is,
    the others scaled to norm 3; weights stay the sample counts."""
    agg = registry.build(
        "aggregator",
        name,
        {"max_norm": 3.0, "threshold": 0.0} if name != "averaging" else {"max_norm": 3.0},
    )
    got = aggregate(agg, (2, 0, 1))["w"]
    rows = np.array([u["w"] for u, _, _ in UPDATES])
    norms = np.linalg.norm(rows, axis=1)
    bounded = rows * np.minimum(1.0, 3.0 / norms)[:, None]
    assert norms[0] < 3.0 < norms[1]
    np.testing.assert_allclose(got, np.array([10, 30, 60]) @ bounded / 100, rtol=1e-12)
    clipped = agg.admit(agg.prepare(UPDATES[1][0].copy(), 30, 1))
    assert agg.update_norm(clipped) == pytest.approx(3.0, rel=1e-12)
    assert clipped.number("total_weight") == 30.0


@pytest.mark.parametrize("name", ["averaging", "gradient-masked-averaging"])
@pytest.mark.parametrize(("scale", "expected"), [(0.03, 3.0), (0.2, 5.0)])
def test_max_norm_bounds_a_down_weighted_update_by_its_scaled_norm(
    name: str, scale: float, expected: float
) -> None:
    """An update of norm 100 down-weighted by validation, bounded at 5: norm min(100 * scale,
    5), not both factors taken from the unscaled norm (0.15 for scale 0.03)."""
    config = {"max_norm": 5.0, "threshold": 0.0} if name != "averaging" else {"max_norm": 5.0}
    agg = registry.build("aggregator", name, config)
    update = Vector({"w": np.array([60.0, 80.0])})  # norm 100
    admitted = agg.admit(agg.prepare(update, 4, 1), scale)
    assert agg.update_norm(admitted) == pytest.approx(expected, rel=1e-12)
    assert admitted.number("total_weight") == 4.0


def test_max_norm_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"averaging: max_norm=0\.0; expected a number > 0"):
        registry.build("aggregator", "averaging", {"max_norm": 0.0})


@pytest.mark.parametrize("name", ["averaging", "gradient-masked-averaging", "krum"])
def test_unknown_weighting_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name}: weighting='steps'; expected 'samples', 'unif"):
        registry.build("aggregator", name, {"weighting": "steps"})
    with pytest.raises(ValueError, match="weighting='capped' needs max_samples, an integer >= 1"):
        registry.build("aggregator", name, {"weighting": "capped"})


def test_a_tiny_reported_weight_cannot_blow_the_update_up_to_infinity() -> None:
    # Uniform weighting counts any client as 1, rescaling its sum by 1 / reported weight: a
    # liar reporting 1e-320 must be refused, not turned into inf (which fails the round).
    agg = registry.build("aggregator", "averaging", {"weighting": "uniform"})
    liar = Summable({"weighted_sum": Vector({"w": np.ones(3)}), "total_weight": 1e-320})
    agg.validate(liar, {"w": UPDATES[0][0].specs()["w"]})  # finite, non-negative: well formed
    with pytest.raises(InvalidPartialError, match="not finite once weighted"):
        agg.admit(liar)
    honest = agg.prepare(UPDATES[0][0].copy(), *UPDATES[0][1:])
    assert agg.admit(honest).vector("weighted_sum")["w"].tolist() == [1.0, 2.0, -1.0]


def test_a_subclass_that_changes_admission_gets_no_inherited_stacked_or_streaming_form() -> None:
    from fedpipe.common.aggregators.averaging import AveragingAggregator
    from fedpipe.common.aggregators.gradient_masked import GradientMaskedAveraging
    from fedpipe.common.summable import Summable as _Summable

    class Reweighted(AveragingAggregator):  # a user's plug-in: its own admission only
        def admit(self, partial: _Summable, scale: float = 1.0) -> _Summable:
            return super().admit(partial, scale * 0.5)

    assert AveragingAggregator().stacks and AveragingAggregator().streams
    assert not Reweighted().stacks and not Reweighted().streams
    masked = GradientMaskedAveraging()
    assert not masked.stacks and masked.streams  # it has its own streaming twins
