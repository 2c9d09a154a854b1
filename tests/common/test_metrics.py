"""Metrics: values on hand-computed examples, exact merging across clients, MetricSet."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedpipe.common import registry
from fedpipe.common.metrics import (
    Accuracy,
    LossMetric,
    MeanAbsoluteError,
    MeanSquaredError,
    Metric,
    MetricSet,
    PrecisionRecallF1,
    R2Score,
)
from fedpipe.common.summable import Summable

# A config for every registered metric, and data of the kind it measures.
CONFIGS: dict[str, dict[str, Any]] = {
    "loss": {},
    "accuracy": {},
    "precision-recall-f1": {"n_classes": 4, "average": "macro"},
    "mse": {},
    "mae": {},
    "r2": {"n_outputs": 2},
}


def sample(name: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if name in ("mse", "mae", "r2"):
        y = rng.standard_normal((n, 2)) * 3 + 1
        return y, y + rng.standard_normal((n, 2))
    y = rng.integers(0, 4, n)
    logits = rng.standard_normal((n, 4)) + 2 * np.eye(4)[y]
    return y, np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def shards(name: str, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, float]]:
    rng = np.random.default_rng(seed)
    return [(*sample(name, n, rng), float(rng.random())) for n in (13, 40, 7)]


def test_configs_cover_every_registered_metric() -> None:
    assert set(CONFIGS) == set(registry.names("metric"))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_merged_client_states_equal_the_metric_of_the_union(name: str) -> None:
    parts = shards(name)
    states = []
    for y, p, loss in parts:
        metric = registry.build("metric", name, CONFIGS[name])
        for start in range(0, len(y), 5):  # several batches per client
            metric.update(y[start : start + 5], p[start : start + 5], loss)
        states.append(metric.state())
    merged: Summable = states[0] + states[1] + states[2]
    union = registry.build("metric", name, CONFIGS[name])
    for y, p, loss in parts:
        union.update(y, p, loss)
    expected = union.result()
    got = union.result(merged)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_round_trip_state_copies_reset_and_empty_result(name: str) -> None:
    metric: Metric = registry.build("metric", name, CONFIGS[name])
    assert all(np.isnan(v) for v in metric.result().values())
    rebuilt = type(metric).from_config(metric.get_config())
    assert rebuilt.get_config() == metric.get_config()
    y, p, loss = shards(name)[0]
    metric.update(y, p, loss)
    state = metric.state()
    before = metric.result()
    metric.update(y, p, loss)
    assert metric.result(state) == before  # state() is a snapshot
    metric.reset()
    assert all(np.isnan(v) for v in metric.result().values())


def test_accuracy_thresholds_binary_and_argmaxes_multiclass() -> None:
    metric = Accuracy()
    metric.update(np.array([1, 0, 1, 0]), np.array([0.9, 0.2, 0.4, 0.5]))
    assert metric.result() == {"accuracy": 0.5}
    metric.reset()
    metric.update(
        np.array([2, 0, 1]), np.array([[0.1, 0.2, 0.7], [0.5, 0.4, 0.1], [0.6, 0.3, 0.1]])
    )
    assert metric.result()["accuracy"] == pytest.approx(2 / 3)
    metric.reset()
    metric.update(np.array([3, 1]), np.array([3, 2]))  # integer predictions are class ids
    assert metric.result() == {"accuracy": 0.5}


def test_precision_recall_f1_by_hand() -> None:
    y = np.array([1, 1, 1, 0, 0, 2])
    pred = np.array([1, 1, 0, 1, 0, 1])
    binary = PrecisionRecallF1()
    binary.update(np.array([1, 1, 1, 0, 0]), np.array([0.9, 0.8, 0.1, 0.7, 0.2]))
    # class 1: tp 2, fp 1, fn 1
    assert binary.result() == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3})
    macro = PrecisionRecallF1(n_classes=5)
    macro.update(y, pred)
    # class 0: tp 1 fp 1 fn 1; class 1: tp 2 fp 2 fn 1; class 2: tp 0 fp 0 fn 1 (3, 4 absent)
    precision = np.mean([1 / 2, 2 / 4, 0])
    recall = np.mean([1 / 2, 2 / 3, 0])
    f1 = np.mean([2 / 4, 4 / 7, 0])
    assert macro.result() == pytest.approx({"precision": precision, "recall": recall, "f1": f1})
    micro = PrecisionRecallF1(n_classes=5, average="micro")
    micro.update(y, pred)
    assert micro.result() == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5})


def test_precision_recall_f1_matches_scikit_learn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 6, 300), rng.integers(0, 6, 300)
    y[y == 5] = 4  # class 5 only ever predicted
    for average in ("macro", "micro"):
        metric = PrecisionRecallF1(n_classes=6, average=average)
        metric.update(y, p)
        ref = metrics.precision_recall_fscore_support(y, p, average=average, zero_division=0)
        assert metric.result() == pytest.approx(
            dict(zip(("precision", "recall", "f1"), ref[:3], strict=True))
        )
    yb, pb = rng.integers(0, 2, 100), rng.random(100)
    binary = PrecisionRecallF1()
    binary.update(yb, pb)
    assert binary.result()["f1"] == pytest.approx(metrics.f1_score(yb, pb >= 0.5))


def test_precision_recall_f1_rejects_labels_beyond_n_classes() -> None:
    metric = PrecisionRecallF1(n_classes=3)
    with pytest.raises(ValueError, match=r"targets hold class ids outside \[0, 2\]; set n_classes"):
        metric.update(np.array([0, 3]), np.array([0, 1]))
    with pytest.raises(ValueError, match="average='binary' needs n_classes=2"):
        PrecisionRecallF1(n_classes=3, average="binary")


def test_regression_metrics_by_hand() -> None:
    y = np.array([1.0, 2.0, 3.0, 4.0])
    p = np.array([1.5, 2.0, 2.0, 4.0])
    values: dict[str, float] = {}
    for metric in (MeanSquaredError(), MeanAbsoluteError(), R2Score()):
        metric.update(y, p)
        values.update(metric.result())
    # residuals 0.5, 0, -1, 0; SS_tot = 5
    assert values == pytest.approx({"mse": 1.25 / 4, "mae": 1.5 / 4, "r2": 1 - 1.25 / 5})
    constant = R2Score()
    constant.update(np.ones(3), np.ones(3))
    assert constant.result() == {"r2": 1.0}
    constant.update(np.ones(1), np.zeros(1))
    assert constant.result() == {"r2": 0.0}


def test_regression_metrics_match_scikit_learn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(2)
    y = rng.standard_normal((50, 3))
    p = y + 0.5 * rng.standard_normal((50, 3))
    mse, mae, r2 = MeanSquaredError(), MeanAbsoluteError(), R2Score(n_outputs=3)
    for metric in (mse, mae, r2):
        metric.update(y, p)
    assert mse.result()["mse"] == pytest.approx(metrics.mean_squared_error(y, p), rel=1e-12)
    assert mae.result()["mae"] == pytest.approx(metrics.mean_absolute_error(y, p), rel=1e-12)
    assert r2.result()["r2"] == pytest.approx(metrics.r2_score(y, p), rel=1e-12)


def test_regression_shapes_must_match() -> None:
    with pytest.raises(ValueError, match="do not match predictions"):
        MeanSquaredError().update(np.zeros((4, 2)), np.zeros(4))
    with pytest.raises(ValueError, match="built for 1 outputs, got 2; set n_outputs"):
        R2Score().update(np.zeros((4, 2)), np.zeros((4, 2)))
    # (n,) targets against (n, 1) predictions are the same thing
    mse = MeanSquaredError()
    mse.update(np.ones(3), np.zeros((3, 1)))
    assert mse.result() == {"mse": 1.0}


def test_loss_is_weighted_by_batch_size_and_required() -> None:
    metric = LossMetric()
    metric.update(np.zeros(3), np.zeros(3), loss=1.0)
    metric.update(np.zeros(1), np.zeros(1), loss=5.0)
    assert metric.result() == {"loss": 2.0}
    with pytest.raises(ValueError, match=r"needs the batch's mean loss"):
        metric.update(np.zeros(1), np.zeros(1))
    with pytest.raises(ValueError, match="3 targets but 2 predictions"):
        metric.update(np.zeros(3), np.zeros(2), loss=1.0)


def test_metric_set_builds_updates_merges_and_reports() -> None:
    specs: list[Any] = ["loss", "accuracy", ["precision-recall-f1", {"n_classes": 4}]]
    rng = np.random.default_rng(3)
    clients = []
    union = MetricSet(specs)
    for n in (10, 25, 4):
        y, p = sample("accuracy", n, rng)
        metrics = MetricSet(specs)
        metrics.update(y, p, loss=0.5)
        union.update(y, p, loss=0.5)
        clients.append(metrics.state())
    merged = MetricSet.merge(clients)
    assert set(merged) == {"loss", "accuracy", "precision-recall-f1"}
    result = union.result(merged)
    assert set(result) == {"loss", "accuracy", "precision", "recall", "f1"}
    assert result == pytest.approx(union.result(), rel=1e-12)
    assert result["loss"] == 0.5
    rebuilt = MetricSet(union.get_config())
    assert rebuilt.get_config() == union.get_config()
    union.reset()
    assert np.isnan(union.result()["accuracy"])


def test_metric_set_rejects_duplicates_and_unknown_names() -> None:
    with pytest.raises(ValueError, match="'accuracy' is listed twice"):
        MetricSet(["accuracy", "accuracy"])
    with pytest.raises(KeyError, match="known metric names: accuracy, loss, mae"):
        MetricSet(["auc"])
    with pytest.raises(ValueError, match="cannot merge metric states"):
        MetricSet.merge([MetricSet(["mse"]).state(), MetricSet(["mae"]).state()])
