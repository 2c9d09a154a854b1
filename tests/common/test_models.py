"""Built-in numpy models: gradients, heads, weights plumbing, loading, a real training run."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedpipe.common import registry
from fedpipe.common.data import load_builtin
from fedpipe.common.models import (
    MLP,
    LinearRegression,
    LogisticRegression,
    Model,
    SoftmaxRegression,
    load_model,
)
from fedpipe.common.plugins import PluginError
from fedpipe.common.registry import UnknownNameError
from fedpipe.common.vector import SpecMismatchError, Vector

# Every built-in model, in every head configuration it supports.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("linear-regression", {"n_features": 4}),
    ("linear-regression", {"n_features": 4, "n_outputs": 3}),
    ("logistic-regression", {"n_features": 4}),
    ("softmax-regression", {"n_features": 4, "n_classes": 3}),
    ("mlp", {"n_features": 4, "hidden": [6, 5], "n_classes": 3}),
    ("mlp", {"n_features": 4, "hidden": [6], "task": "binary"}),
    ("mlp", {"n_features": 4, "hidden": [5], "task": "regression", "n_outputs": 2}),
    ("mlp", {"n_features": 4, "hidden": [], "task": "regression"}),
]
IDS = [f"{name}-{i}" for i, (name, _) in enumerate(CASES)]


def make_model(name: str, config: dict[str, Any], dtype: str = "float64") -> Model:
    model = load_model(name, {**config, "dtype": dtype, "seed": 3})
    # move off the initial point (zero biases) so that every term of the gradient matters
    rng = np.random.default_rng(7)
    model.apply_updates(model.get_weights().apply(lambda a: 0.3 * rng.standard_normal(a.shape)))
    return model


def make_batch(model: Model, n: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, model.get_config()["n_features"]))
    z = model.predict(x)
    if model.task == "regression":
        y = rng.standard_normal(z.shape)
    elif model.task == "binary":
        y = rng.integers(0, 2, n)
    else:
        y = rng.integers(0, z.shape[1], n)
    return x, y


def test_cases_cover_every_builtin_model() -> None:
    builtin = {
        name
        for name in registry.names("model")
        if registry.get_class("model", name).__module__.startswith("fedpipe.common.models")
    }
    assert builtin == {name for name, _ in CASES}


@pytest.mark.parametrize(("name", "config"), CASES, ids=IDS)
def test_gradients_match_central_finite_differences(name: str, config: dict[str, Any]) -> None:
    model = make_model(name, config)
    x, y = make_batch(model)
    grads, loss = model.compute_batch_gradients(x, y)
    assert loss == pytest.approx(model.loss(x, y), rel=1e-12)
    assert grads.specs() == model.weight_specs()
    eps = 1e-6
    weights = model.get_weights()
    for key, array in weights.coefs.items():
        numeric = np.zeros_like(array)
        for i in np.ndindex(array.shape):
            shifted = {"+": weights.copy(), "-": weights.copy()}
            shifted["+"].coefs[key][i] += eps
            shifted["-"].coefs[key][i] -= eps
            model.set_weights(shifted["+"])
            up = model.loss(x, y)
            model.set_weights(shifted["-"])
            down = model.loss(x, y)
            numeric[i] = (up - down) / (2 * eps)
        model.set_weights(weights)
        np.testing.assert_allclose(grads[key], numeric, rtol=1e-5, atol=1e-8, err_msg=key)


@pytest.mark.parametrize(("name", "config"), CASES, ids=IDS)
def test_config_round_trip_rebuilds_the_same_model(name: str, config: dict[str, Any]) -> None:
    model = load_model(name, config)
    again = type(model).from_config(model.get_config())
    assert again.get_config() == model.get_config()
    assert again.get_weights().array_equal(model.get_weights())
    other_seed = load_model(name, {**config, "seed": 1})
    assert not other_seed.get_weights().array_equal(model.get_weights())


@pytest.mark.parametrize(("name", "config"), CASES, ids=IDS)
def test_weights_default_to_float32_and_gradients_keep_the_dtype(
    name: str, config: dict[str, Any]
) -> None:
    model = load_model(name, config)
    assert {s.dtype for s in model.weight_specs().values()} == {"float32"}
    x, y = make_batch(model)
    grads, loss = model.compute_batch_gradients(x, y)  # float64 inputs are cast
    assert grads.specs() == model.weight_specs()
    assert isinstance(loss, float) and np.isfinite(loss)


@pytest.mark.parametrize(("name", "config"), CASES, ids=IDS)
def test_weights_are_copied_in_and_out_and_validated(name: str, config: dict[str, Any]) -> None:
    model = load_model(name, config)
    weights = model.get_weights()
    weights.coefs[next(iter(weights))] += 1.0
    assert not model.get_weights().array_equal(weights)  # get_weights gave a copy
    model.set_weights(weights)
    assert model.get_weights().array_equal(weights)
    weights.coefs[next(iter(weights))] += 1.0
    assert not model.get_weights().array_equal(weights)  # set_weights copied
    before = model.get_weights()
    model.apply_updates(before.full_like(0.5))
    assert model.get_weights().allclose(before + 0.5)
    bad = Vector({k: np.zeros((*a.shape, 1), a.dtype) for k, a in before.coefs.items()})
    with pytest.raises(SpecMismatchError, match="has shape"):
        model.set_weights(bad)
    with pytest.raises(SpecMismatchError, match="dtype"):
        model.apply_updates(before.apply(lambda a: a.astype(np.float64)))


def test_weight_specs_follow_a_model_that_replaces_its_weights() -> None:
    model = load_model("softmax-regression", {"n_features": 4, "n_classes": 3})
    specs = model.weight_specs()
    specs.clear()  # a copy: the model's own specs are not touched
    assert model.weight_specs()["kernel"].shape == (4, 3)
    model._weights = {"kernel": np.zeros((5, 3), np.float32), "bias": np.zeros(3, np.float32)}
    assert model.weight_specs()["kernel"].shape == (5, 3)
    with pytest.raises(SpecMismatchError, match=r"'kernel' has shape \(4, 3\), expected \(5, 3\)"):
        model.set_weights(Vector({"kernel": np.zeros((4, 3), np.float32), "bias": np.zeros(3)}))


@pytest.mark.parametrize(("name", "config"), CASES, ids=IDS)
def test_predict_shapes_follow_the_task(name: str, config: dict[str, Any]) -> None:
    model = load_model(name, config)
    x = np.random.default_rng(0).standard_normal((5, 4))
    p = model.predict(x)
    if model.task == "binary":
        assert p.shape == (5,) and np.all((p > 0) & (p < 1))
    elif model.task == "multiclass":
        assert p.shape == (5, 3)
        np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    else:
        k = config.get("n_outputs", 1)
        assert p.shape == ((5,) if k == 1 else (5, k))


def test_losses_at_known_points() -> None:
    x = np.array([[1.0, 2.0], [3.0, 4.0]])
    linear = LinearRegression(2, dtype="float64")
    linear.set_weights(Vector({"kernel": np.array([[1.0], [0.0]]), "bias": np.array([1.0])}))
    # predictions 2 and 4 against targets 0 and 1: 0.5 * mean(4, 9)
    assert linear.loss(x, np.array([0.0, 1.0])) == pytest.approx(3.25)
    logistic = LogisticRegression(2, dtype="float64")
    logistic.set_weights(logistic.get_weights().zeros_like())
    assert logistic.loss(x, np.array([0, 1])) == pytest.approx(np.log(2))
    softmax = SoftmaxRegression(2, n_classes=5, dtype="float64")
    softmax.set_weights(softmax.get_weights().zeros_like())
    assert softmax.loss(x, np.array([0, 4])) == pytest.approx(np.log(5))


def test_classification_losses_are_stable_for_huge_logits() -> None:
    x = np.array([[1.0], [-1.0]])
    logistic = LogisticRegression(1, dtype="float64")
    logistic.set_weights(Vector({"kernel": np.array([1e4]), "bias": np.array([0.0])}))
    assert logistic.loss(x, np.array([1, 0])) == pytest.approx(0.0, abs=1e-12)
    assert logistic.loss(x, np.array([0, 1])) == pytest.approx(1e4)
    grads, _ = logistic.compute_batch_gradients(x, np.array([0, 1]))
    assert grads.is_finite()
    softmax = SoftmaxRegression(1, n_classes=2, dtype="float64")
    softmax.set_weights(Vector({"kernel": np.array([[1e4, -1e4]]), "bias": np.zeros(2)}))
    assert softmax.loss(x, np.array([1, 0])) == pytest.approx(2e4)
    assert np.isfinite(softmax.predict(x)).all()


def test_bad_inputs_and_targets_are_rejected_with_the_reason() -> None:
    softmax = SoftmaxRegression(3, n_classes=4)
    x = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"expects inputs of shape \(n, 3\), got \(2, 5\)"):
        softmax.predict(np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"class ids in \[0, 3\]"):
        softmax.compute_batch_gradients(x, np.array([0, 4]))
    with pytest.raises(ValueError, match="class ids"):
        softmax.loss(x, np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"class ids in \[0, 1\]"):
        LogisticRegression(3).loss(x, np.array([0, 2]))
    with pytest.raises(ValueError, match="got 3 targets for 2 inputs"):
        LinearRegression(3).loss(x, np.zeros(3))
    with pytest.raises(ValueError, match="n_classes >= 2"):
        MLP(3, task="multiclass")
    with pytest.raises(ValueError, match="task='ranking'"):
        MLP(3, task="ranking", n_classes=2)


def test_mlp_uses_he_initialization() -> None:
    model = MLP(400, hidden=[300], n_classes=10, dtype="float64")
    kernel = model.get_weights()["kernel_0"]
    assert kernel.std() == pytest.approx(np.sqrt(2 / 400), rel=0.02)
    assert not model.get_weights()["bias_0"].any()


def test_load_model_by_name_lists_known_names_when_unknown() -> None:
    model = load_model("softmax-regression", {"n_features": 2, "n_classes": 3})
    assert isinstance(model, SoftmaxRegression)
    with pytest.raises(UnknownNameError, match=r"known model names: .*linear-regression"):
        load_model("resnet-9000", {})
    with pytest.raises(TypeError, match="invalid config for model 'mlp'"):
        load_model("mlp", {"n_features": 2, "widths": [3]})


def test_load_model_from_an_import_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "user_models.py").write_text(
        textwrap.dedent(
            """
            from fedpipe.common.models import LinearRegression

            def build(n_features):
                return LinearRegression(n_features, n_outputs=2)

            def broken():
                return [1, 2, 3]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = load_model("user_models:build", {"n_features": 5})
    assert isinstance(model, LinearRegression) and model.n_outputs == 2
    with pytest.raises(TypeError, match=r"returned builtins\.list .*expected a fedpipe Model"):
        load_model("user_models:broken", {})
    with pytest.raises(PluginError, match="has no attribute 'missing'"):
        load_model("user_models:missing", {})
    with pytest.raises(PluginError, match="cannot import the module"):
        load_model("no_such_package_xyz:build", {})


def test_softmax_regression_learns_digits_with_plain_sgd() -> None:
    train, test = load_builtin("digits").split(0.8, seed=0)
    model = SoftmaxRegression(64, n_classes=10, seed=0)
    rng = np.random.default_rng(0)
    for _ in range(15):
        for x, y in train.batches(32, seed=rng):
            grads, _ = model.compute_batch_gradients(x, y)
            model.apply_updates(grads * -0.5)
    accuracy = np.mean(np.argmax(model.predict(test.x), axis=1) == test.y)
    assert accuracy > 0.9


def test_weights_view_is_live_and_read_only() -> None:
    from fedpipe.common.models import load_model

    model = load_model("linear-regression", {"n_features": 3})
    view = model.get_weights(copy=False)
    copy = model.get_weights()
    model.apply_updates(copy.full_like(1.0))
    assert np.allclose(view["kernel"], copy["kernel"] + 1.0)  # sees the update
    with pytest.raises(ValueError, match="read-only"):
        view["kernel"][0] = 5.0


@pytest.mark.parametrize(
    "name, config",
    [
        ("softmax-regression", {"n_features": 4, "n_classes": 3}),
        ("mlp", {"n_features": 4, "hidden": [5], "n_classes": 3}),
        ("logistic-regression", {"n_features": 4}),
    ],
)
def test_evaluate_equals_loss_and_predict(name: str, config: dict) -> None:
    from fedpipe.common.models import load_model

    model = load_model(name, config)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    y = rng.integers(0, 2 if name == "logistic-regression" else 3, size=6)
    loss, predictions = model.evaluate(x, y)
    assert loss == pytest.approx(model.loss(x, y), rel=1e-6)
    assert np.allclose(predictions, model.predict(x))
