"""The Optimizer: update formula, config and state round trips, aux-var routing, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedpipe.common.codec import state_from_bytes, state_to_bytes
from fedpipe.common.modules import AdamModule, AuxVarError
from fedpipe.common.optim import BareWeights, Optimizer
from fedpipe.common.registry import UnknownNameError
from fedpipe.common.summable import Summable
from fedpipe.common.vector import Vector


def vec(*values: float) -> Vector:
    return Vector({"w": np.array(values, dtype=np.float64)})


def test_plain_sgd_update() -> None:
    model = BareWeights(vec(1.0, -2.0))
    Optimizer(lrate=0.1).apply(model, vec(0.5, -1.0))
    np.testing.assert_allclose(model.get_weights()["w"], [0.95, -1.9])


def test_server_fedavg_is_lrate_one_without_modules() -> None:
    # aggregated client updates as gradients; lrate=1 applies them as they are
    weights, updates = vec(1.0, 2.0), vec(0.25, -0.5)
    out = Optimizer(lrate=1.0).compute_updates(BareWeights(weights), updates)
    np.testing.assert_allclose(out["w"], [-0.25, 0.5])


def test_decoupled_weight_decay() -> None:
    model = BareWeights(vec(1.0, -2.0))
    # -lr * (g + w_decay * w) = -0.1 * ([0.5, 0.5] + 0.5 * [1, -2]) = [-0.1, 0.05]
    out = Optimizer(lrate=0.1, w_decay=0.5).compute_updates(model, vec(0.5, 0.5))
    np.testing.assert_allclose(out["w"], [-0.1, 0.05])


def test_weight_decay_bypasses_the_modules() -> None:
    model = BareWeights(vec(1.0, -2.0))
    optimizer = Optimizer(lrate=0.1, w_decay=0.5, modules=[["adam", {"eps": 0.0}]])
    # Adam's first output is g / |g| = 1, the decay is added after it:
    # -0.1 * (1 + 0.5 * [1, -2]) = [-0.15, 0.0]
    out = optimizer.compute_updates(model, vec(0.5, 0.5))
    np.testing.assert_allclose(out["w"], [-0.15, 0.0], atol=1e-15)


def test_regularizers_run_before_modules() -> None:
    model = BareWeights(vec(2.0))
    optimizer = Optimizer(lrate=1.0, regularizers=[["ridge", {"alpha": 0.25}]])
    # g + 2 * 0.25 * w = 1 + 1 = 2
    np.testing.assert_allclose(optimizer.compute_updates(model, vec(1.0))["w"], [-2.0])


def test_scheduler_is_driven_by_the_step_count() -> None:
    optimizer = Optimizer(lrate=["piecewise", {"boundaries": [2], "values": [1.0, 0.1]}])
    model = BareWeights(vec(0.0))
    rates = [-float(optimizer.compute_updates(model, vec(1.0))["w"][0]) for _ in range(4)]
    assert rates == [1.0, 1.0, 0.1, 0.1]
    assert optimizer.get_state()["step"] == 4


def test_float32_stays_float32() -> None:
    model = BareWeights(Vector({"w": np.ones(3, np.float32)}))
    optimizer = Optimizer(lrate=0.1, w_decay=0.01, regularizers=["fedprox"], modules=["adam"])
    out = optimizer.compute_updates(model, Vector({"w": np.ones(3, np.float32)}))
    assert out.specs() == model.get_weights().specs()


def test_start_round_sets_the_fedprox_anchor() -> None:
    optimizer = Optimizer(lrate=1.0, regularizers=[["fedprox", {"mu": 1.0}]])
    optimizer.start_round(vec(1.0))
    out = optimizer.compute_updates(BareWeights(vec(3.0)), vec(0.0))
    np.testing.assert_allclose(out["w"], [-2.0])  # -(mu * (3 - 1))


FULL_CONFIG = {
    "lrate": ["warmup", {"scheduler": ["cosine-annealing", {"initial": 0.1}], "steps": 2}],
    "w_decay": 0.01,
    "regularizers": [["fedprox", {"mu": 0.1}], "lasso"],
    "modules": [
        "scaffold-client",
        ["adam", {"amsgrad": True}],
        ["l2-global-clipping", {"max_norm": 0.5}],
        ["gaussian-noise", {"std": 0.01}],
    ],
}


def test_config_round_trip() -> None:
    optimizer = Optimizer.from_config(FULL_CONFIG)
    config = optimizer.get_config()
    assert json.loads(json.dumps(config)) == config  # plain data
    assert config["lrate"] == [
        "warmup",
        {
            "scheduler": ["cosine-annealing", {"initial": 0.1, "decay_steps": 1000, "final": 0.0}],
            "steps": 2,
        },
    ]
    assert config["regularizers"] == [["fedprox", {"mu": 0.1}], ["lasso", {"alpha": 0.01}]]
    assert [name for name, _ in config["modules"]] == [
        "scaffold-client",
        "adam",
        "l2-global-clipping",
        "gaussian-noise",
    ]
    assert Optimizer.from_config(config).get_config() == config
    assert Optimizer(lrate=0.5).get_config() == {
        "lrate": 0.5,
        "w_decay": 0.0,
        "regularizers": [],
        "modules": [],
    }


def test_instances_are_accepted_as_modules() -> None:
    adam = AdamModule(beta_1=0.5)
    optimizer = Optimizer(modules=[adam])
    assert optimizer.modules[0] is adam
    assert optimizer.get_config()["modules"][0][1]["beta_1"] == 0.5


def steps(optimizer: Optimizer, model: BareWeights, n: int, seed: int) -> list[Vector]:
    rng = np.random.default_rng(seed)
    weights = []
    for _ in range(n):
        grads = Vector({"w": rng.normal(size=(3, 2)), "b": rng.normal(size=2)})
        optimizer.apply(model, grads)
        weights.append(model.get_weights().copy())  # updated in place
    return weights


def test_state_resume_is_bit_identical() -> None:
    def start() -> BareWeights:
        return BareWeights(Vector({"w": np.ones((3, 2)), "b": np.zeros(2)}))

    optimizer, model = Optimizer.from_config(FULL_CONFIG), start()
    optimizer.start_round(model.get_weights())
    steps(optimizer, model, 3, seed=0)
    snapshot = state_from_bytes(state_to_bytes(optimizer.get_state()))
    saved_weights = model.get_weights().copy()
    expected = steps(optimizer, model, 3, seed=1)

    resumed, model = Optimizer.from_config(optimizer.get_config()), start()
    model.master = saved_weights
    resumed.set_state(snapshot)
    assert resumed.step == 3
    for got, want in zip(steps(resumed, model, 3, seed=1), expected, strict=True):
        assert got.array_equal(want)


def test_set_state_rejects_another_pipeline() -> None:
    state = Optimizer(modules=["adam", "momentum"]).get_state()
    with pytest.raises(ValueError, match=r"\['adam', 'momentum'\], but this optimizer has"):
        Optimizer(modules=["adam"]).set_state(state)
    with pytest.raises(ValueError, match="different pipeline"):
        Optimizer(modules=["momentum", "adam"]).set_state(state)


def test_unknown_module_name_lists_known_names() -> None:
    with pytest.raises(
        UnknownNameError, match=r"unknown module 'adamw'; known module names: .*adam"
    ):
        Optimizer(modules=["adamw"])


def test_aux_vars_are_routed_by_aux_name() -> None:
    client = Optimizer(modules=["scaffold-client", "adam"])
    client.compute_updates(BareWeights(vec(0.0, 0.0)), vec(1.0, 3.0))
    collected = client.collect_aux_var()
    assert list(collected) == ["scaffold"]
    assert collected["scaffold"].vector("delta").array_equal(vec(1.0, 3.0))
    client.process_aux_var({"scaffold": Summable({"global_state": vec(0.5, 0.5)})})
    scaffold_state = client.get_state()["modules"][0]["state"]  # type: ignore[index]
    assert scaffold_state["global_state"].array_equal(vec(0.5, 0.5))  # type: ignore[call-overload]


def test_unknown_aux_var_names_the_known_ones() -> None:
    optimizer = Optimizer(modules=["scaffold-client"])
    with pytest.raises(AuxVarError, match=r"'secagg'; known aux-var names: \['scaffold'\]"):
        optimizer.process_aux_var({"secagg": Summable({"x": 1})})


def test_two_modules_with_one_aux_name_are_rejected() -> None:
    with pytest.raises(ValueError, match="both use aux-var name 'scaffold'"):
        Optimizer(modules=["scaffold-client", "scaffold-server"])


def test_negative_w_decay_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"w_decay=-1\.0"):
        Optimizer(w_decay=-1.0)


def test_consumed_gradients_are_scaled_in_place_only_when_safe() -> None:
    plain = Optimizer(lrate=0.5)
    g = vec(2.0, -4.0)
    updates = plain.compute_updates(BareWeights(vec(0.0, 0.0)), g, consume=True)
    assert updates is g and np.array_equal(updates["w"], [-1.0, 2.0])  # no new allocation

    kept = vec(2.0, -4.0)
    plain.compute_updates(BareWeights(vec(0.0, 0.0)), kept)  # not consumed: left alone
    assert np.array_equal(kept["w"], [2.0, -4.0])

    momentum = Optimizer(lrate=0.5, modules=["momentum"])
    g = vec(2.0, -4.0)
    first = momentum.compute_updates(BareWeights(vec(0.0, 0.0)), g, consume=True)
    second = momentum.compute_updates(BareWeights(vec(0.0, 0.0)), vec(0.0, 0.0), consume=True)
    # the module's output is its own buffer: scaling it in place would corrupt its state
    assert np.array_equal(first["w"], [-1.0, 2.0])
    assert np.array_equal(second["w"], [-0.9, 1.8])  # 0.9 * buffer, buffer intact
