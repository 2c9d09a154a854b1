"""Host staging: CPU tensors pass without a copy, device tensors through one reused buffer."""

from __future__ import annotations

import numpy as np
import pytest

from fedpipe.common.payload import PayloadAssembler, encode_payload
from fedpipe.common.vector import Vector

torch = pytest.importorskip("torch")
from fedpipe.common.host_staging import ALIGN, HostStaging  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tensors(seed: int, device: str = "cpu") -> Vector:
    gen = torch.Generator().manual_seed(seed)
    coefs = {
        "w": torch.randn(5, 3, generator=gen),
        "b": torch.randn(3, generator=gen, dtype=torch.float64),
        "steps": torch.tensor(seed, dtype=torch.int64),  # 0-d, unaligned after a float64[3]
        "empty": torch.zeros(0, 4),
    }
    return Vector({n: t.to(device) for n, t in coefs.items()})


def test_numpy_arrays_and_cpu_tensors_reach_the_host_without_a_copy() -> None:
    staging = HostStaging(pin=False)
    arrays = Vector({"w": np.arange(6.0)})
    assert staging.to_host(arrays).coefs["w"] is arrays.coefs["w"]
    vector = tensors(0)
    host = staging.to_host(vector)
    for name, tensor in vector.coefs.items():
        assert isinstance(host.coefs[name], np.ndarray)
        assert host.coefs[name].ctypes.data == tensor.data_ptr() or tensor.numel() == 0
    assert staging.allocations == 0 and staging.capacity == 0


def test_staging_reuses_one_buffer_from_round_to_round() -> None:
    staging = HostStaging(pin=False)
    addresses = []
    for round_number in range(3):
        staging.begin()
        vector = tensors(round_number)
        host = staging.stage(vector)
        for name, tensor in vector.coefs.items():
            np.testing.assert_array_equal(host.coefs[name], tensor.numpy())
            assert host.coefs[name].ctypes.data % ALIGN == 0 or tensor.numel() == 0
        addresses.append(host.coefs["w"].ctypes.data)
    assert staging.allocations == 1
    assert addresses[0] == addresses[1] == addresses[2]


def test_a_payload_that_outgrows_the_buffer_grows_it_once() -> None:
    staging = HostStaging(pin=False)
    for _ in range(3):
        staging.begin()
        first, second = staging.stage(tensors(1)), staging.stage(tensors(2))
        np.testing.assert_array_equal(first.coefs["w"], tensors(1).coefs["w"].numpy())
        np.testing.assert_array_equal(second.coefs["b"], tensors(2).coefs["b"].numpy())
    # round 1: the buffer, then a one-off block for the second Vector; round 2: one buffer
    # for both; round 3: nothing new
    assert staging.allocations == 3


def test_host_arrays_land_in_cpu_tensors_even_when_read_only() -> None:
    targets = {"w": torch.zeros(5, 3), "b": torch.zeros(3, dtype=torch.float64)}
    arrays = {n: t.numpy().copy() for n, t in tensors(4).coefs.items() if n in targets}
    for array in arrays.values():
        array.flags.writeable = False  # as decoded payload arrays are
    HostStaging(pin=False).to_device(arrays, targets)
    for name, target in targets.items():
        np.testing.assert_array_equal(target.numpy(), arrays[name])


def test_a_staged_payload_streams_from_the_buffer_and_reassembles() -> None:
    staging = HostStaging(pin=False)
    update = tensors(7)
    staging.begin()
    state = {"partial": {"weighted_sum": staging.stage(update)}}
    payload = encode_payload(state, chunk_size=16)  # stage() output is plain numpy: no copy
    buffer = staging._buffer.numpy()
    for array in payload.arrays:
        assert array.size == 0 or np.shares_memory(array, buffer)
    assembler = PayloadAssembler(payload.header, max_bytes=1 << 20)
    for chunk in payload.chunks():
        assembler.add_chunk(*chunk)
    got = assembler.finish()["partial"]["weighted_sum"]
    assert got.allclose(update.to_numpy(), rtol=0, atol=0)


@pytest.mark.cuda
@cuda
def test_cuda_updates_leave_through_one_reused_pinned_buffer() -> None:
    staging = HostStaging()
    addresses = []
    for round_number in range(3):
        vector = tensors(round_number, "cuda")
        payload = encode_payload({"update": vector}, chunk_size=8, staging=staging)
        assert staging.pinned
        buffer = staging._buffer.numpy()
        for array, (name, tensor) in zip(payload.arrays, vector.coefs.items(), strict=True):
            assert array.size == 0 or np.shares_memory(array, buffer)
            np.testing.assert_array_equal(array, tensor.cpu().numpy(), err_msg=name)
        addresses.append(staging._buffer.data_ptr())
    assert staging.allocations == 1 and len(set(addresses)) == 1


@pytest.mark.cuda
@cuda
def test_cuda_weights_arrive_through_the_pinned_buffer_in_one_transfer() -> None:
    staging = HostStaging()
    targets = {n: torch.zeros_like(t) for n, t in tensors(0, "cuda").coefs.items()}
    for round_number in range(2):
        arrays = tensors(round_number).to_numpy().coefs
        staging.to_device(arrays, targets)
        for name, target in targets.items():
            np.testing.assert_array_equal(target.cpu().numpy(), arrays[name])
    assert staging.pinned and staging.allocations == 1


def test_weights_received_into_the_landing_cross_with_no_host_copy() -> None:
    # "meta" tensors stand in for a device's: not on the CPU, so they go through the buffer
    staging = HostStaging(pin=False)
    targets = {n: torch.empty_like(t, device="meta") for n, t in tensors(0).coefs.items()}
    for round_number in range(2):
        landing = staging.landing(targets)
        assert landing is not None and staging.allocations == 1
        buffer = staging._buffer.numpy()
        for name, array in landing.items():  # a receiver writes the payload here
            assert array.size == 0 or np.shares_memory(array, buffer)
            np.copyto(array, tensors(round_number).to_numpy().coefs[name])
        staging.to_device(landing, targets)
        assert staging.host_copies == 0
    staging.to_device(tensors(2).to_numpy().coefs, targets)  # arrays of their own: copied
    assert staging.host_copies == 3  # "empty" holds nothing to copy


def test_cpu_targets_have_no_landing() -> None:
    assert HostStaging(pin=False).landing(tensors(0).coefs) is None


@pytest.mark.cuda
@cuda
def test_a_cuda_model_receives_weights_into_pinned_memory() -> None:
    from fedpipe.common.models.torch_adapter import TorchModel

    model = TorchModel(torch.nn.Linear(4, 3), torch.nn.CrossEntropyLoss(), device="cuda")
    landing = model.host_weights()
    assert landing is not None
    for array in landing.values():
        array[...] = np.arange(array.size, dtype=array.dtype).reshape(array.shape)
    model.set_weights(Vector(landing))
    assert model._staging.pinned and model._staging.host_copies == 0
    for name, tensor in model.get_weights().coefs.items():
        np.testing.assert_array_equal(tensor.cpu().numpy(), landing[name])
