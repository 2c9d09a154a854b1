"""Devices of an in-process simulation: which ones a config names, and one worker per device.

``device = "cuda"`` means every GPU torch sees; ``"cuda:1"`` that one; a list names several
(the same name twice gives two model objects on that device: on a CPU-only machine,
``["cpu", "cpu"]`` exercises the routing of a two-GPU run). Torch is imported only when a
device is named.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from fedpipe.common.config import ConfigError

__all__ = ["DeviceWorkers", "resolve_devices"]

R = TypeVar("R")


def resolve_devices(device: str | Sequence[str] | None) -> list[str]:
    """The devices ``device`` (a simulation's ``device`` key) names, one per model object;
    ``[]`` when unset (the model stays where its factory put it).

    Raises
    ------
    ConfigError
        A named device is not there (no CUDA device, an index past the last GPU...).
    """
    if device is None:
        return []
    names = [device] if isinstance(device, str) else list(device)
    return [resolved for name in names for resolved in _resolve(name)]


def _resolve(name: str) -> list[str]:
    try:
        import torch
    except ImportError:
        raise ConfigError(
            f"device={name!r} places a torch model: install the torch extra "
            "(pip install 'fedpipe[torch]')"
        ) from None

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name == "auto":
        return [f"cuda:{i}" for i in range(gpus)] or ["cpu"]
    if name == "cuda":
        if not gpus:
            raise ConfigError(
                "device='cuda' but torch sees no CUDA device (torch.cuda.is_available() is "
                "False); use device='cpu' or 'auto'"
            )
        return [f"cuda:{i}" for i in range(gpus)]
    if name.startswith("cuda:") and int(name[5:]) >= gpus:
        raise ConfigError(f"device={name!r} but torch sees {gpus} CUDA device(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device='mps' but torch.backends.mps.is_available() is False")
    return [name]


class DeviceWorkers:
    """One worker thread per device slot, so that clients on different GPUs train at once,
    and their replies handed back in the order the tasks were given.

    The fold of a round adds replies in arrival order; handing them back in task order keeps
    a several-device run bit-identical to a one-device run (same sum, same order). At most
    one task per slot is started ahead of the oldest reply not handed back yet, so at most
    that many finished replies wait on a device.
    """

    def __init__(self, devices: Sequence[str]) -> None:
        self.devices = list(devices)
        self._pools = [
            ThreadPoolExecutor(1, f"fedpipe-sim-{i}", initializer=_bind, initargs=(device,))
            for i, device in enumerate(self.devices)
        ]

    async def run(self, slot: int, turns: list[asyncio.Future[None]], work: Callable[[], R]) -> R:
        """Run ``work`` on ``slot``'s thread; return after every earlier task of ``turns``
        (one list per round task, shared by its clients) has returned or failed."""
        k, n = len(turns), len(self._pools)

        async def started() -> R:
            if k >= n:
                await asyncio.wait({turns[k - n]})  # never cancels the other client's turn
            return await self.call(slot, work)

        return await self.in_turn(turns, started())

    async def call(self, slot: int, work: Callable[[], R]) -> R:
        """Run ``work`` on ``slot``'s thread, after the work queued there; its result or
        error (a cancelled caller stops waiting: the thread finishes the work)."""
        return await asyncio.get_running_loop().run_in_executor(self._pools[slot], work)

    @staticmethod
    async def in_turn(turns: list[asyncio.Future[None]], reply: Awaitable[R]) -> R:
        """Await ``reply``; return it after every earlier task of ``turns`` has returned or
        failed (takes its turn before awaiting anything)."""
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        turns.append(mine)
        k = len(turns) - 1
        try:
            result = await reply
            if k:
                await asyncio.wait({turns[k - 1]})
            return result
        finally:
            if not mine.done():
                mine.set_result(None)

    def start(
        self, slot: int, work: Callable[[], None], failed: Callable[[BaseException], None]
    ) -> None:
        """Queue ``work`` on ``slot``'s thread, after the work already queued there;
        ``failed(error)`` if it cannot run or raises (a slot whose thread could not bind its
        device, say), so that nobody waits on work that never ran."""
        try:
            future = self._pools[slot].submit(work)
        except Exception as exc:  # the pool is broken or shut down
            failed(exc)
            return

        def done(future: Future[None]) -> None:
            error = None if future.cancelled() else future.exception()
            if error is not None:
                failed(error)

        future.add_done_callback(done)

    def close(self) -> None:
        """Let the threads end once their work is done (idempotent)."""
        for pool in self._pools:
            pool.shutdown(wait=False, cancel_futures=True)


def _bind(device: str) -> None:
    """Make ``device`` the thread's current CUDA device, where kernels without an explicit
    device (and torch's caching allocator) go."""
    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index  # "cuda" alone: the current device stays
        if index is not None:
            torch.cuda.set_device(index)
