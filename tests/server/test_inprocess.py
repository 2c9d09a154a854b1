"""In-process simulation on devices: global weights staged once per round, sums on the device,
clients spread over several devices, all bit-identical to the per-client numpy transport."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fedpipe.common.config import ConfigError, SimulationConfig  # noqa: E402
from fedpipe.common.host_staging import HostStaging  # noqa: E402
from fedpipe.common.torch_backend import TorchOps  # noqa: E402
from fedpipe.common.training import LocalTrainer  # noqa: E402
from fedpipe.server.clients import RoundTask  # noqa: E402
from fedpipe.server.rounds import RunSummary  # noqa: E402
from fedpipe.server.simulation import simulate  # noqa: E402
from fedpipe.server.transports.inprocess import InProcessClient  # noqa: E402

ROUNDS, CLIENTS, ARRAYS = 3, 5, 4  # the MLP of tests.common.torch_models: 2 weights, 2 biases

SCAFFOLD = {
    "client_optimizer": {"lrate": 0.2, "modules": ["scaffold-client"]},
    "server_optimizer": {"lrate": 1.0, "modules": ["scaffold-server"]},
}


def sim_config(tmp_path: Path, device: Any = None, **server: Any) -> SimulationConfig:
    base: dict[str, Any] = {
        "rounds": ROUNDS,
        "min_clients": CLIENTS,
        "model": {"name": "tests.common.torch_models:build", "config": {"hidden": 16}},
        "client_optimizer": {"lrate": 0.2, "modules": [["momentum", {"beta": 0.9}]]},
        "training": {"epochs": 1, "batch_size": 16, "max_steps": 4},
        "output_dir": str(tmp_path / "run"),
        **server,
    }
    config: dict[str, Any] = {"n_clients": CLIENTS, "dataset": "digits", "server": base}
    if device is not None:
        config["device"] = device
    return SimulationConfig.model_validate(config)


def _per_client(self: InProcessClient, task: RoundTask) -> tuple[Any, Any]:
    return task.weights, task.aux_vars


@pytest.fixture
def per_client_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    """The transport as it was: every client gets the server's numpy Vectors and copies them
    to its model's device itself."""
    monkeypatch.setattr(InProcessClient, "_staged", _per_client)


@pytest.fixture
def host_to_device() -> Any:
    """Counts arrays taken from numpy onto torch tensors (host-to-device copies): by the
    torch backend, and by a torch model's set_weights."""
    counted = {"arrays": 0}
    original = TorchOps.asarray

    def counting(self: TorchOps, value: Any, like: Any) -> Any:
        counted["arrays"] += isinstance(value, np.ndarray)
        return original(self, value, like)

    staged = HostStaging.to_device

    def staging(self: HostStaging, arrays: Any, targets: Any) -> None:
        counted["arrays"] += sum(isinstance(a, np.ndarray) for a in arrays.values())
        staged(self, arrays, targets)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TorchOps, "asarray", counting)
        patch.setattr(HostStaging, "to_device", staging)  # TorchModel.set_weights' path
        yield counted


def losses(summary: RunSummary) -> list[tuple[float, float]]:
    return [(r["train_loss"], r["loss"]) for r in summary.history]


@pytest.mark.parametrize("server", [{}, SCAFFOLD], ids=["fedavg-momentum", "scaffold"])
def test_device_run_equals_the_per_client_numpy_transport_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: dict[str, Any]
) -> None:
    staged = simulate(sim_config(tmp_path / "staged", "cpu", **server))
    with monkeypatch.context() as patch:
        patch.setattr(InProcessClient, "_staged", _per_client)
        per_client = simulate(sim_config(tmp_path / "per-client", **server))
    assert staged.status == per_client.status == "completed"
    # The same float32 operations in the same order: only where the inputs were copied differs.
    assert staged.weights.array_equal(per_client.weights)
    assert losses(staged) == losses(per_client)
    assert staged.weights.backend == "numpy"  # the server's model stays on the host


@pytest.mark.parametrize(
    ("device", "server", "aux_rounds"),
    [("cpu", {}, 0), ("cpu", SCAFFOLD, ROUNDS - 1), (["cpu", "cpu"], SCAFFOLD, ROUNDS - 1)],
    ids=["fedavg", "scaffold", "scaffold-two-slots-one-device"],
)
def test_global_weights_and_aux_vars_go_to_the_device_once_per_round(
    tmp_path: Path,
    host_to_device: dict[str, int],
    device: Any,
    server: dict[str, Any],
    aux_rounds: int,
) -> None:
    summary = simulate(sim_config(tmp_path, device, **server))
    assert [r["replied"] for r in summary.history] == [CLIENTS] * ROUNDS
    # Per round and device: the weights for training, the weights for evaluation, and
    # (Scaffold, from round 2 on, once the server knows the model's specs) the global control
    # variate. Two model objects on one device share one copy.
    assert host_to_device["arrays"] == ARRAYS * (2 * ROUNDS + aux_rounds)


def test_per_client_transport_copies_the_weights_once_per_client(
    tmp_path: Path, per_client_transport: None, host_to_device: dict[str, int]
) -> None:
    """What the staging saves: the same run, each client copying the weights itself."""
    simulate(sim_config(tmp_path, "cpu"))
    assert host_to_device["arrays"] == ARRAYS * 2 * CLIENTS * ROUNDS


def test_two_devices_route_clients_round_robin_and_match_one_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = simulate(sim_config(tmp_path / "one", "cpu"))
    placed: dict[str, tuple[str, int]] = {}
    train = LocalTrainer.train

    def spy(self: LocalTrainer, data: Any, *args: Any, **kwargs: Any) -> Any:
        placed[kwargs["client"]] = (threading.current_thread().name, id(self.model))
        return train(self, data, *args, **kwargs)

    monkeypatch.setattr(LocalTrainer, "train", spy)
    two = simulate(sim_config(tmp_path / "two", ["cpu", "cpu"]))
    names = sorted(placed)
    assert [placed[n][0].split("_")[0] for n in names] == [
        f"fedpipe-sim-{i % 2}" for i in range(CLIENTS)
    ]
    models = [placed[n][1] for n in names]
    assert models[0::2] == [models[0]] * 3 and models[1::2] == [models[1]] * 2
    assert models[0] != models[1]  # one model object per device
    # Replies are folded in task order whichever device finishes first: the same sums.
    assert two.weights.array_equal(one.weights)
    assert losses(two) == losses(one)


def test_a_numpy_model_refuses_a_device(tmp_path: Path) -> None:
    sim = sim_config(tmp_path, "cpu", model={"name": "softmax-regression"})
    with pytest.raises(ConfigError, match="model 'softmax-regression' is a numpy model"):
        simulate(sim)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_simulation_trains_on_the_gpu_and_agrees_with_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu = simulate(sim_config(tmp_path / "cpu", "cpu"))
    devices: set[str] = set()
    train = LocalTrainer.train

    def spy(self: LocalTrainer, data: Any, weights: Any, *args: Any, **kwargs: Any) -> Any:
        result = train(self, data, weights, *args, **kwargs)
        devices.update({weights.device, result.partial.vector("weighted_sum").device})
        return result

    monkeypatch.setattr(LocalTrainer, "train", spy)
    gpu = simulate(sim_config(tmp_path / "gpu", "cuda"))
    assert gpu.status == "completed"
    assert devices and all(d.startswith("cuda") for d in devices)  # weights in, updates out
    assert gpu.weights.backend == "numpy"
    # GPU kernels round differently from the CPU's: close, not equal.
    assert gpu.weights.allclose(cpu.weights, rtol=1e-3, atol=1e-4)
    assert gpu.history[-1]["accuracy"] == pytest.approx(cpu.history[-1]["accuracy"], abs=0.02)
