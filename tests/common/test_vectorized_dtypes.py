"""The vectorized engine in every float dtype a torch model trains in, with and without what
reads the weights (a regularizer, weight decay) and a module with state: it trains stacked (no
fallback) and ends where LocalTrainer does, client by client, to the dtype's rounding."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from fedpipe.common.models.torch_adapter import TorchModel
from fedpipe.common.vectorized import VectorizedTrainer
from tests.common.test_vectorized import client_data, jobs_for, mlp, setup

#: Adam whose output the gradients' rounding cannot blow up: with the default eps (1e-8) and
#: beta_2 a near-zero gradient's last bit, which the engine and LocalTrainer may round apart,
#: is a full step of either sign (test_half_optimizer checks the defaults against float32).
ADAM = ["adam", {"eps": 1e-2, "beta_2": 0.9}]
PENALTIES: dict[str, dict[str, Any]] = {
    "fedprox": {"regularizers": [["fedprox", {"mu": 0.1}]]},
    "w_decay": {"w_decay": 0.1},
    "none": {},
}
ULPS = 4  # how far an update may be, in the dtype's eps times the array's largest weight


def model_in(dtype: torch.dtype) -> TorchModel:
    model = mlp()
    model.module.to(dtype)
    model.to("cpu")  # the TorchModel takes its weights again, now in ``dtype``
    return model


def assert_trains_as_client_by_client(
    dtype: torch.dtype, optimizer: dict[str, Any], clients: list[int]
) -> None:
    """Two rounds of ``clients`` (of test_vectorized's, in batches of 16, 3 steps at most),
    each client's update (start minus end weights) from the engine against LocalTrainer's."""
    run = setup(optimizer, epochs=1, max_steps=3)
    seq_model, vec_model = model_in(dtype), model_in(dtype)
    seq_jobs = jobs_for(run, seq_model, [client_data()[k] for k in clients])
    vec_jobs = jobs_for(run, vec_model, [client_data()[k] for k in clients])
    engine = VectorizedTrainer(vec_model)
    weights = seq_model.get_weights(copy=True)
    for round_number in (1, 2):  # the second from the module states the first left
        want = []
        for job in seq_jobs:
            job.trainer.train(job.data, weights, {}, client=job.name, round_number=round_number)
            want.append(weights - seq_model.get_weights(copy=True))
        assert engine.unfit(vec_jobs, round_number) is None
        (got,) = engine.train_stacked(vec_jobs, weights, round_number)
        for k, updates in enumerate(want):
            assert updates.norm() > 1e-3  # the client did move
            for name, rows in got.updates.items():
                tol = ULPS * torch.finfo(dtype).eps * weights.coefs[name].abs().max()
                assert rows.dtype == dtype
                torch.testing.assert_close(rows[k], updates.coefs[name], rtol=0, atol=tol)
        weights = weights - want[0] * 0.5  # a new global model, the same for both


@pytest.mark.parametrize("module", ["adam", "sgd"])
@pytest.mark.parametrize("penalty", list(PENALTIES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_every_dtype_trains_stacked_as_client_by_client(
    dtype: str, penalty: str, module: str, caplog: pytest.LogCaptureFixture
) -> None:
    optimizer = {"lrate": 0.05, "modules": [ADAM] if module == "adam" else [], **PENALTIES[penalty]}
    with caplog.at_level(logging.INFO, logger="fedpipe.common.vectorized"):
        # 37, 64 and 100 samples: 3 steps each, the first client's last batch of 5 alone
        assert_trains_as_client_by_client(getattr(torch, dtype), optimizer, [0, 1, 2])
    assert [r.getMessage() for r in caplog.records if r.name == "fedpipe.common.vectorized"] == []


def test_half_precision_clients_of_different_step_counts_train_stacked_alike(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 37, 64 and 9 samples: 3, 3 and 1 steps, and Adam's step counts differ from the second
    # round on: the pipeline runs one vmapped call per step count, each client's own float32
    # moments stepping its own slice of the weights
    optimizer = {"lrate": 0.05, "modules": [ADAM], **PENALTIES["fedprox"]}
    with caplog.at_level(logging.INFO, logger="fedpipe.common.vectorized"):
        assert_trains_as_client_by_client(torch.bfloat16, optimizer, [0, 1, 4])
    assert [r.getMessage() for r in caplog.records if r.name == "fedpipe.common.vectorized"] == []


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
def test_each_clients_learning_rate_scales_its_update_as_local_trainer_does(dtype: str) -> None:
    # clients of one step with different rates (a scheduler, step counts of their own): each
    # row is its update times its rate, rounded once, as LocalTrainer's ``updates * rate``; a
    # rate rounded to bfloat16 first (0.05 -> 0.05005) moved every client by another rate
    from fedpipe.common.vectorized_pipeline import _scaled

    torch.manual_seed(0)
    updates = torch.randn(3, 500).to(getattr(torch, dtype))
    rates = [0.05, 0.05 * 0.9, 0.05 * 0.81]
    want = torch.stack([row * rate for row, rate in zip(updates, rates, strict=True)])
    got = _scaled({"w": updates.clone()}, rates)["w"]
    assert got.dtype == updates.dtype
    assert torch.equal(got, want)
