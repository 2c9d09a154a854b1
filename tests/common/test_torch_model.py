"""The torch adapter: same maths as the numpy models, in-place updates, federated training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedpipe.common import registry
from fedpipe.common.config import SimulationConfig
from fedpipe.common.models import load_model
from fedpipe.common.payload import PayloadAssembler, encode_payload
from fedpipe.common.vector import Vector
from fedpipe.server.checkpoint import load_checkpoint
from fedpipe.server.simulation import simulate

torch = pytest.importorskip("torch")
from fedpipe.common.models.torch_adapter import TorchModel  # noqa: E402


def test_matches_numpy_softmax_regression_exactly() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4))
    y = rng.integers(0, 3, size=8)
    ours = load_model("softmax-regression", {"n_features": 4, "n_classes": 3, "dtype": "float64"})
    linear = torch.nn.Linear(4, 3).double()
    with torch.no_grad():  # torch's weight is our kernel transposed
        linear.weight.copy_(torch.from_numpy(ours.get_weights()["kernel"].T.copy()))
        linear.bias.copy_(torch.from_numpy(ours.get_weights()["bias"]))
    wrapped = TorchModel(linear, torch.nn.CrossEntropyLoss())
    grads, loss = wrapped.compute_batch_gradients(x, y)
    want, want_loss = ours.compute_batch_gradients(x, y)
    assert loss == pytest.approx(want_loss, rel=1e-12)
    np.testing.assert_allclose(grads["weight"], want["kernel"].T, rtol=1e-10)
    np.testing.assert_allclose(grads["bias"], want["bias"], rtol=1e-10)
    np.testing.assert_allclose(wrapped.predict(x), ours.predict(x), rtol=1e-10)


def test_updates_land_in_the_module_parameters() -> None:
    wrapped = load_model("tests.common.torch_models:build", {"n_features": 4, "n_classes": 3})
    before = wrapped.get_weights()
    wrapped.apply_updates(before.full_like(0.5))
    after = {n: p.detach().numpy() for n, p in wrapped.module.named_parameters()}
    for name, value in after.items():
        np.testing.assert_allclose(value, before[name] + 0.5, rtol=1e-6)
    wrapped.set_weights(before)
    assert Vector(after).allclose(before)  # same storage: set_weights wrote into the module


def test_weights_are_received_straight_into_the_cpu_parameters() -> None:
    wrapped = load_model("tests.common.torch_models:build", {"n_features": 4, "n_classes": 3})
    sent = wrapped.get_weights().full_like(0.25).to_numpy()
    payload = encode_payload({"weights": sent}, 8)
    assembler = PayloadAssembler(
        payload.header, max_bytes=1 << 20, into={"weights": wrapped.host_weights() or {}}
    )
    for chunk in payload.chunks():
        assembler.add_chunk(*chunk)
    received = assembler.finish()["weights"]
    wrapped.set_weights(received)  # its own memory: nothing to copy
    for name, param in wrapped.module.named_parameters():
        assert np.shares_memory(received[name], param.detach().numpy())
        np.testing.assert_array_equal(param.detach().numpy(), sent[name])


def test_is_not_a_registered_name_and_refuses_unknown_tasks() -> None:
    assert "torch" not in registry.names("model")
    with pytest.raises(ValueError, match="task='ranking'"):
        TorchModel(torch.nn.Linear(2, 2), torch.nn.MSELoss(), task="ranking")


def test_federated_training_of_a_torch_mlp_on_digits(tmp_path: Path) -> None:
    sim = SimulationConfig.model_validate(
        {
            "n_clients": 4,
            "dataset": "digits",
            "partition": {"scheme": "dirichlet", "alpha": 0.5},
            "server": {
                "rounds": 6,
                "min_clients": 4,
                "model": {"name": "tests.common.torch_models:build", "config": {"hidden": 32}},
                "client_optimizer": {"lrate": 0.1, "modules": ["momentum"]},
                "training": {"epochs": 1, "batch_size": 16},
                "output_dir": str(tmp_path),
            },
        }
    )
    history = simulate(sim).history
    assert history[-1]["accuracy"] >= 0.85, history[-1]


def test_local_training_on_tensors_matches_numpy_model_step_for_step() -> None:
    """The client pipeline (regularizer, clipping, Adam, decay) on a torch model's tensors
    gives the numpy model's update: the same maths on the other backend."""
    from fedpipe.common.data import Dataset
    from fedpipe.common.training import LocalTrainer, RunSetup

    rng = np.random.default_rng(3)
    data = Dataset(rng.normal(size=(50, 4)), rng.integers(0, 3, size=50))
    model_config = {"n_features": 4, "n_classes": 3, "dtype": "float64"}
    ours = load_model("softmax-regression", model_config)
    linear = torch.nn.Linear(4, 3).double()
    wrapped = TorchModel(linear, torch.nn.CrossEntropyLoss())
    setup = RunSetup(
        model={"name": "softmax-regression", "config": model_config},
        client_optimizer={
            "lrate": 0.05,
            "w_decay": 0.01,
            "regularizers": [["fedprox", {"mu": 0.1}]],
            "modules": [["l2-global-clipping", {"max_norm": 0.5}], "adam"],
        },
        aggregator="averaging",
        metrics=["loss"],
        training={"batch_size": 8, "epochs": 2},
    )
    start = ours.get_weights()
    as_torch = Vector({"weight": start["kernel"].T.copy(), "bias": start["bias"]})
    numpy_trainer, torch_trainer = LocalTrainer(setup, ours), LocalTrainer(setup, wrapped)
    for round_number in (1, 2):  # module states carried over a round boundary
        want = numpy_trainer.train(data, start, {}, client="c", round_number=round_number)
        got = torch_trainer.train(data, as_torch, {}, client="c", round_number=round_number)
        update = got.partial.vector("weighted_sum")
        assert update.backend == "torch"
        expected = want.partial.vector("weighted_sum")
        np.testing.assert_allclose(
            update.to_numpy()["weight"], expected["kernel"].T, rtol=1e-10, atol=1e-13
        )
        np.testing.assert_allclose(update.to_numpy()["bias"], expected["bias"], rtol=1e-10)
        assert got.loss_sum == pytest.approx(want.loss_sum, rel=1e-10)


def test_frozen_parameters_are_not_weights() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    net[0].requires_grad_(False)
    wrapped = TorchModel(net, torch.nn.CrossEntropyLoss())
    assert sorted(wrapped.weight_specs()) == ["2.bias", "2.weight"]
    grads, _ = wrapped.compute_batch_gradients(np.ones((2, 4), np.float32), np.array([0, 1]))
    assert sorted(grads) == ["2.bias", "2.weight"]
    with pytest.raises(ValueError, match="no trainable parameter"):
        TorchModel(torch.nn.Linear(2, 2).requires_grad_(False), torch.nn.MSELoss())


def test_federated_training_of_a_bfloat16_mlp_on_digits(tmp_path: Path) -> None:
    sim = SimulationConfig.model_validate(
        {
            "n_clients": 4,
            "dataset": "digits",
            "partition": {"scheme": "dirichlet", "alpha": 0.5},
            "server": {
                "rounds": 6,
                "min_clients": 4,
                "model": {
                    "name": "tests.common.torch_models:build",
                    "config": {"hidden": 32, "dtype": "bfloat16"},
                },
                "client_optimizer": {"lrate": 0.1, "modules": ["momentum"]},
                "training": {"epochs": 1, "batch_size": 16},
                "output_dir": str(tmp_path),
            },
        }
    )
    summary = simulate(sim)
    assert summary.history[-1]["accuracy"] >= 0.85, summary.history[-1]
    weights = summary.weights["0.weight"]
    assert weights.dtype.name == "bfloat16"
    master = load_checkpoint(tmp_path / "checkpoint.fpk")["weights"]
    assert isinstance(master, Vector) and master["0.weight"].dtype == np.float32
    assert np.array_equal(master["0.weight"].astype(weights.dtype), weights)  # rounded once
    with np.load(tmp_path / "model.npz") as saved:  # npz has no bfloat16: exact float32
        assert saved["0.weight"].dtype == np.float32
        assert np.array_equal(saved["0.weight"], weights.astype(np.float32))
