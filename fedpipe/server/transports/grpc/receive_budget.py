"""How many bytes of reply payloads the server assembles at once, across all sessions.

Replies are assembled whole before they join the running sum; without a bound, N clients
answering at the same moment would need N model-sized buffers. A reply waits for its share
of the budget before anything is allocated, and its sender waits with it (gRPC flow control
holds the rest of its stream).

Each peer's share is capped, so that one admitted client cannot starve the others:

* **Only an awaited, valid reply reserves.** The transport checks a reply's header against
  what its task expects (a train reply: Vectors of the model's specs, a bounded count; an
  evaluation reply: the metric states' size) before it asks for budget; a late or refused
  reply is skipped without a reservation.
* **One reply's worth per peer.** A peer holds at most one reservation, from the header of
  its reply until the round loop has folded it; the reservation is that reply's checked size.
* **Never the whole budget when others wait, unless it is earned.** With a budget of about
  one model (the default for models of 256 MiB and more), one reply takes all of it and the
  others wait behind it, in arrival order. The holder keeps it only

  - while its transfer keeps ``min_transfer_rate_kib`` (after ``transfer_grace`` seconds,
    with one chunk of slack, as an honest client at that rate would); below, its session is
    closed, and the rest of a dropped reply must keep that pace too;
  - while others wait, only if at its pace so far it arrives before its round ends (past
    the grace period): a reply that cannot count is refused and its budget given back;
  - only while its task awaits it: past the round deadline the budget goes back.

  A dropped reply's rest is skipped unallocated and the session goes on. So a peer keeps
  the others waiting at most ``transfer_grace + (reply + chunk) / min_transfer_rate``
  seconds, never past its round, and no longer than the grace period for a reply that
  cannot make its round. A client slow but on time still delays those behind it: with a
  budget of several replies they are assembled side by side.
* **Every failure path releases.** :meth:`ReceiveBudget.release` is synchronous and
  idempotent, so error handlers, ``finally`` blocks and session teardown can always call it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field

__all__ = ["BudgetError", "ReceiveBudget", "TransferFloor"]


class BudgetError(RuntimeError):
    """A holder asked for a second reservation while it still holds one."""


class ReceiveBudget:
    """A byte semaphore with one reservation per holder, granted in arrival order. A request
    larger than the capacity takes all of it (so it passes alone) instead of waiting forever."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity={capacity}; expected at least 1 byte")
        self.capacity = capacity
        self.used = 0
        self._held: dict[Hashable, int] = {}
        self._queue: deque[tuple[Hashable, int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        """Requests waiting for room."""
        return len(self._queue)

    def holds(self, holder: Hashable) -> int:
        """Bytes ``holder`` holds (0 for none)."""
        return self._held.get(holder, 0)

    async def acquire(self, holder: Hashable, nbytes: int) -> int:
        """Wait until ``nbytes`` (at most the capacity) are free; return the amount held.

        Raises
        ------
        BudgetError
            ``holder`` already holds a reservation (or waits for one).
        """
        if holder in self._held or any(h == holder for h, _, _ in self._queue):
            raise BudgetError(
                f"{holder} asked for {nbytes} bytes while holding {self.holds(holder)}; "
                "expected one reservation per holder"
            )
        amount = max(1, min(nbytes, self.capacity))
        if not self._queue and self.used + amount <= self.capacity:
            self._grant(holder, amount)
            return amount
        granted = asyncio.get_running_loop().create_future()
        entry = (holder, amount, granted)
        self._queue.append(entry)
        try:
            await granted
        except asyncio.CancelledError:
            if entry in self._queue:
                self._queue.remove(entry)
                self._wake()  # it may have been the head of the queue, blocking smaller ones
            else:  # granted as it was cancelled: give it back
                self.release(holder)
            raise
        return amount

    def release(self, holder: Hashable) -> int:
        """Free what ``holder`` holds; return the amount (0 if it held nothing)."""
        amount = self._held.pop(holder, 0)
        self.used -= amount
        if amount:
            self._wake()
        return amount

    def _grant(self, holder: Hashable, amount: int) -> None:
        self._held[holder] = amount
        self.used += amount

    def _wake(self) -> None:
        # Strict arrival order: a large request at the head is not overtaken by small ones.
        while self._queue and self.used + self._queue[0][1] <= self.capacity:
            holder, amount, granted = self._queue.popleft()
            if granted.cancelled():
                continue
            self._grant(holder, amount)
            granted.set_result(None)


@dataclass
class TransferFloor:
    """The pace a payload holding budget must keep: its first ``n`` bytes in within
    ``grace + (n + slack) / rate`` seconds of its reservation (``slack``: one chunk, since a
    chunk arrives whole, not byte by byte)."""

    nbytes: int
    rate: float  # bytes per second
    grace: float
    slack: int
    received: int = 0
    #: Whether the payload still holds its reservation (False: dropped, its rest skipped).
    reserved: bool = True
    #: When the reply's round ends at the latest (``time.monotonic()``).
    due: float = math.inf
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def progress(self) -> tuple[int, int, float]:
        """Bytes received, bytes announced, seconds since the reservation."""
        return self.received, self.nbytes, self.elapsed

    def time_left(self) -> float:
        """Seconds until more bytes are due."""
        due = self.grace + (self.received + self.slack) / self.rate
        return max(0.0, due - self.elapsed)

    def behind(self) -> bool:
        """True when, past the grace period, the pace so far would bring the last byte in
        after ``due``: a reply that cannot count, whoever waits behind it."""
        elapsed = self.elapsed
        if elapsed <= self.grace or not self.received:
            return False
        return self.started + elapsed * self.nbytes / self.received > self.due
