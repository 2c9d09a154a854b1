"""Tests every registered module, regularizer, scheduler and aggregator, so that a new class
is tested on arrival. A class whose constructor needs arguments gets them from
``TEST_CONFIGS``; one that has none there and cannot be built with defaults fails."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedpipe.common import registry
from fedpipe.common.codec import state_from_bytes, state_to_bytes
from fedpipe.common.state import states_equal
from fedpipe.common.vector import Vector

FAMILIES = ("module", "regularizer", "scheduler", "aggregator")

TEST_CONFIGS: dict[tuple[str, str], dict[str, Any]] = {
    ("scheduler", "piecewise"): {"boundaries": [2, 5], "values": [0.1, 0.01, 0.001]},
    ("scheduler", "warmup"): {
        "scheduler": ["exponential-decay", {"initial": 0.1, "decay_rate": 0.5}],
        "steps": 3,
    },
}


def build(family: str, name: str) -> Any:
    cls = registry.get_class(family, name)
    config = TEST_CONFIGS.get((family, name))
    if config is not None:
        return cls.from_config(config)  # type: ignore[attr-defined]
    try:
        return cls()
    except TypeError as exc:
        pytest.fail(
            f"{family} {name!r} cannot be built with defaults ({exc}); "
            f"add a config for it to TEST_CONFIGS in {__file__}"
        )


def registered(*families: str) -> list[Any]:
    return [
        pytest.param(family, name, id=f"{family}:{name}")
        for family in families
        for name in registry.names(family)
    ]


def gradients(dtype: Any, seed: int) -> Vector:
    rng = np.random.default_rng(seed)
    return Vector(
        {"kernel": rng.normal(size=(4, 3)).astype(dtype), "bias": rng.normal(size=3).astype(dtype)}
    )


def test_every_family_has_members() -> None:
    for family in FAMILIES:
        assert registry.names(family), f"no {family} registered"


@pytest.mark.parametrize(("family", "name"), registered(*FAMILIES))
def test_config_round_trip(family: str, name: str) -> None:
    obj = build(family, name)
    config = obj.get_config()
    clone = registry.build_spec(family, [name, config])
    assert type(clone) is type(obj)
    assert clone.get_config() == config


# ---- modules ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("family", "name"), registered("module"))
def test_module_preserves_specs(family: str, name: str, dtype: Any) -> None:
    module = build(family, name)
    for seed in range(3):
        grads = gradients(dtype, seed)
        out = module.run(grads)
        assert out.specs() == grads.specs()
        assert out.is_finite()


def run_steps(module: Any, seeds: range) -> list[Vector]:
    return [module.run(gradients(np.float64, seed)) for seed in seeds]


@pytest.mark.parametrize(("family", "name"), registered("module"))
def test_module_resumes_bit_identically(family: str, name: str) -> None:
    module = build(family, name)
    run_steps(module, range(3))
    snapshot = module.get_state()
    expected = run_steps(module, range(3, 5))
    resumed = registry.build_spec(family, [name, module.get_config()])
    resumed.set_state(snapshot)
    for got, want in zip(run_steps(resumed, range(3, 5)), expected, strict=True):
        assert got.array_equal(want)


@pytest.mark.parametrize(("family", "name"), registered("module", "regularizer"))
def test_state_survives_protobuf_bytes(family: str, name: str) -> None:
    obj = build(family, name)
    fresh = obj.get_state()  # works before the first step
    assert states_equal(state_from_bytes(state_to_bytes(fresh)), fresh)
    weights = gradients(np.float64, 99)
    for seed in range(3):
        if family == "module":
            obj.run(gradients(np.float64, seed))
        else:
            obj.run(gradients(np.float64, seed), weights + float(seed))
    state = obj.get_state()
    decoded = state_from_bytes(state_to_bytes(state))
    assert states_equal(decoded, state)
    resumed = registry.build_spec(family, [name, obj.get_config()])
    resumed.set_state(decoded)
    assert states_equal(resumed.get_state(), state)


# ---- regularizers and schedulers --------------------------------------------------------------


@pytest.mark.parametrize(("family", "name"), registered("regularizer"))
def test_regularizer_preserves_specs(family: str, name: str) -> None:
    regularizer = build(family, name)
    grads = gradients(np.float32, 0)
    out = regularizer.run(grads, gradients(np.float32, 1))
    assert out.specs() == grads.specs()


@pytest.mark.parametrize(("family", "name"), registered("scheduler"))
def test_scheduler_is_a_pure_function_of_the_step(family: str, name: str) -> None:
    scheduler = build(family, name)
    clone = registry.build_spec(family, [name, scheduler.get_config()])
    values = [scheduler.value(step) for step in range(20)]
    assert all(isinstance(v, float) and v >= 0 for v in values)
    assert [clone.value(step) for step in range(20)] == values
    assert [scheduler.value(step) for step in range(20)] == values


# ---- aggregators ------------------------------------------------------------------------------


def aggregate_on_server(aggregator: Any, updates: list[Vector], scales: list[float]) -> Vector:
    """What the round loop does: prepare on each client, admit (scaled) and fold on the
    server. An aggregator that compares with a server update (FLTrust) gets the first one."""
    if getattr(aggregator, "server_update", False) is None:
        aggregator.server_update = updates[0].copy()
    partials = [aggregator.prepare(u.copy(), 10 + i, 1) for i, u in enumerate(updates)]
    return aggregator.aggregate(
        aggregator.admit(p, s) for p, s in zip(partials, scales, strict=True)
    )


@pytest.mark.parametrize(("family", "name"), registered("aggregator"))
def test_every_aggregator_returns_a_consensus_update_as_it_is(family: str, name: str) -> None:
    """Five clients sending the same update: the global update is that update (``sum``: five
    times it), whatever the aggregator's arithmetic."""
    update = gradients(np.float64, 4)
    got = aggregate_on_server(build(family, name), [update] * 5, [1.0] * 5)
    want = update * (5.0 if name == "sum" else 1.0)
    assert got.specs() == update.specs()
    assert got.allclose(want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("family", "name"), registered("aggregator"))
def test_every_aggregator_admits_a_scaled_update_with_its_norm_scaled(
    family: str, name: str
) -> None:
    """``admit(partial, scale)`` (update validation's down-weighting) scales the update the
    server counts, as ``update_norm`` reads it, by ``scale``."""
    aggregator = build(family, name)
    update = gradients(np.float64, 5)
    partial = aggregator.prepare(update.copy(), 10, 1)
    assert aggregator.update_norm(partial) == pytest.approx(update.norm(), rel=1e-12)
    admitted = aggregator.admit(partial, 0.25)
    assert aggregator.update_norm(admitted) == pytest.approx(0.25 * update.norm(), rel=1e-12)
