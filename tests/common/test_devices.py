"""A client's device: validated in its config, checked at startup, applied to its model."""

from __future__ import annotations

import pytest

from fedpipe.cli import main
from fedpipe.common.config import ClientConfig, ConfigError
from fedpipe.common.devices import DeviceError, available_devices, check_device, place_model
from fedpipe.common.models import load_model

torch = pytest.importorskip("torch")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_the_config_takes_device_names_and_refuses_others() -> None:
    assert ClientConfig(dataset="digits").device == "cpu"
    assert ClientConfig(dataset="digits", device="cuda:1").device == "cuda:1"
    with pytest.raises(ValueError, match="'CUDA 0' is not a device; expected 'cpu', 'cuda'"):
        ClientConfig(dataset="digits", device="CUDA 0")


def test_available_devices_lists_the_cpu_and_each_cuda_device() -> None:
    want = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    assert available_devices()[: len(want)] == want
    check_device("cpu")


@no_cuda
def test_cuda_without_cuda_is_an_error_naming_the_device_and_what_there_is() -> None:
    with pytest.raises(DeviceError) as info:
        check_device("cuda:0")
    assert str(info.value).startswith("device='cuda:0' is not available on this machine (")
    assert str(info.value).endswith("; available: " + ", ".join(available_devices()))
    assert isinstance(info.value, ConfigError)


@no_cuda
def test_fedpipe_client_with_an_absent_device_stops_before_dialing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["client", "--dataset", "digits", "--device", "cuda", "--server", "127.0.0.1:9"])
    assert code == 2
    err = capsys.readouterr().err
    assert "fedpipe client: device='cuda' is not available on this machine" in err
    assert "available: cpu" in err


def test_a_numpy_model_runs_on_the_cpu_only() -> None:
    model = load_model("softmax-regression", {"n_features": 4, "n_classes": 3})
    place_model(model, "cpu")
    with pytest.raises(DeviceError, match="device='cuda:0', but model 'softmax-regression' is a "):
        place_model(model, "cuda:0")


def test_a_torch_model_moves_to_the_clients_device() -> None:
    model = load_model("tests.common.torch_models:build", {"n_features": 4, "n_classes": 3})
    place_model(model, "cpu")
    assert str(model.device) == "cpu"  # type: ignore[attr-defined]
    assert model.get_weights().device == "cpu"


@pytest.mark.cuda
@cuda
def test_a_torch_model_moves_to_cuda_and_a_missing_index_is_named() -> None:
    model = load_model("tests.common.torch_models:build", {"n_features": 4, "n_classes": 3})
    place_model(model, "cuda:0")
    assert model.get_weights().device == "cuda:0"
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(DeviceError, match=f"device='{missing}' is not available"):
        check_device(missing)
