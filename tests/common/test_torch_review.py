"""Reviewer tests of the torch paths: host syncs, failure retries, backend promotion."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedpipe.common.data import Dataset
from fedpipe.common.training import LocalTrainer, RunSetup

torch = pytest.importorskip("torch")

MODEL = {"name": "tests.common.torch_models:build", "config": {"n_features": 8, "n_classes": 3}}


def setup(**training: Any) -> RunSetup:
    return RunSetup(
        model=MODEL,
        client_optimizer={"lrate": 0.1, "modules": ["momentum"]},
        aggregator="averaging",
        metrics=["loss"],
        training={"batch_size": 4, "epochs": 2, **training},
    )


def data(seed: int = 0, n: int = 18) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    return Dataset(x, rng.integers(0, 3, size=n))


def test_local_training_reads_the_loss_back_once_per_round(monkeypatch: Any) -> None:
    # a float() of a device tensor waits for the device: one per batch stalls a GPU's queue
    trainer = LocalTrainer(setup())
    weights = trainer.model.get_weights().to_numpy()
    reads: list[str] = []
    to_float, item = torch.Tensor.__float__, torch.Tensor.item

    def counted_float(self: Any) -> float:
        reads.append("float")
        return to_float(self)  # type: ignore[no-any-return]

    def counted_item(self: Any) -> Any:
        reads.append("item")
        return item(self)

    monkeypatch.setattr(torch.Tensor, "__float__", counted_float)
    monkeypatch.setattr(torch.Tensor, "item", counted_item)
    result = trainer.train(data(), weights, {}, client="c0", round_number=1)
    assert result.n_steps == 10
    assert len(reads) <= 1
    monkeypatch.undo()
    # the same mean loss as summing each batch's float loss
    again = LocalTrainer(setup())
    losses: list[float] = []
    compute = again.model.compute_batch_gradients

    def recording(x: np.ndarray, y: np.ndarray) -> Any:
        grads, loss = compute(x, y)
        losses.append(float(loss) * len(x))
        return grads, loss

    again.model.compute_batch_gradients = recording  # type: ignore[method-assign]
    twin = again.train(data(), weights, {}, client="c0", round_number=1)
    assert twin.loss_sum == result.loss_sum == sum(losses)
    assert isinstance(result.loss_sum, float)
