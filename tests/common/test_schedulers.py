"""Learning-rate schedulers: values at given steps, validation, warm-up config."""

from __future__ import annotations

import pytest

from fedpipe.common.registry import build_spec
from fedpipe.common.schedulers import (
    Constant,
    CosineAnnealing,
    ExponentialDecay,
    InverseTimeDecay,
    Piecewise,
    PolynomialDecay,
    Warmup,
)


def values(scheduler: object, steps: list[int]) -> list[float]:
    return [scheduler.value(step) for step in steps]  # type: ignore[attr-defined]


def test_constant() -> None:
    assert values(Constant(0.3), [0, 1, 1000]) == [0.3, 0.3, 0.3]


def test_exponential_decay() -> None:
    smooth = ExponentialDecay(initial=1.0, decay_rate=0.5, decay_steps=2)
    # 0.5 ** (step / 2): 1, 0.5 ** 0.5, 0.5, 0.25
    assert values(smooth, [0, 1, 2, 4]) == pytest.approx([1.0, 0.7071067811865476, 0.5, 0.25])
    stairs = ExponentialDecay(initial=1.0, decay_rate=0.5, decay_steps=2, staircase=True)
    assert values(stairs, [0, 1, 2, 3, 4]) == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25])


def test_inverse_time_decay() -> None:
    # 1 / (1 + 0.5 * step / 2): steps 0, 2, 4 -> 1, 1 / 1.5, 1 / 2
    scheduler = InverseTimeDecay(initial=1.0, decay_rate=0.5, decay_steps=2)
    assert values(scheduler, [0, 2, 4]) == pytest.approx([1.0, 2 / 3, 0.5])


def test_polynomial_decay() -> None:
    linear = PolynomialDecay(initial=1.0, final=0.1, decay_steps=10)
    # 0.9 * (1 - step/10) + 0.1, held at 0.1 after step 10
    assert values(linear, [0, 5, 10, 20]) == pytest.approx([1.0, 0.55, 0.1, 0.1])
    square = PolynomialDecay(initial=1.0, final=0.1, decay_steps=10, power=2.0)
    assert square.value(5) == pytest.approx(0.9 * 0.25 + 0.1)


def test_cosine_annealing() -> None:
    scheduler = CosineAnnealing(initial=1.0, decay_steps=10, final=0.1)
    # 0.1 + 0.9 * (1 + cos(pi * step / 10)) / 2; cos(pi / 5) = 0.809017
    assert values(scheduler, [0, 2, 5, 10, 15]) == pytest.approx(
        [1.0, 0.1 + 0.45 * 1.8090169943749475, 0.55, 0.1, 0.1]
    )


def test_piecewise() -> None:
    scheduler = Piecewise(boundaries=[2, 5], values=[1.0, 0.5, 0.1])
    assert values(scheduler, [0, 1, 2, 4, 5, 100]) == [1.0, 1.0, 0.5, 0.5, 0.1, 0.1]


def test_piecewise_validation() -> None:
    with pytest.raises(ValueError, match="expected 3 values"):
        Piecewise(boundaries=[2, 5], values=[1.0, 0.5])
    with pytest.raises(ValueError, match="strictly increasing"):
        Piecewise(boundaries=[5, 2], values=[1.0, 0.5, 0.1])


def test_warmup_then_wrapped_schedule() -> None:
    flat = Warmup(["constant", {"value": 1.0}], steps=4)
    assert values(flat, [0, 1, 2, 3, 4, 50]) == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    # the wrapped schedule starts when the warm-up ends: 1/3, 2/3, then 1, 0.5, 0.25
    decaying = Warmup(["exponential-decay", {"initial": 1.0, "decay_rate": 0.5}], steps=2)
    assert values(decaying, [0, 1, 2, 3, 4]) == pytest.approx([1 / 3, 2 / 3, 1.0, 0.5, 0.25])


def test_warmup_config_round_trip() -> None:
    scheduler = Warmup(ExponentialDecay(initial=0.1), steps=3)
    config = scheduler.get_config()
    assert config == {
        "scheduler": [
            "exponential-decay",
            {"initial": 0.1, "decay_rate": 0.96, "decay_steps": 1, "staircase": False},
        ],
        "steps": 3,
    }
    rebuilt = build_spec("scheduler", ["warmup", config])
    assert isinstance(rebuilt, Warmup)
    assert rebuilt.get_config() == config
    assert values(rebuilt, list(range(8))) == values(scheduler, list(range(8)))


def test_unknown_wrapped_scheduler_lists_known_names() -> None:
    with pytest.raises(KeyError, match=r"known scheduler names: .*cosine-annealing"):
        Warmup("cosine", steps=2)
