"""Secure aggregation's stages on the Dask transport (see ``docs/secure-aggregation.md``).

Each stage message crosses between the server and a worker as the bytes of its protobuf message
(``protos/fedpipe/v1/secagg.proto``), built and checked by :mod:`fedpipe.common.secagg.wire` as
over gRPC: no pickled record. A worker keeps, for each of its clients, the
:class:`~fedpipe.common.secagg.SecAggClient` of the round under way (:class:`WorkerSession`),
its keys and self-mask seed drawn there from ``os.urandom``. A client whose worker dies
mid-protocol drops out of that round's aggregation (the others recover the sum without it); a
client placed afresh on another worker has no session there and drops until the next round.
"""

from __future__ import annotations

import os
from typing import Literal

from fedpipe.common.aggregators import Aggregator
from fedpipe.common.protocol import ProtocolError
from fedpipe.common.secagg import SecAggClient, SecureAggregationError
from fedpipe.common.secagg.messages import Roster
from fedpipe.common.secagg.partials import masked_result
from fedpipe.common.secagg.wire import (
    forwarded_record,
    keys_message,
    roster_record,
    share_keys_message,
    unmask_request_record,
    unmask_shares_message,
)
from fedpipe.common.training import TrainResult
from fedpipe.proto.fedpipe.v1 import secagg_pb2 as spb

__all__ = ["Stage", "WorkerSession"]

Stage = Literal["secagg_advertise", "secagg_share", "secagg_unmask"]


class WorkerSession:
    """One client's secure aggregation of the round under way, on the worker that owns it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.round = 0
        self.client: SecAggClient | None = None

    def stage(self, stage: Stage, round_number: int, data: bytes | None) -> bytes:
        """The client's answer to ``stage`` of round ``round_number`` (``data``: the
        server's message of that stage, none for advertise)."""
        try:
            if stage == "secagg_advertise":
                self.round, self.client = round_number, SecAggClient(self.name, os.urandom)
                return keys_message(self.client.advertise()).SerializeToString()
            client = self._session(round_number)
            if stage == "secagg_share":
                roster = roster_record(spb.SecAggRoster.FromString(data or b""), self.name)
                return share_keys_message(client.share_keys(roster)).SerializeToString()
            self.client = None  # one reveal per session
            message = spb.SecAggUnmaskRequest.FromString(data or b"")
            request = unmask_request_record(message, _roster(client))
            return unmask_shares_message(client.unmask(request)).SerializeToString()
        except SecureAggregationError as exc:
            raise ProtocolError(f"secure aggregation: {exc}") from None

    def mask(
        self, round_number: int, data: bytes, aggregator: Aggregator, result: TrainResult
    ) -> TrainResult:
        """``result`` with its update masked in place of its partial (``data``: the shares
        forwarded to this client)."""
        client = self._session(round_number)
        message = spb.SecAggForwardedShares.FromString(data)
        shares = forwarded_record(message, self.name, _roster(client))
        try:
            return masked_result(client, aggregator, result, shares)
        except SecureAggregationError as exc:
            raise ProtocolError(f"secure aggregation: {exc}") from None

    def _session(self, round_number: int) -> SecAggClient:
        if self.client is None or round_number != self.round:
            raise ProtocolError(
                f"client {self.name}: no secure aggregation session for round {round_number} "
                "on this worker"
            )
        return self.client


def _roster(client: SecAggClient) -> Roster:
    if client.roster is None:
        raise ProtocolError("secure aggregation: no roster yet")
    return client.roster
