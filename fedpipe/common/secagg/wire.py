"""Secure aggregation's records on the federation stream (``protos/fedpipe/v1/secagg.proto``),
both ways (Bonawitz et al., 2017, Fig. 4: the server relays what clients send each other).

Every message from the network is untrusted: a ``*_record`` function bounds it (how many
entries, how many bytes per key, ciphertext, commitment and share, names unique and on the
roster) before a state machine sees it, and raises :class:`~fedpipe.common.protocol.ProtocolError`
saying what is wrong. A message never names its sender: the session it came on does.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from typing import Any

from fedpipe.common.client_name import MAX_NAME_LENGTH, BadClientName, check_client_name
from fedpipe.common.protocol import ProtocolError
from fedpipe.common.secagg import shamir
from fedpipe.common.secagg.keys import KEY_BYTES, SEALED_OVERHEAD
from fedpipe.common.secagg.messages import (
    AdvertiseKeys,
    ForwardedShares,
    Roster,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
)
from fedpipe.common.secagg.quantization import FixedPoint
from fedpipe.proto.fedpipe.v1 import secagg_pb2 as spb

__all__ = [
    "CIPHERTEXT_BYTES",
    "MAX_ROSTER",
    "forwarded_message",
    "forwarded_record",
    "keys_message",
    "keys_record",
    "roster_message",
    "roster_record",
    "share_keys_message",
    "share_keys_record",
    "unmask_request_message",
    "unmask_request_record",
    "unmask_shares_message",
    "unmask_shares_record",
]

#: Most clients in a roster (a session of more would cost each client too much anyway).
MAX_ROSTER = 1 << 16
#: Bytes of one holder's ciphertext: its self-mask share and its mask-key share, sealed.
CIPHERTEXT_BYTES = 2 * shamir.SHARE_BYTES + SEALED_OVERHEAD
COMMITMENT_BYTES = 32  # SHA-256
MAX_SESSION_BYTES = 64


# ---- stage 0: keys ------------------------------------------------------------------------


def keys_message(record: AdvertiseKeys) -> spb.SecAggKeys:
    return spb.SecAggKeys(cipher_key=record.cipher_key, mask_key=record.mask_key)


def keys_record(message: spb.SecAggKeys, client: str) -> AdvertiseKeys:
    """``client``'s advertised keys: two X25519 public keys of 32 bytes."""
    _sized(message.cipher_key, KEY_BYTES, "advertised cipher_key")
    _sized(message.mask_key, KEY_BYTES, "advertised mask_key")
    return AdvertiseKeys(client, bytes(message.cipher_key), bytes(message.mask_key))


# ---- stage 1: roster, shares --------------------------------------------------------------


def roster_message(roster: Roster, recipient: str) -> spb.SecAggRoster:
    """``roster`` as ``recipient`` receives it: every member's keys, its own neighbours."""
    position = {c: i for i, c in enumerate(roster.clients)}
    encoding = roster.encoding
    return spb.SecAggRoster(
        session=roster.session,
        members=[
            spb.SecAggMember(name=c, cipher_key=roster.cipher_keys[c], mask_key=roster.mask_keys[c])
            for c in roster.clients
        ],
        neighbours=[position[c] for c in roster.neighbours[recipient]],
        threshold=roster.threshold,
        encoding=spb.SecAggEncoding(
            bits=encoding.bits,
            clip=encoding.clip,
            clients=encoding.clients,
            max_weight=encoding.max_weight,
        ),
    )


def roster_record(message: spb.SecAggRoster, recipient: str) -> Roster:
    """The roster the server sent ``recipient``; its graph holds ``recipient``'s neighbours
    only (all a client needs)."""
    members = message.members
    if not 1 <= len(message.session) <= MAX_SESSION_BYTES:
        raise ProtocolError(f"roster session: {len(message.session)} bytes, expected 1 to 64")
    if not 2 <= len(members) <= MAX_ROSTER:
        raise ProtocolError(f"roster of {len(members)} clients, expected 2 to {MAX_ROSTER}")
    names = _names((m.name for m in members), "roster member")
    for member in members:
        _sized(member.cipher_key, KEY_BYTES, f"roster cipher_key of {member.name!r}")
        _sized(member.mask_key, KEY_BYTES, f"roster mask_key of {member.name!r}")
    if recipient not in names:
        raise ProtocolError(f"roster: {recipient!r} is not among its {len(names)} clients")
    own = names.index(recipient)
    indices = list(message.neighbours)
    if len(set(indices)) != len(indices) or not all(i < len(names) and i != own for i in indices):
        raise ProtocolError(
            f"roster neighbours {indices[:8]}: expected distinct positions below {len(names)}, "
            f"not the recipient's own ({own})"
        )
    encoding = message.encoding
    if not math.isfinite(encoding.clip):
        raise ProtocolError(f"roster encoding clip {encoding.clip}: expected a finite number")
    try:
        fixed = FixedPoint(
            int(encoding.bits),
            float(encoding.clip),
            int(encoding.clients),
            int(encoding.max_weight),
        )
    except ValueError as exc:
        raise ProtocolError(f"roster encoding: {exc}") from None
    return Roster(
        session=bytes(message.session),
        clients=tuple(names),
        cipher_keys={m.name: bytes(m.cipher_key) for m in members},
        mask_keys={m.name: bytes(m.mask_key) for m in members},
        neighbours={recipient: tuple(names[i] for i in sorted(indices))},
        threshold=int(message.threshold),
        encoding=fixed,
    )


def share_keys_message(record: ShareKeys) -> spb.SecAggShareKeys:
    return spb.SecAggShareKeys(
        shares=[
            spb.SecAggShare(
                holder=holder,
                ciphertext=ciphertext,
                self_mask_commitment=record.commitments[holder][0],
                mask_key_commitment=record.commitments[holder][1],
            )
            for holder, ciphertext in record.ciphertexts.items()
        ]
    )


def share_keys_record(message: spb.SecAggShareKeys, client: str, roster: Roster) -> ShareKeys:
    """``client``'s shares: one per holder of the roster's, each of the expected sizes."""
    holders = roster.holders(client)
    shares = message.shares
    _counted(len(shares), len(holders), "shares")
    ciphertexts = _entries(((s.holder, s.ciphertext) for s in shares), holders, "holder")
    commitments = {}
    for share in shares:
        _sized(share.ciphertext, CIPHERTEXT_BYTES, f"ciphertext for {share.holder!r}")
        for field in ("self_mask_commitment", "mask_key_commitment"):
            _sized(getattr(share, field), COMMITMENT_BYTES, f"{field} for {share.holder!r}")
        commitments[share.holder] = (
            bytes(share.self_mask_commitment),
            bytes(share.mask_key_commitment),
        )
    return ShareKeys(client, ciphertexts, commitments)


# ---- stage 2: forwarded shares (the masked input is the train reply's payload) -------------


def forwarded_message(record: ForwardedShares) -> spb.SecAggForwardedShares:
    return spb.SecAggForwardedShares(
        ciphertexts=[
            spb.SecAggCiphertext(sender=s, ciphertext=c) for s, c in record.ciphertexts.items()
        ]
    )


def forwarded_record(
    message: spb.SecAggForwardedShares, recipient: str, roster: Roster
) -> ForwardedShares:
    """The ciphertexts relayed to ``recipient``: from its holders, of the expected size."""
    holders = roster.holders(recipient)
    entries = message.ciphertexts
    _counted(len(entries), len(holders), "forwarded ciphertexts")
    for entry in entries:
        _sized(entry.ciphertext, CIPHERTEXT_BYTES, f"ciphertext from {entry.sender!r}")
    return ForwardedShares(
        recipient, _entries(((e.sender, e.ciphertext) for e in entries), holders, "sender")
    )


# ---- stage 3: unmasking -------------------------------------------------------------------


def unmask_request_message(record: UnmaskRequest) -> spb.SecAggUnmaskRequest:
    return spb.SecAggUnmaskRequest(survivors=record.survivors, dropped=record.dropped)


def unmask_request_record(message: spb.SecAggUnmaskRequest, roster: Roster) -> UnmaskRequest:
    """Who survived and who dropped: distinct names of the roster."""
    survivors = _names(message.survivors, "survivor", roster.clients)
    dropped = _names(message.dropped, "dropped client", roster.clients)
    return UnmaskRequest(tuple(survivors), tuple(dropped))


def unmask_shares_message(record: UnmaskShares) -> spb.SecAggUnmaskShares:
    return spb.SecAggUnmaskShares(
        self_mask_shares=[
            spb.SecAggRevealed(owner=o, share=s) for o, s in record.self_mask_shares.items()
        ],
        mask_key_shares=[
            spb.SecAggRevealed(owner=o, share=s) for o, s in record.mask_key_shares.items()
        ],
    )


def unmask_shares_record(
    message: spb.SecAggUnmaskShares, client: str, roster: Roster
) -> UnmaskShares:
    """``client``'s revealed shares: at most one per roster client and kind, 66 bytes each."""
    revealed = []
    for kind in ("self_mask_shares", "mask_key_shares"):
        entries = getattr(message, kind)
        _counted(len(entries), len(roster.clients), kind)
        for entry in entries:
            _sized(entry.share, shamir.SHARE_BYTES, f"{kind} of {entry.owner!r}")
        revealed.append(_entries(((e.owner, e.share) for e in entries), roster.clients, "owner"))
    return UnmaskShares(client, revealed[0], revealed[1])


# ---- checks -------------------------------------------------------------------------------


def _sized(data: bytes, expected: int, what: str) -> None:
    if len(data) != expected:
        raise ProtocolError(f"{what}: {len(data)} bytes, expected {expected}")


def _counted(count: int, most: int, what: str) -> None:
    if count > most:
        raise ProtocolError(f"{count} {what}, expected at most {most}")


def _names(names: Iterable[str], what: str, allowed: Collection[str] | None = None) -> list[str]:
    """``names`` as a list, checked: distinct, client names (:func:`check_client_name`), among
    ``allowed``."""
    allowed = None if allowed is None else frozenset(allowed)
    out: list[str] = []
    for name in names:
        if allowed is not None and name not in allowed:
            raise ProtocolError(f"{what} {name[:MAX_NAME_LENGTH]!r} is not on the roster")
        try:
            out.append(check_client_name(name, f"{what} name"))
        except BadClientName as exc:
            raise ProtocolError(str(exc)) from None
        if allowed is not None and len(out) > len(allowed):
            break
    if len(set(out)) != len(out):
        raise ProtocolError(f"a {what} appears twice")
    return out


def _entries(
    pairs: Iterable[tuple[str, Any]], allowed: Collection[str], what: str
) -> dict[str, bytes]:
    """``{name: bytes}`` of ``pairs`` whose names are distinct and among ``allowed``."""
    allowed, out = frozenset(allowed), {}
    for name, data in pairs:
        if name not in allowed:
            raise ProtocolError(f"{what} {name[:MAX_NAME_LENGTH]!r} is not expected here")
        if name in out:
            raise ProtocolError(f"{what} {name!r} appears twice")
        out[name] = bytes(data)
    return out
