"""A client's local training: the batches it draws (max_steps, epochs, shuffles) and the
weight FedAvg gives its update."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedpipe.common import registry
from fedpipe.common.data import Dataset
from fedpipe.common.optim import BareWeights, Optimizer
from fedpipe.common.training import LocalTrainer, RunSetup, TrainResult, build_model
from fedpipe.common.vector import Vector


def dataset(n: int, offset: int = 0) -> Dataset:
    """``n`` rows whose first feature is the row's index (so a batch names its rows)."""
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    x[:, 0] = np.arange(offset, offset + n)
    return Dataset(x, rng.integers(0, 3, size=n))


def setup(aggregator: Any = "averaging", **training: Any) -> RunSetup:
    return RunSetup(
        model={"name": "softmax-regression", "config": {"n_features": 4, "n_classes": 3}},
        client_optimizer={"lrate": 0.1},
        aggregator=aggregator,
        metrics=["loss"],
        training=training,
        seed=5,
    )


def start_weights() -> Vector:
    rng = np.random.default_rng(0)
    return Vector(
        {"kernel": rng.normal(size=(4, 3)).astype(np.float32), "bias": np.zeros(3, np.float32)}
    )


def batches_seen(
    run: RunSetup, data: Dataset, round_number: int = 1
) -> tuple[list[list[int]], TrainResult]:
    """The rows of each batch the model computed gradients on, and the train result."""
    model = build_model(run)
    rows: list[list[int]] = []
    compute = model.compute_batch_gradients

    def recording(x: np.ndarray, y: np.ndarray) -> Any:
        rows.append([int(v) for v in x[:, 0]])
        return compute(x, y)

    model.compute_batch_gradients = recording  # type: ignore[method-assign]
    trainer = LocalTrainer(run, model=model)
    result = trainer.train(data, start_weights(), {}, client="site-0", round_number=round_number)
    return rows, result


def flat(batches: list[list[int]]) -> list[int]:
    return [row for batch in batches for row in batch]


def test_max_steps_runs_on_across_epoch_boundaries() -> None:
    # 10 rows, batches of 4: 3 steps per epoch (4, 4, 2); max_steps=5 stops 2 steps into the
    # second epoch, whose order is a fresh permutation
    rows, result = batches_seen(setup(epochs=3, max_steps=5, batch_size=4), dataset(10))
    assert [len(b) for b in rows] == [4, 4, 2, 4, 4]
    assert sorted(flat(rows[:3])) == list(range(10))  # epoch 1: every row once
    assert len(set(rows[3] + rows[4])) == 8  # epoch 2 began: 8 distinct rows
    assert result.n_steps == 5 and result.n_samples_seen == 18 and result.n_samples == 10


def test_each_epoch_draws_a_fresh_shuffle() -> None:
    rows, result = batches_seen(setup(epochs=3, batch_size=4), dataset(10))
    epochs = [flat(rows[3 * e : 3 * e + 3]) for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(10))
    assert len({tuple(order) for order in epochs}) == 3  # three different orders
    assert result.n_steps == 9 and result.n_samples_seen == 30
    again, _ = batches_seen(setup(epochs=3, batch_size=4), dataset(10))
    assert again == rows  # seeded by run seed, client and round
    other_round, _ = batches_seen(setup(epochs=3, batch_size=4), dataset(10), round_number=2)
    assert other_round != rows


def test_fedavg_weights_each_update_by_the_clients_dataset_size() -> None:
    # FedAvg (McMahan et al. 2017): w <- w - sum_k n_k / n * (w - w_k), n_k = local samples
    sizes = (10, 30)
    data = [dataset(sizes[0]), dataset(sizes[1], offset=100)]
    raw = [
        LocalTrainer(setup("sum", batch_size=5)).train(
            d, start_weights(), {}, client=f"site-{i}", round_number=1
        )
        for i, d in enumerate(data)
    ]
    updates = [r.partial.vector("sum") for r in raw]  # start - end, unweighted
    partials = [
        LocalTrainer(setup("averaging", batch_size=5))
        .train(d, start_weights(), {}, client=f"site-{i}", round_number=1)
        .partial
        for i, d in enumerate(data)
    ]
    assert [p.number("total_weight") for p in partials] == [10.0, 30.0]
    aggregated = registry.build("aggregator", "averaging").aggregate(iter(partials))
    model = BareWeights(start_weights())
    Optimizer(lrate=1.0).apply(model, aggregated)  # server FedAvg: lrate 1, no module
    expected = start_weights() - (updates[0] * 10.0 + updates[1] * 30.0) / 40.0
    assert model.get_weights().allclose(expected, rtol=1e-6, atol=1e-7)
    uniform = start_weights() - (updates[0] + updates[1]) / 2.0
    assert not model.get_weights().allclose(uniform, rtol=1e-3, atol=1e-4)
