"""``loaders`` and ``train_fn`` in a simulation config: the simulated clients train through
the user's own DataLoaders and training loop, as client processes with that config would."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fedpipe.common.config import ClientConfig, ConfigError, SimulationConfig  # noqa: E402
from fedpipe.common.models import load_model  # noqa: E402
from fedpipe.server.rounds import RunSummary  # noqa: E402
from fedpipe.server.simulation import _client_config, simulate  # noqa: E402
from tests.common import torch_training  # noqa: E402
from tests.server.test_inprocess import CLIENTS, ROUNDS, sim_config  # noqa: E402

USER = "tests.common.torch_training"
OWN = {"loaders": f"{USER}:loaders", "train_fn": f"{USER}:shift_train"}


PLAIN = {"client_optimizer": {"lrate": 0.2}}  # no module: the update is start - end


def run(tmp_path: Path, name: str, server: dict[str, Any] | None = None, **sim: Any) -> RunSummary:
    config = sim_config(tmp_path / name, **(server or {})).model_dump()
    return simulate(SimulationConfig.model_validate({**config, **sim}))


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str, int]]:
    """Each call of shift_train: its round, its client and the size of its loader's data."""
    seen: list[tuple[int, str, int]] = []
    shift = torch_training.shift_train

    def counted(module: Any, loader: Any, round_config: dict[str, Any]) -> Any:
        seen.append((round_config["round"], round_config["client"], len(loader.dataset)))
        return shift(module, loader, round_config)

    monkeypatch.setattr(torch_training, "shift_train", counted)
    return seen


def test_simulated_clients_train_through_the_train_fn_once_per_round(
    tmp_path: Path, calls: list[tuple[int, str, int]]
) -> None:
    own = run(tmp_path, "own", PLAIN, **OWN)
    names = [f"client-{i}" for i in range(CLIENTS)]
    assert sorted((r, c) for r, c, _ in calls) == [
        (r, c) for r in range(1, ROUNDS + 1) for c in names
    ]
    assert all(n > 100 for _, _, n in calls)  # each client's own partition, in its loader
    # shift_train moves every parameter by -round: FedAvg takes the global model there too
    start = load_model("tests.common.torch_models:build", {"hidden": 16}).get_weights()
    expected = start.to_numpy() - float(sum(range(1, ROUNDS + 1)))
    assert own.weights.allclose(expected, rtol=0, atol=1e-5)
    assert [r["train_loss"] for r in own.history] == [0.5] * ROUNDS  # the train_fn's loss
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in own.history)  # its eval loaders
    default = run(tmp_path, "default", PLAIN)
    assert not default.weights.allclose(own.weights, rtol=0, atol=1.0)


def test_vectorized_mode_falls_back_to_sequential_with_a_train_fn(
    tmp_path: Path, calls: list[tuple[int, str, int]], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="fedpipe.server.simulation"):
        vectorized = run(tmp_path, "vectorized", mode="vectorized", **OWN)
    said = [r.getMessage() for r in caplog.records if "falls back" in r.getMessage()]
    assert said == [
        "mode='vectorized' falls back to sequential: the clients train with their own "
        f"train_fn '{USER}:shift_train', which cannot be stacked across clients"
    ]
    assert len(calls) == CLIENTS * ROUNDS
    sequential = run(tmp_path, "sequential", **OWN)
    for name, array in vectorized.weights.coefs.items():
        assert np.array_equal(array, sequential.weights.coefs[name])


def test_a_train_fn_with_a_numpy_model_fails_before_the_first_round(tmp_path: Path) -> None:
    config = sim_config(tmp_path).model_dump()
    config["server"]["model"] = {"name": "softmax-regression", "config": {}}
    sim = SimulationConfig.model_validate({**config, **OWN})
    with pytest.raises(ConfigError, match=r"train_fn='tests.*takes a torch.nn.Module"):
        simulate(sim)


def test_a_train_fn_needs_loaders_in_a_simulation_as_in_a_client() -> None:
    for config in (SimulationConfig, ClientConfig):
        with pytest.raises(ValueError, match="trains on a torch DataLoader: set 'loaders' too"):
            config.model_validate({"dataset": "digits", "train_fn": OWN["train_fn"]})


def test_grpc_simulated_clients_get_the_loaders_and_train_fn(tmp_path: Path) -> None:
    sim = SimulationConfig.model_validate({**sim_config(tmp_path).model_dump(), **OWN})
    shared = _client_config(sim.server, sim)
    assert {k: shared[k] for k in OWN} == OWN
    client = ClientConfig.model_validate({**shared, "name": "c", "data": "x.npz"})
    assert (client.loaders, client.train_fn) == (OWN["loaders"], OWN["train_fn"])
    assert "train_fn" not in _client_config(sim.server, sim_config(tmp_path))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_train_fn_trains_gpu_clients_in_simulation(
    tmp_path: Path, calls: list[tuple[int, str, int]]
) -> None:
    cpu = run(tmp_path, "cpu", PLAIN, **OWN)
    gpu = run(tmp_path, "gpu", PLAIN, device="cuda", **OWN)
    assert len(calls) == 2 * CLIENTS * ROUNDS
    assert gpu.weights.allclose(cpu.weights, rtol=0, atol=1e-5)
