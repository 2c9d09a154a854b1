"""Secure aggregation's stage messages on the wire: a session whose every message goes through
protobuf bytes recovers the sum, and malformed messages are refused with what is wrong."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fedpipe.common.protocol import ProtocolError
from fedpipe.common.secagg import SecAggClient, SecAggServer
from fedpipe.common.secagg.messages import Roster
from fedpipe.common.secagg.wire import (
    forwarded_message,
    forwarded_record,
    keys_message,
    keys_record,
    roster_message,
    roster_record,
    share_keys_message,
    share_keys_record,
    unmask_request_message,
    unmask_request_record,
    unmask_shares_message,
    unmask_shares_record,
)
from fedpipe.proto.fedpipe.v1 import secagg_pb2 as spb
from tests.common.secagg_run import plain_sum, random_updates, seeded


def wired(message: Any) -> Any:
    """``message`` as the peer decodes it from its bytes."""
    return type(message).FromString(message.SerializeToString())


def test_a_session_through_the_wire_recovers_the_sum_with_a_client_lost() -> None:
    updates = random_updates(6)
    server = SecAggServer(threshold=3, neighbours=4, entropy=seeded(7))  # SecAgg+: 5 holders
    clients = {n: SecAggClient(n, seeded(i)) for i, n in enumerate(updates)}
    for name, client in clients.items():
        server.receive_keys(keys_record(wired(keys_message(client.advertise())), name))
    roster = server.roster()
    for name, client in clients.items():
        theirs = roster_record(wired(roster_message(roster, name)), name)
        assert theirs.holders(name) == roster.holders(name)
        shares = share_keys_message(client.share_keys(theirs))
        server.receive_shares(share_keys_record(wired(shares), name, roster))
    for name, forwarded in server.forward_shares().items():
        client = clients[name]
        shares = forwarded_record(wired(forwarded_message(forwarded)), name, client.roster)
        server.receive_masked(client.masked_input(shares, updates[name]))
    request = server.unmask_request()
    for name in request.survivors[1:]:  # the first is lost after masking
        client = clients[name]
        theirs = unmask_request_record(wired(unmask_request_message(request)), client.roster)
        revealed = unmask_shares_message(client.unmask(theirs))
        server.receive_unmask(unmask_shares_record(wired(revealed), name, roster))
    result = server.result()
    expected = plain_sum(updates, updates)
    bound = roster.encoding.error_bound(6)
    assert all(np.abs(result.total.coefs[k] - a).max() <= bound for k, a in expected.items())


@pytest.fixture
def roster() -> Roster:
    server = SecAggServer(threshold=3, entropy=seeded(1))
    for i, name in enumerate(["a", "b", "c", "d"]):
        server.receive_keys(SecAggClient(name, seeded(i)).advertise())
    return server.roster()


def share(holder: str = "b", size: int = 160, commitment: int = 32) -> spb.SecAggShare:
    return spb.SecAggShare(
        holder=holder,
        ciphertext=bytes(size),
        self_mask_commitment=bytes(commitment),
        mask_key_commitment=bytes(32),
    )


def revealed(owner: str = "b", size: int = 66) -> spb.SecAggRevealed:
    return spb.SecAggRevealed(owner=owner, share=bytes(size))


def roster_with(roster: Roster, change: Callable[[spb.SecAggRoster], None]) -> spb.SecAggRoster:
    message = roster_message(roster, "a")
    change(message)
    return message


MALFORMED: list[tuple[str, Callable[[Roster], object], str]] = [
    (
        "key",
        lambda r: keys_record(spb.SecAggKeys(cipher_key=bytes(32), mask_key=bytes(33)), "a"),
        "advertised mask_key: 33 bytes, expected 32",
    ),
    (
        "too many shares",
        lambda r: share_keys_record(spb.SecAggShareKeys(shares=[share()] * 5), "a", r),
        "5 shares, expected at most 4",
    ),
    (
        "share twice",
        lambda r: share_keys_record(spb.SecAggShareKeys(shares=[share()] * 2), "a", r),
        "holder 'b' appears twice",
    ),
    (
        "stranger",
        lambda r: share_keys_record(spb.SecAggShareKeys(shares=[share("zed")]), "a", r),
        "holder 'zed' is not expected here",
    ),
    (
        "ciphertext",
        lambda r: share_keys_record(spb.SecAggShareKeys(shares=[share(size=1 << 20)]), "a", r),
        "ciphertext for 'b': 1048576 bytes, expected 160",
    ),
    (
        "commitment",
        lambda r: share_keys_record(spb.SecAggShareKeys(shares=[share(commitment=0)]), "a", r),
        "self_mask_commitment for 'b': 0 bytes, expected 32",
    ),
    (
        "forwarded",
        lambda r: forwarded_record(
            spb.SecAggForwardedShares(ciphertexts=[spb.SecAggCiphertext(sender="b")]), "a", r
        ),
        "ciphertext from 'b': 0 bytes, expected 160",
    ),
    (
        "request",
        lambda r: unmask_request_record(spb.SecAggUnmaskRequest(survivors=["a", "zed"]), r),
        "survivor 'zed' is not on the roster",
    ),
    (
        "request twice",
        lambda r: unmask_request_record(spb.SecAggUnmaskRequest(dropped=["a", "a"]), r),
        "a dropped client appears twice",
    ),
    (
        "revealed",
        lambda r: unmask_shares_record(
            spb.SecAggUnmaskShares(mask_key_shares=[revealed(size=65)]), "a", r
        ),
        "mask_key_shares of 'b': 65 bytes, expected 66",
    ),
    (
        "too many revealed",
        lambda r: unmask_shares_record(
            spb.SecAggUnmaskShares(self_mask_shares=[revealed()] * 5), "a", r
        ),
        "5 self_mask_shares, expected at most 4",
    ),
    (
        "neighbour",
        lambda r: roster_record(roster_with(r, lambda m: m.neighbours.append(9)), "a"),
        "roster neighbours .*expected distinct positions below 4",
    ),
    (
        "member twice",
        lambda r: roster_record(roster_with(r, lambda m: m.members.append(m.members[1])), "a"),
        "a roster member appears twice",
    ),
    (
        "encoding",
        lambda r: roster_record(roster_with(r, lambda m: setattr(m.encoding, "bits", 64)), "a"),
        "roster encoding: bits: 64, expected an integer in",
    ),
    (
        "session",
        lambda r: roster_record(roster_with(r, lambda m: setattr(m, "session", b"")), "a"),
        "roster session: 0 bytes",
    ),
    (
        "not a member",
        lambda r: roster_record(roster_message(r, "a"), "eve"),
        "roster: 'eve' is not among its 4 clients",
    ),
]


@pytest.mark.parametrize(
    ("decode", "message"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_stage_messages_are_refused_with_the_reason(
    roster: Roster, decode: Callable[[Roster], object], message: str
) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode(roster)
