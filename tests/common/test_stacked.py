"""The stacked numpy engine: K clients' gradients, steps and sums bit-equal to one by one."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedpipe.common.aggregators import AveragingAggregator
from fedpipe.common.client_job import ClientJob, batch_schedule
from fedpipe.common.data import Dataset
from fedpipe.common.models import load_model
from fedpipe.common.stacked import StackedTrainer, stacked_unfit
from fedpipe.common.training import LocalTrainer, RunSetup, round_seed
from fedpipe.common.vector import Vector

K, N, F = 4, 6, 5
MODELS: list[tuple[str, dict[str, Any], str]] = [
    ("softmax-regression", {"n_features": F, "n_classes": 3}, "classes"),
    ("logistic-regression", {"n_features": F}, "binary"),
    ("linear-regression", {"n_features": F, "n_outputs": 2}, "values"),
    ("mlp", {"n_features": F, "hidden": [7, 4], "n_classes": 3}, "classes"),
    ("mlp", {"n_features": F, "hidden": [3], "task": "binary"}, "binary"),
    ("mlp", {"n_features": F, "task": "regression", "n_outputs": 2}, "values"),
]


def targets(kind: str, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    if kind == "classes":
        return rng.integers(0, 3, shape)
    if kind == "binary":
        return rng.integers(0, 2, shape)
    return rng.standard_normal((*shape, 2)).astype(np.float32)


@pytest.mark.parametrize(("name", "config", "kind"), MODELS)
def test_stacked_gradients_are_each_clients_batch_gradients_bit_for_bit(
    name: str, config: dict[str, Any], kind: str
) -> None:
    rng = np.random.default_rng(3)
    model = load_model(name, config)
    weights = {
        n: np.stack([a + rng.standard_normal(a.shape).astype(a.dtype) for _ in range(K)])
        for n, a in model.get_weights().coefs.items()
    }
    x = rng.standard_normal((K, N, F)).astype(np.float32)
    y = targets(kind, rng, (K, N))
    grads, losses = model.compute_stacked_gradients(weights, x, y)
    for k in range(K):
        model.set_weights(Vector({n: w[k] for n, w in weights.items()}))
        one, loss = model.compute_batch_gradients(x[k], y[k])
        assert losses[k] == loss
        for n, g in one.coefs.items():
            np.testing.assert_array_equal(grads[n][k], g)


def test_stacked_targets_are_checked_like_one_clients() -> None:
    model = load_model("softmax-regression", {"n_features": F, "n_classes": 3})
    weights = {n: np.stack([a] * 2) for n, a in model.get_weights().coefs.items()}
    x = np.zeros((2, N, F), np.float32)
    with pytest.raises(ValueError, match=r"integer class ids in \[0, 2\]"):
        model.compute_stacked_gradients(weights, x, np.full((2, N), 3))
    with pytest.raises(ValueError, match=r"stacked inputs of shape \(K, n, 5\)"):
        model.compute_stacked_gradients(weights, x[0], np.zeros(N))


def setup(**training: Any) -> RunSetup:
    return RunSetup(
        model={"name": "mlp", "config": {"n_features": F, "hidden": [6], "n_classes": 3}},
        client_optimizer={
            "lrate": ["exponential-decay", {"initial": 0.1, "decay_rate": 0.9}],
            "w_decay": 0.01,
        },
        aggregator="averaging",
        metrics=["loss"],
        training={"epochs": 2, "batch_size": 4, **training},
        seed=5,
    )


def client_jobs(run: RunSetup, sizes: list[int]) -> list[ClientJob]:
    rng = np.random.default_rng(0)
    model = load_model(run.model["name"], run.model["config"])
    return [
        ClientJob(
            f"c{i}",
            LocalTrainer(run, model=model),
            Dataset(rng.standard_normal((n, F)).astype(np.float32), rng.integers(0, 3, n)),
        )
        for i, n in enumerate(sizes)
    ]


def test_stacked_training_and_sum_match_the_client_by_client_fold() -> None:
    """Different sizes (step counts, ragged last batches), a scheduled learning rate, weight
    decay, two rounds, chunks of 2: the same updates, losses, steps and weighted sum."""
    run, sizes = setup(), [9, 4, 13, 1, 7]
    stacked, alone = client_jobs(run, sizes), client_jobs(run, sizes)
    engine = StackedTrainer(stacked[0].trainer.model, max_clients=2)
    weights = stacked[0].trainer.model.get_weights()
    aggregator = AveragingAggregator()
    for round_number in (1, 2):
        total = None
        chunks = list(engine.train(stacked, weights, round_number))
        assert [len(c.n_samples) for c in chunks] == [2, 2, 1]
        rows = [(c, k) for c in chunks for k in range(len(c.n_samples))]
        expected = None
        for job, (chunk, k) in zip(alone, rows, strict=True):
            result = job.trainer.train(job.data, weights, {}, client=job.name,
                                       round_number=round_number)  # fmt: skip
            assert chunk.loss_sum[k] == result.loss_sum
            assert chunk.n_steps[k] == result.n_steps
            assert chunk.n_samples_seen[k] == result.n_samples_seen
            for n, u in chunk.updates.items():
                np.testing.assert_array_equal(
                    u[k] * np.float32(len(job.data)), result.partial.vector("weighted_sum")[n]
                )
            admitted = aggregator.admit(result.partial)
            expected = admitted if expected is None else expected.add_(admitted)
        for chunk in chunks:
            sizes = chunk.n_samples.tolist()
            weighted = aggregator.weigh_stacked(chunk.updates, sizes)
            total = aggregator.admit_stacked(weighted, sizes, total)
        assert total is not None and expected is not None
        assert total.number("total_weight") == expected.number("total_weight")
        for n, a in expected.vector("weighted_sum").coefs.items():
            np.testing.assert_array_equal(total.vector("weighted_sum")[n], a)
        for a, b in zip(stacked, alone, strict=True):
            assert a.trainer.optimizer.step == b.trainer.optimizer.step


def test_batch_schedule_is_the_trainers_shuffle() -> None:
    run = setup(drop_remainder=True, max_steps=3)
    (job,) = client_jobs(run, [10])
    steps = batch_schedule(job, 4)
    assert [len(s) for s in steps] == [4, 4, 4]  # 2 per epoch, the remainder dropped
    rng = np.random.default_rng(round_seed(5, "c0", 4))
    first = np.arange(10)[rng.permutation(10)]
    np.testing.assert_array_equal(np.concatenate(steps[:2]), first[:8])


def test_unfit_says_why_a_job_cannot_train_stacked() -> None:
    run = setup()
    (job,) = client_jobs(run, [3])
    assert stacked_unfit(job.trainer.model, job) is None
    job.trainer.optimizer = type(job.trainer.optimizer)(lrate=0.1, modules=["momentum"])
    reason = stacked_unfit(job.trainer.model, job)
    assert reason == "client optimizer module 'momentum' runs client by client"
