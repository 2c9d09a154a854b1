"""The stacked mode gives the client-by-client fold's bits and behaviour in its edge cases:
an aggregator with no stacked form of its own (gradient masking), one-element arrays
(added row after row, not pairwise), half precision (summed in float32), an update that
overflows once weighted (left out), and a round the deadline cut off (the next waits)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedpipe.common.aggregators import AveragingAggregator, SumAggregator
from fedpipe.common.aggregators.base import Aggregator
from fedpipe.common.config import SimulationConfig
from fedpipe.common.data import Dataset
from fedpipe.common.stacked import StackedUpdates
from fedpipe.common.training import RunSetup
from fedpipe.common.vector import Vector
from fedpipe.server.clients import RoundTask
from fedpipe.server.rounds import RunSummary
from fedpipe.server.simulation import simulate_inprocess
from fedpipe.server.stacked_cohort import add_stacked, empty_reply
from fedpipe.server.transports.inprocess import InProcessClient, SharedModels
from tests.server.test_stacked_simulation import MLP, SIZES, assert_same, clients, run

F = 6


def masked_run(tmp: Path, mode: str) -> RunSummary:
    sim = SimulationConfig.model_validate(
        {
            "n_clients": len(SIZES),
            "mode": mode,
            "server": {
                "rounds": 2,
                "min_clients": len(SIZES),
                "eval_every": 0,
                "model": MLP,
                "aggregator": ["gradient-masked-averaging", {"threshold": 0.6}],
                "client_optimizer": {"lrate": 0.1},
                "training": {"epochs": 1, "batch_size": 4},
                "output_dir": str(tmp / mode),
            },
        }
    )
    return asyncio.run(simulate_inprocess(sim, clients()))


def test_a_gradient_masked_run_stacked_is_the_sequential_run(tmp_path: Path) -> None:
    assert_same(masked_run(tmp_path, "sequential"), masked_run(tmp_path, "auto"))


MLP16 = {
    "name": "mlp",
    "config": {"n_features": F, "hidden": [5], "n_classes": 3, "dtype": "float16"},
}


@pytest.mark.parametrize("stack_clients", [1024, 4])
def test_a_float16_stacked_run_is_the_client_by_client_run(
    tmp_path: Path, stack_clients: int
) -> None:
    sequential, seq_lines = run(tmp_path, "sequential", MLP16, {"lrate": 0.1})
    stacked, lines = run(tmp_path, "auto", MLP16, {"lrate": 0.1}, stack_clients=stack_clients)
    assert_same(sequential, stacked)
    assert lines == seq_lines


def test_an_update_that_overflows_once_weighted_is_left_out_as_one_by_one() -> None:
    aggregator = AveragingAggregator()
    rows = np.array([[1.0, 2.0], [1000.0, 1.0]], np.float16)  # finite, but 1000 * 100 is not
    n_samples = np.array([3, 100], np.int64)
    one_by_one = aggregator.prepare(Vector({"w": rows[1].copy()}), 100, 1)
    assert not one_by_one.vector("weighted_sum").is_finite()  # the round loop rejects it

    reply = empty_reply()
    done = StackedUpdates(
        updates={"w": rows.copy()},
        n_samples=n_samples,
        n_steps=np.array([1, 1]),
        loss_sum=np.array([1.0, 1.0]),
        n_samples_seen=n_samples,
        seconds=0.0,
    )
    add_stacked(reply, ["c0", "c1"], done, aggregator)
    assert reply.names == ["c0"], reply.failures
    assert reply.total is not None and reply.total.vector("weighted_sum").is_finite()


@pytest.mark.parametrize("aggregator", [SumAggregator(), AveragingAggregator()])
@pytest.mark.parametrize("shape", [(1,), ()])
def test_admit_stacked_adds_one_element_arrays_row_after_row(
    aggregator: Aggregator, shape: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(0)
    k = 40
    rows = rng.standard_normal((k, *shape)) * 10.0 ** rng.integers(-4, 4, (k, *shape))
    rows = rows.astype(np.float32)
    n_samples = [int(n) for n in rng.integers(1, 30, k)]
    total = None
    for i in range(k):
        partial = aggregator.admit(
            aggregator.prepare(Vector({"b": rows[i].copy()}), n_samples[i], 1)
        )
        total = (
            aggregator.start(partial.accumulator(copy=False))
            if total is None
            else total.add_(partial)
        )
    weighted = aggregator.weigh_stacked({"b": rows.copy()}, n_samples)
    stacked = aggregator.admit_stacked(weighted, n_samples)
    assert total is not None
    field = aggregator.vector_fields[0]
    np.testing.assert_array_equal(stacked.vector(field)["b"], total.vector(field)["b"])


def logistic_run(tmp: Path, mode: str) -> Vector:
    rng = np.random.default_rng(2)
    data = []
    for i in range(24):
        x = rng.standard_normal((10, 4)).astype(np.float32)
        data.append((f"c{i}", Dataset(x, rng.integers(0, 2, 10)), None))
    sim = SimulationConfig.model_validate(
        {
            "n_clients": 24,
            "mode": mode,
            "server": {
                "rounds": 3,
                "min_clients": 24,
                "eval_every": 0,
                "model": {"name": "logistic-regression", "config": {"n_features": 4}},
                "client_optimizer": {"lrate": 0.3},
                "training": {"epochs": 1, "batch_size": 4},
                "output_dir": str(tmp / mode),
            },
        }
    )
    return asyncio.run(simulate_inprocess(sim, data)).weights


def test_a_logistic_regression_run_stacked_is_the_sequential_run(tmp_path: Path) -> None:
    sequential, stacked = logistic_run(tmp_path, "sequential"), logistic_run(tmp_path, "auto")
    for name, w in sequential.coefs.items():
        np.testing.assert_array_equal(stacked.coefs[name], w, err_msg=name)


def test_a_timed_out_stacked_round_does_not_overlap_the_next() -> None:
    run = RunSetup(
        model={"name": "softmax-regression", "config": {"n_features": F, "n_classes": 3}},
        client_optimizer={"lrate": ["exponential-decay", {"initial": 0.1, "decay_rate": 0.9}]},
        aggregator="averaging",
        metrics=["loss"],
        training={"epochs": 3, "batch_size": 2},
        seed=5,
    )
    models = SharedModels(mode="vectorized")
    rng = np.random.default_rng(0)
    clients = [
        InProcessClient(
            f"c{i}",
            Dataset(rng.standard_normal((8, F)).astype(np.float32), rng.integers(0, 3, 8)),
            None,
            models,
            i,
        )
        for i in range(3)
    ]
    active, most = [0], [0]
    lock = threading.Lock()

    async def main() -> None:
        for c in clients:
            await c.initialize(run, {})
        cohort = clients[0].cohort()
        assert cohort is not None
        model = cohort.engine.model
        real = model.compute_stacked_gradients

        def slow(*args, **kwargs):  # type: ignore[no-untyped-def]
            with lock:
                active[0] += 1
                most[0] = max(most[0], active[0])
            try:
                time.sleep(0.02)
                return real(*args, **kwargs)
            finally:
                with lock:
                    active[0] -= 1

        model.compute_stacked_gradients = slow  # type: ignore[method-assign]
        weights = model.get_weights()
        aggregator = AveragingAggregator()
        try:  # round 1: the round deadline passes mid-training (train_cohort's timeout_at)
            async with asyncio.timeout(0.05):
                await cohort.train_together(clients, RoundTask(1, weights), aggregator)
        except TimeoutError:
            pass
        await cohort.train_together(clients, RoundTask(2, weights), aggregator)

    asyncio.run(main())
    models.close()
    # round 1's thread is still stepping the same trainers (optimizer.step, the learning
    # rate schedule) while round 2 trains them: round 2's result depends on timing
    assert most[0] == 1, f"{most[0]} stacked trainings of the same engine ran at once"
