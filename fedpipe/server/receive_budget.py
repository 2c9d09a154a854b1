"""How many bytes of reply payloads the server assembles at once, across all sessions.

Replies are assembled whole before they join the running sum; without a bound, N clients
answering at the same moment would need N model-sized buffers. A reply waits for its share
of the budget before anything is allocated, and its sender waits with it (gRPC flow control
holds the rest of its stream).
"""

from __future__ import annotations

import asyncio

__all__ = ["ReceiveBudget"]


class ReceiveBudget:
    """A byte semaphore. A request larger than the capacity takes all of it (so it passes
    alone) instead of waiting forever."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity={capacity}; expected at least 1 byte")
        self.capacity = capacity
        self.used = 0
        self._changed = asyncio.Condition()

    async def acquire(self, nbytes: int) -> int:
        """Wait until ``nbytes`` (at most the capacity) are free; return the amount held."""
        held = max(1, min(nbytes, self.capacity))
        async with self._changed:
            await self._changed.wait_for(lambda: self.used + held <= self.capacity)
            self.used += held
        return held

    async def release(self, held: int) -> None:
        async with self._changed:
            self.used -= held
            self._changed.notify_all()
