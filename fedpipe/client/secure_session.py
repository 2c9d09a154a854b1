"""A client process's part in secure aggregation (Bonawitz et al., 2017; SecAgg+ of Bell et
al., 2020): one :class:`~fedpipe.common.secagg.SecAggClient` per round, its randomness drawn
here from ``os.urandom`` (never from anything the server sends), fed the stage messages of
the federation stream (``protos/fedpipe/v1/secagg.proto``).

Every stage message is checked (:mod:`fedpipe.common.secagg.wire`) before the state machine
sees it; a malformed one, or one out of turn, raises :class:`~fedpipe.common.protocol.
ProtocolError` (the task's error reply), never anything the daemon does not catch.
"""

from __future__ import annotations

import os
from typing import Any

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
from fedpipe.proto.fedpipe.v1 import federation_pb2 as pb

__all__ = ["SecureSession"]


class SecureSession:
    """The secure aggregation of the round under way, for the client ``name``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._round = 0
        self._client: SecAggClient | None = None

    def stage(self, task: Any, reply: Any) -> None:
        """Answer a task of advertise, share or unmask: its message goes in ``reply``."""
        try:
            if task.kind == pb.TASK_KIND_SECAGG_ADVERTISE:
                # A fresh session: keys and self-mask seed from this machine's entropy.
                self._round, self._client = task.round, SecAggClient(self.name, os.urandom)
                reply.keys.CopyFrom(keys_message(self._client.advertise()))
            elif task.kind == pb.TASK_KIND_SECAGG_SHARE:
                client = self._session(task, "roster")
                roster = roster_record(task.roster, self.name)
                reply.share_keys.CopyFrom(share_keys_message(client.share_keys(roster)))
            else:
                client = self._session(task, "unmask_request")
                self._client = None  # one reveal per session
                request = unmask_request_record(task.unmask_request, self._roster(client))
                reply.unmask_shares.CopyFrom(unmask_shares_message(client.unmask(request)))
        except SecureAggregationError as exc:
            raise ProtocolError(f"secure aggregation: {exc}") from None

    def mask(self, task: Any, aggregator: Aggregator, result: TrainResult) -> TrainResult:
        """``result`` of a masked train task, its update masked in place of its partial."""
        client = self._session(task, "forwarded_shares")
        shares = forwarded_record(task.forwarded_shares, self.name, self._roster(client))
        try:
            return masked_result(client, aggregator, result, shares)
        except SecureAggregationError as exc:
            raise ProtocolError(f"secure aggregation: {exc}") from None

    def _session(self, task: Any, field: str) -> SecAggClient:
        if self._client is None or task.round != self._round:
            raise ProtocolError(f"no secure aggregation session for round {task.round}")
        if task.WhichOneof("secagg") != field:
            raise ProtocolError(f"a secure aggregation task of round {task.round} without {field}")
        return self._client

    @staticmethod
    def _roster(client: SecAggClient) -> Roster:
        roster = client.roster
        if roster is None:
            raise ProtocolError("secure aggregation: no roster yet")
        return roster
