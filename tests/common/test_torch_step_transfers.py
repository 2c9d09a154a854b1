"""A torch model's local training moves nothing between host and device at each step.

On a GPU, every host->device copy from pageable memory and every read of a device value
(``float(t)``, ``.item()``, ``bool(t)``) makes the host wait for the device, which is what
bounds a small model's training. A dispatch mode counts the calls that would: host data made
into a tensor (``lift_fresh``: ``torch.from_numpy``, ``torch.as_tensor``, ``torch.tensor``),
device values read on the host (``_local_scalar_dense``) and copies between devices. On a CPU
the last never shows, but the first two do: a client training 4 times as many steps must make
exactly as many of them (per client and epoch, not per step).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from fedpipe.common.data import Dataset  # noqa: E402
from fedpipe.common.training import LocalTrainer, RunSetup  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
OPTIMIZERS = {
    "sgd": {"lrate": 0.05},
    "weight decay": {"lrate": 0.05, "w_decay": 1e-3},
    "momentum": {"lrate": 0.05, "modules": [["momentum", {"beta": 0.9}]]},
    "adam": {"lrate": 0.01, "modules": ["adam"]},
    "prox": {"lrate": 0.05, "regularizers": [["fedprox", {"mu": 0.1}]]},
}
SYNCS = ("aten.lift_fresh.default", "aten._local_scalar_dense.default")


class HostDeviceCalls(TorchDispatchMode):
    """Counts the torch calls that make a GPU's host wait, by kind."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = str(func)
        if name in SYNCS:
            self.calls[name] += 1
        elif name.startswith(("aten._to_copy", "aten.copy_")):
            devices = {a.device.type for a in (*args, *kwargs.values()) if _is_tensor(a)}
            if "device" in kwargs and kwargs["device"] is not None:
                devices.add(torch.device(kwargs["device"]).type)
            if len(devices) > 1:
                self.calls["copy between devices"] += 1
        return func(*args, **kwargs)


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _setup(optimizer: dict[str, Any]) -> RunSetup:
    return RunSetup(
        model={"name": "tests.common.torch_models:build", "config": {"n_features": 6}},
        client_optimizer=optimizer,
        aggregator="averaging",
        metrics=["loss"],
        training={"epochs": 1, "batch_size": 4},
    )


def _round_calls(device: str, optimizer: dict[str, Any], n_samples: int) -> Counter[str]:
    """Host-device calls of a client's second round on ``n_samples`` (the first places the
    optimizer's state and the client's data on the device)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    trainer = LocalTrainer(_setup(optimizer), client="c")
    trainer.model.to(device)  # type: ignore[attr-defined]
    rng = np.random.default_rng(0)
    data = Dataset(rng.normal(size=(n_samples, 6)), rng.integers(0, 10, n_samples))
    weights = trainer.model.get_weights()
    trainer.train(data, weights, {}, client="c", round_number=1)
    with HostDeviceCalls() as counter:
        result = trainer.train(data, weights, {}, client="c", round_number=2)
    assert result.n_steps == n_samples // 4
    return counter.calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_host_device_calls_do_not_grow_with_steps(device: str, optimizer: str) -> None:
    few = _round_calls(device, OPTIMIZERS[optimizer], n_samples=16)  # 4 steps
    many = _round_calls(device, OPTIMIZERS[optimizer], n_samples=64)  # 16 steps
    assert many == few, f"{optimizer}: 4 steps {dict(few)}, 16 steps {dict(many)}"
    # the counter sees what a client and epoch need: the epoch's sample order, made a tensor
    assert few["aten.lift_fresh.default"] >= 1
