"""Devices of an in-process simulation: what a config names, and per-device workers."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures.thread import BrokenThreadPool
from typing import Any

import pydantic
import pytest

torch = pytest.importorskip("torch")

from fedpipe.common.config import ConfigError, SimulationConfig  # noqa: E402
from fedpipe.server.devices import DeviceWorkers, resolve_devices  # noqa: E402

NO_GPU = not torch.cuda.is_available()


@pytest.mark.parametrize(
    ("device", "devices"),
    [(None, []), ("cpu", ["cpu"]), (["cpu", "cpu"], ["cpu", "cpu"])],
)
def test_named_devices_resolve_one_model_object_each(device: Any, devices: list[str]) -> None:
    assert resolve_devices(device) == devices


@pytest.mark.skipif(not NO_GPU, reason="checks a CPU-only machine")
def test_without_a_gpu_auto_is_the_cpu_and_cuda_says_what_to_do() -> None:
    assert resolve_devices("auto") == ["cpu"]
    with pytest.raises(ConfigError, match="device='cuda' but torch sees no CUDA device"):
        resolve_devices("cuda")
    with pytest.raises(ConfigError, match=r"device='cuda:1' but torch sees 0 CUDA device\(s\)"):
        resolve_devices(["cpu", "cuda:1"])


@pytest.mark.cuda
@pytest.mark.skipif(NO_GPU, reason="needs a CUDA device")
def test_cuda_means_every_visible_gpu() -> None:
    count = torch.cuda.device_count()
    assert resolve_devices("cuda") == [f"cuda:{i}" for i in range(count)]
    assert resolve_devices("auto") == resolve_devices("cuda")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"device": "gpu"}, "'gpu' is not a device; expected 'cpu', 'cuda'"),
        ({"device": []}, "at least 1 item"),
        ({"device": "cuda", "transport": "grpc"}, "each client process picks its device"),
        ({"mode": "batched"}, "'sequential' or 'vectorized'"),
    ],
)
def test_simulation_config_refuses_bad_devices(config: dict[str, Any], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        SimulationConfig.model_validate(config)


def test_replies_come_back_in_task_order_while_devices_work_at_once() -> None:
    workers = DeviceWorkers(["cpu", "cpu"])
    events: list[str] = []  # list.append is atomic: threads and the loop both log here
    second_started = threading.Event()

    def work(i: int) -> Any:
        def run() -> tuple[int, str]:
            events.append(f"start {i}")
            if i == 1:
                second_started.set()
            if i == 0:  # the first task finishes only once the other device has started
                events.append(f"overlap {second_started.wait(timeout=30)}")
            return i, threading.current_thread().name

        return run

    async def main() -> list[tuple[int, str]]:
        turns: list[asyncio.Future[None]] = []

        async def one(i: int) -> tuple[int, str]:
            result = await workers.run(i % 2, turns, work(i))
            events.append(f"returned {i}")
            return result

        return await asyncio.gather(*(one(i) for i in range(5)))

    try:
        results = asyncio.run(main())
    finally:
        workers.close()
    assert "overlap True" in events  # the two devices worked at once
    returned = [e for e in events if e.startswith("returned")]
    assert returned == [f"returned {i}" for i in range(5)]  # task order, not finishing order
    threads = [name.split("_")[0] for _, name in results]
    assert threads == [f"fedpipe-sim-{i % 2}" for i in range(5)]
    # At most one task per device runs ahead of the oldest reply not handed back: task 3
    # starts once task 1 has returned.
    assert events.index("start 3") > events.index("returned 1")


def test_a_failed_task_lets_the_next_ones_return() -> None:
    workers = DeviceWorkers(["cpu", "cpu"])

    def fail() -> int:
        raise ValueError("client 0 failed")

    async def main() -> list[Any]:
        turns: list[asyncio.Future[None]] = []
        calls = [workers.run(0, turns, fail), workers.run(1, turns, lambda: 1)]
        calls.append(workers.run(0, turns, lambda: 2))
        return await asyncio.gather(*calls, return_exceptions=True)

    try:
        first, *rest = asyncio.run(main())
    finally:
        workers.close()
    assert isinstance(first, ValueError) and rest == [1, 2]


def test_a_slot_that_cannot_bind_its_device_fails_its_work_instead_of_hanging() -> None:
    """A worker thread whose device cannot be made current (here a GPU index this machine
    lacks) must fail what was queued on it: a vectorized batch must not wait forever."""
    missing = f"cuda:{torch.cuda.device_count() + 3}"
    workers = DeviceWorkers([missing])
    errors: list[BaseException] = []
    got = threading.Event()

    def failed(error: BaseException) -> None:
        errors.append(error)
        got.set()

    try:
        for _ in range(2):  # the pool breaks on the first; the second is refused at once
            got.clear()
            workers.start(0, lambda: None, failed)
            assert got.wait(30), "the queued work neither ran nor failed"
        assert len(errors) == 2

        async def sequential() -> None:
            await workers.run(0, [], lambda: None)

        with pytest.raises(BrokenThreadPool):
            asyncio.run(asyncio.wait_for(sequential(), 30))
    finally:
        workers.close()
