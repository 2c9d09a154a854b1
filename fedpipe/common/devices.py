"""Where a client trains: a device name from its own config, checked and applied to its model.

A client picks its device (``device = "cuda:0"`` in its config, ``--device`` on ``fedpipe
client``); the server never does. Built-in models are numpy and run on ``"cpu"`` only; a
:class:`~fedpipe.common.models.torch_adapter.TorchModel` is moved to the client's device after
it is built. Torch is imported only for a device other than ``"cpu"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedpipe.common.config import ConfigError

if TYPE_CHECKING:
    from fedpipe.common.models.base import Model

__all__ = ["DeviceError", "available_devices", "check_device", "client_device", "place_model"]


class DeviceError(ConfigError):
    """A client's ``device`` that does not exist here, or that its model cannot run on."""


def available_devices() -> list[str]:
    """The devices torch can use here (``["cpu"]`` when torch is not installed)."""
    try:
        import torch
    except ImportError:
        return ["cpu"]
    found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def client_device(device: str) -> str:
    """The one device a client trains on: ``"auto"`` is the first GPU when torch sees one,
    else the CPU (``"cuda"`` is torch's current GPU, the first one)."""
    if device == "auto":
        gpus = [d for d in available_devices() if d.startswith("cuda")]
        return gpus[0] if gpus else "cpu"
    return device


def check_device(device: str) -> None:
    """Check that ``device`` exists on this machine, before the client dials the server.

    Raises
    ------
    DeviceError
        Torch is missing, or the device is absent (the message lists the devices there are).
    """
    if device == "cpu":
        return
    try:
        import torch
    except ImportError:
        raise DeviceError(
            f"device={device!r} needs torch, which is not installed: "
            "pip install 'fedpipe[torch]' (or set device = 'cpu')"
        ) from None
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as exc:  # torch without CUDA asserts
        reason = (str(exc).splitlines() or [type(exc).__name__])[0].split(". ")[0]
        raise DeviceError(
            f"device={device!r} is not available on this machine ({reason}); available: "
            f"{', '.join(available_devices())}"
        ) from None


def place_model(model: Model, device: str) -> None:
    """Move ``model`` to ``device`` (a torch model), or check that it can run there.

    Raises
    ------
    DeviceError
        A numpy model and a device other than ``"cpu"``.
    """
    move: Any = getattr(model, "to", None)
    if move is None:
        if device != "cpu":
            raise DeviceError(
                f"device={device!r}, but model {model.name!r} is a numpy model that runs on "
                "the CPU only; set device = 'cpu' or use a torch model (TorchModel)"
            )
        return
    move(device)
