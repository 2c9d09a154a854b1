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


DECAY = {"lrate": ["exponential-decay", {"initial": 0.2, "decay_rate": 0.9}]}
NOISY = {"lrate": 0.1, "modules": [["gaussian-noise", {"std": 0.1}], "momentum"]}


@pytest.mark.parametrize("optimizer", [DECAY, NOISY], ids=["stacked", "client-by-client"])
def test_a_failed_vectorized_batch_leaves_each_client_state_as_it_was(
    optimizer: dict[str, Any],
) -> None:
    # slot_batches retries a failed batch client by client: each must train from its state
    # of before the failed attempt (step count, module state: the noise generator's too, so
    # that the retried client draws the noise a client never batched draws), not a half-done one
    from fedpipe.common.models.torch_adapter import TorchModel
    from fedpipe.common.privacy.entropy import seed_private_noise
    from fedpipe.common.state import copy_state
    from fedpipe.common.vector import Vector
    from fedpipe.common.vectorized import ClientJob, VectorizedTrainer

    run = RunSetup(
        model=MODEL,
        client_optimizer=optimizer,
        aggregator="averaging",
        metrics=["loss"],
        training={"batch_size": 4, "epochs": 1},
    )
    good, bad = data(0, 12), data(1, 12)
    bad.y[:] = 2
    bad.y[bad.y.argsort()[-1]] = 7  # out of range for 3 classes: fails at some step
    trainers = [LocalTrainer(run), LocalTrainer(run)]
    model = trainers[0].model
    assert isinstance(model, TorchModel)
    trainers[1].model = model
    for name, trainer in zip(("c0", "c1"), trainers, strict=True):
        seed_private_noise(trainer.optimizer.modules, 5, name)
    weights = Vector(model.get_weights().coefs)
    before = [copy_state(t.optimizer.get_state()) for t in trainers]
    engine = VectorizedTrainer(model)
    jobs = [ClientJob("c0", trainers[0], good), ClientJob("c1", trainers[1], bad)]
    schedule_fails_late(engine, jobs)
    with pytest.raises(Exception):  # noqa: B017 - the user's loss raises what it raises
        list(engine.train(jobs, weights, 1))
    after = [t.optimizer.get_state() for t in trainers]
    assert [s["step"] for s in after] == [s["step"] for s in before] == [0, 0]
    alone = LocalTrainer(run, model=model)
    seed_private_noise(alone.optimizer.modules, 5, "c0")
    fresh = alone.train(good, weights, {}, client="c0", round_number=1)
    retried = trainers[0].train(good, weights, {}, client="c0", round_number=1)
    assert retried.partial.fields.keys() == fresh.partial.fields.keys()
    for key, value in fresh.partial.fields.items():
        mine = retried.partial.fields[key]
        assert mine.array_equal(value) if isinstance(value, Vector) else mine == value


def schedule_fails_late(engine: Any, jobs: list[Any]) -> None:
    """Put the bad row of client 1 in its last batch, so that earlier steps succeed."""
    from fedpipe.common.vectorized import batch_schedule

    rows = np.concatenate(batch_schedule(jobs[1], 1))
    bad = int(np.flatnonzero(jobs[1].data.y == 7)[0])
    last = rows[-1]
    jobs[1].data.y[[bad, last]] = jobs[1].data.y[[last, bad]]
    jobs[1].data.x[[bad, last]] = jobs[1].data.x[[last, bad]]
