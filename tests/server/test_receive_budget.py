"""The receive budget: bytes of replies assembled at once, one reservation per peer."""

from __future__ import annotations

import asyncio
import time

import pytest

from fedpipe.server.transports.grpc.receive_budget import BudgetError, ReceiveBudget, TransferFloor


async def test_requests_wait_for_room_and_oversize_ones_pass_alone() -> None:
    budget = ReceiveBudget(100)
    assert await budget.acquire("a", 60) == 60
    waiting = asyncio.create_task(budget.acquire("b", 60))
    await asyncio.sleep(0.05)
    assert not waiting.done() and budget.used == 60 and budget.waiting == 1  # 60 + 60 > 100
    assert budget.release("a") == 60
    assert await asyncio.wait_for(waiting, 1) == 60
    assert budget.release("b") == 60
    assert await budget.acquire("c", 10_000) == 100  # clamped to the capacity
    assert budget.used == 100


async def test_a_peer_holds_one_reservation_and_release_is_idempotent() -> None:
    budget = ReceiveBudget(100)
    await budget.acquire("a", 10)
    with pytest.raises(BudgetError, match="one reservation per holder"):
        await budget.acquire("a", 10)
    assert budget.release("a") == 10
    assert budget.release("a") == 0  # a second failure path releasing again frees nothing
    assert budget.used == 0 and budget.holds("a") == 0


async def test_waiters_are_served_in_arrival_order() -> None:
    budget = ReceiveBudget(100)
    await budget.acquire("holder", 100)
    big = asyncio.create_task(budget.acquire("big", 100))
    await asyncio.sleep(0.01)
    small = asyncio.create_task(budget.acquire("small", 10))
    await asyncio.sleep(0.01)
    budget.release("holder")
    await asyncio.sleep(0.01)
    assert big.done() and not small.done()  # the large request is not overtaken forever
    budget.release("big")
    assert await asyncio.wait_for(small, 1) == 10


async def test_a_cancelled_waiter_leaves_the_queue_and_unblocks_the_next() -> None:
    budget = ReceiveBudget(100)
    await budget.acquire("holder", 50)
    head = asyncio.create_task(budget.acquire("head", 100))
    await asyncio.sleep(0.01)
    behind = asyncio.create_task(budget.acquire("behind", 50))
    await asyncio.sleep(0.01)
    head.cancel()  # the session of the peer at the head of the queue ended
    assert await asyncio.wait_for(behind, 1) == 50
    assert budget.used == 100 and budget.waiting == 0


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity=0"):
        ReceiveBudget(0)


def test_the_transfer_floor_allows_grace_and_one_chunk_then_the_rate() -> None:
    # 1,000 B/s after 2 s, 500 B of slack: the first bytes are due 2.5 s after the reservation.
    one_second_ago = time.monotonic() - 1.0
    floor = TransferFloor(nbytes=10_000, rate=1000.0, grace=2.0, slack=500, started=one_second_ago)
    assert floor.time_left() == pytest.approx(1.5, abs=0.1)
    floor.received = 3000  # 3 s more for 3,000 B
    assert floor.time_left() == pytest.approx(4.5, abs=0.1)
    floor.started -= 10.0  # 3,000 B in 11 s: below the floor, due now
    assert floor.time_left() == 0.0
