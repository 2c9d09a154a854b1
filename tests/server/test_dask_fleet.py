"""The Dask fleet's view of its workers, against a stand-in scheduler (no cluster): a worker
that leaves while the fleet starts to follow its events is not waited for; clients go only to
workers with the run's Dask resources."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

pytest.importorskip("dask.distributed")

from fedpipe.common.data import Dataset
from fedpipe.server.clients import ClientError
from fedpipe.server.transports.dask.proxy import DaskClient, DaskFleet

Listing = list[str] | dict[str, dict[str, float]]


class _Scheduler:
    """Answers ``identity`` with the next of ``listings`` (each the worker addresses, or each
    worker's Dask resources by address); one call too many fails the test."""

    def __init__(self, listings: list[Listing]) -> None:
        self.listings = listings

    async def identity(self, n_workers: int = -1) -> dict[str, Any]:
        listing = self.listings.pop(0)
        if isinstance(listing, list):
            listing = {address: {} for address in listing}
        return {"workers": {a: {"resources": r} for a, r in listing.items()}}


class _Client:
    def __init__(self, listings: list[Listing]) -> None:
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


def test_clients_go_only_to_workers_with_the_runs_resources() -> None:
    # dask.resources = {GPU = 1}: the CPU-only worker and the one with too little get none.
    workers = {
        "tcp://127.0.0.1:1": {"GPU": 1.0},
        "tcp://127.0.0.1:2": {},
        "tcp://127.0.0.1:3": {"GPU": 0.5},
        "tcp://127.0.0.1:4": {"GPU": 2.0, "MEM": 1.0},
    }
    client = _Client([workers, workers])
    fleet = DaskFleet(client, {"GPU": 1})  # type: ignore[arg-type]
    asyncio.run(fleet._refresh())
    assert sorted(fleet.workers) == ["tcp://127.0.0.1:1", "tcp://127.0.0.1:4"]
    data = Dataset(np.zeros((4, 3), np.float32), np.zeros(4, np.int64))
    placed = [fleet.place(DaskClient(f"c{i}", data, None, fleet))[0] for i in range(4)]
    assert sorted(placed) == ["tcp://127.0.0.1:1"] * 2 + ["tcp://127.0.0.1:4"] * 2


def test_no_worker_with_the_runs_resources_fails_each_client_saying_which() -> None:
    client = _Client([{"tcp://127.0.0.1:1": {}}])
    fleet = DaskFleet(client, {"GPU": 1})  # type: ignore[arg-type]
    asyncio.run(fleet._refresh())
    data = Dataset(np.zeros((4, 3), np.float32), np.zeros(4, np.int64))
    with pytest.raises(ClientError) as failed:
        fleet.place(DaskClient("c0", data, None, fleet))
    assert (
        str(failed.value) == "no Dask worker with resources {'GPU': 1} is alive to take client c0"
    )
