"""Client proxies and the pool of connected clients.

The round loop never talks to gRPC: it talks to :class:`ClientProxy` objects. A gRPC proxy
stands for a remote client process; an in-process proxy for a simulated one.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedpipe.common.client_name import check_client_name
from fedpipe.common.outcome import RunOutcome
from fedpipe.common.summable import Summable
from fedpipe.common.training import EvalResult, RunSetup, TrainResult
from fedpipe.common.vector import ArraySpec, Vector

if TYPE_CHECKING:  # the secagg extra
    from fedpipe.common.secagg.messages import (
        AdvertiseKeys,
        ForwardedShares,
        Roster,
        ShareKeys,
        UnmaskRequest,
        UnmaskShares,
    )
    from fedpipe.server.cohorts import ClientCohort

__all__ = ["ClientError", "ClientPool", "ClientProxy", "RoundTask", "RunOutcome"]

log = logging.getLogger(__name__)


class ClientError(RuntimeError):
    """A client failed a task: it reported an error, sent bad data or went away."""


@dataclass
class RoundTask:
    """What the server sends for one round: the same object for every sampled client, so
    transports can encode it once and reuse the encoding (``cache``)."""

    round_number: int
    weights: Vector
    aux_vars: dict[str, Summable] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    #: Client name -> round of its latest aggregated reply (absent: none), sent with its
    #: train task: the module state it trains from (see ``fedpipe.client.state_store``).
    base_rounds: Mapping[str, int] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    #: A transport may receive each train reply's update to disk and leave it there for the
    #: round loop to fold (``TrainResult.spilled``): set when the round's sum streams.
    spill_updates: bool = False


class ClientProxy(ABC):
    """The server's handle on one client."""

    name: str
    n_train_samples: int = 0
    n_eval_samples: int = 0
    #: Set by the round loop once the client accepted the run setup.
    initialized: bool = False

    @abstractmethod
    async def initialize(self, setup: RunSetup, specs: Mapping[str, ArraySpec]) -> None:
        """Send the run setup; raise :class:`ClientError` if the client cannot take it."""

    @abstractmethod
    async def train(self, task: RoundTask) -> TrainResult:
        """Run one round of local training."""

    @abstractmethod
    async def evaluate(self, task: RoundTask) -> EvalResult:
        """Evaluate the global weights on the client's evaluation data."""

    @abstractmethod
    async def stop(self, outcome: RunOutcome) -> None:
        """Tell the client the run is over for it, and how it ended."""

    def cohort(self) -> ClientCohort | None:
        """The group this client trains a round with (:mod:`fedpipe.server.cohorts`), if its
        transport has one."""
        return None

    # ---- secure aggregation (fedpipe.server.secure_rounds): one session per round --------------

    async def secagg_advertise(self, round_number: int) -> AdvertiseKeys:
        """Stage 0: start the round's session with fresh client-side randomness; its keys."""
        raise self._no_secagg()

    async def secagg_share(self, roster: Roster) -> ShareKeys:
        """Stage 1: the session's secrets, secret-shared among the roster's holders."""
        raise self._no_secagg()

    async def train_masked(self, task: RoundTask, shares: ForwardedShares) -> TrainResult:
        """Stage 2: train, and reply with the update masked (``TrainResult.masked``) in place
        of the plain partial."""
        raise self._no_secagg()

    async def secagg_unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Stage 3: the shares that remove the masks of the sum (and end the session)."""
        raise self._no_secagg()

    def _no_secagg(self) -> ClientError:
        return ClientError(
            f"client {self.name}: {type(self).__name__} does not carry secure aggregation "
            "(the in-process, gRPC and Dask transports do); refusing to send a plain update "
            "instead"
        )

    #: A remote transport's secure aggregation of the round under way: (round, its roster
    #: once shared); the client's own state machine lives with the client.
    _secure_stage: tuple[int, Roster | None] | None = None

    def _secagg_round(self) -> int:
        if self._secure_stage is None:
            raise ClientError(f"client {self.name}: no secure aggregation session")
        return self._secure_stage[0]

    def _secagg_roster(self) -> Roster:
        if self._secure_stage is None or self._secure_stage[1] is None:
            raise ClientError(f"client {self.name}: no secure aggregation roster")
        return self._secure_stage[1]

    async def release(self) -> None:
        """The round loop is done with this client's last result: free what the transport
        held for it (the gRPC transport's share of the receive budget)."""
        return None  # in-process clients hold nothing


class ClientPool:
    """Connected clients, with waiting that wakes on arrival (no polling)."""

    def __init__(self) -> None:
        self._clients: dict[str, ClientProxy] = {}
        self._changed = asyncio.Condition()

    def __len__(self) -> int:
        return len(self._clients)

    def names(self) -> list[str]:
        return sorted(self._clients)

    def clients(self) -> list[ClientProxy]:
        return [self._clients[n] for n in sorted(self._clients)]

    def get(self, name: str) -> ClientProxy | None:
        return self._clients.get(name)

    async def add(self, proxy: ClientProxy) -> ClientProxy | None:
        """Add ``proxy``; return the proxy it replaces (same name, reconnecting), if any.

        Raises
        ------
        BadClientName
            ``proxy.name`` breaks the one rule of client names (a simulation's client list).
        """
        check_client_name(proxy.name)
        async with self._changed:
            previous = self._clients.get(proxy.name)
            self._clients[proxy.name] = proxy
            self._changed.notify_all()
        return previous

    async def remove(self, proxy: ClientProxy) -> None:
        async with self._changed:
            if self._clients.get(proxy.name) is proxy:
                del self._clients[proxy.name]
            self._changed.notify_all()

    async def wait_for(self, count: int, timeout: float) -> bool:
        """Wait until at least ``count`` clients are connected; False on timeout."""
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: len(self._clients) >= count), timeout
                )
            except TimeoutError:
                return False
        return True
