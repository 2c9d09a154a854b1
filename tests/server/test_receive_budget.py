"""The receive budget: bytes of replies assembled at once."""

from __future__ import annotations

import asyncio

import pytest

from fedpipe.server.receive_budget import ReceiveBudget


async def test_requests_wait_for_room_and_oversize_ones_pass_alone() -> None:
    budget = ReceiveBudget(100)
    first = await budget.acquire(60)
    waiting = asyncio.create_task(budget.acquire(60))
    await asyncio.sleep(0.05)
    assert not waiting.done() and budget.used == 60  # 60 + 60 > 100: it waits
    await budget.release(first)
    assert await asyncio.wait_for(waiting, 1) == 60
    await budget.release(60)
    assert await budget.acquire(10_000) == 100  # clamped to the capacity
    assert budget.used == 100


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity=0"):
        ReceiveBudget(0)
