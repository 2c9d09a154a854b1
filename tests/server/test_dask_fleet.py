"""The Dask fleet's view of its workers, against a stand-in scheduler (no cluster): a worker
that leaves while the fleet starts to follow its events is not waited for."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("dask.distributed")

from fedpipe.server.transports.dask.proxy import DaskFleet


class _Scheduler:
    """Answers ``identity`` with the next of ``listings`` (each a list of worker addresses);
    one call too many fails the test."""

    def __init__(self, listings: list[list[str]]) -> None:
        self.listings = listings

    async def identity(self, n_workers: int = -1) -> dict[str, Any]:
        return {"workers": {address: {} for address in self.listings.pop(0)}}


class _Client:
    def __init__(self, listings: list[list[str]]) -> None:
        self.scheduler = _Scheduler(listings)
        self.followed: set[str] = set()

    def subscribe_topic(self, topic: str, handler: Any) -> None:
        self.followed.add(topic)

    def unsubscribe_topic(self, topic: str) -> None:
        self.followed.discard(topic)


def test_a_worker_gone_before_its_events_were_followed_is_dropped_at_once() -> None:
    # Listed, then gone before its topic was followed: its "remove-worker" event reached no
    # one, and a call to it would wait for the round deadline.
    client = _Client([["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"], ["tcp://127.0.0.1:1"]])
    fleet = DaskFleet(client)  # type: ignore[arg-type]
    asyncio.run(fleet._refresh())
    assert fleet.workers == ["tcp://127.0.0.1:1"]
    assert client.followed == {"tcp://127.0.0.1:1"}
    assert client.scheduler.listings == []  # asked twice: before and after following


def test_workers_already_followed_are_not_asked_about_twice() -> None:
    both = ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"]
    client = _Client([both, both, both])
    fleet = DaskFleet(client)  # type: ignore[arg-type]
    asyncio.run(fleet._refresh())
    asyncio.run(fleet._refresh())  # nobody new: one listing
    assert sorted(fleet.workers) == both and client.followed == set(both)
    assert client.scheduler.listings == []
