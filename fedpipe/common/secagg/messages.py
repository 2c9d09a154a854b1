"""The records that secure aggregation's clients and server exchange, stage by stage
(Bonawitz et al., 2017, Fig. 4; the server relays everything clients send each other).

0. :class:`AdvertiseKeys` (client → server), answered by one :class:`Roster` to all;
1. :class:`ShareKeys` (client → server), relayed as one :class:`ForwardedShares` per client;
2. :class:`MaskedInput` (client → server), answered by one :class:`UnmaskRequest` to all;
3. :class:`UnmaskShares` (client → server), from which the server computes the
   :class:`AggregateResult`.

They hold bytes, strings and numpy arrays only: a transport encodes them without pickle.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from fedpipe.common.secagg.quantization import FixedPoint
from fedpipe.common.vector import Vector

__all__ = [
    "AdvertiseKeys",
    "AggregateResult",
    "ForwardedShares",
    "MaskedInput",
    "Roster",
    "SecureAggregationError",
    "ShareKeys",
    "UnmaskRequest",
    "UnmaskShares",
    "commit_share",
    "pair_label",
]


class SecureAggregationError(RuntimeError):
    """The protocol cannot go on: too few clients left, or a message out of turn."""


@dataclass(frozen=True)
class AdvertiseKeys:
    """A client's two X25519 public keys: one to encrypt shares, one to agree on masks."""

    client: str
    cipher_key: bytes
    mask_key: bytes


@dataclass(frozen=True)
class Roster:
    """Who takes part (a client's Shamir x-coordinate is its position + 1), their public
    keys, the neighbour graph, the threshold and the fixed-point encoding."""

    session: bytes
    clients: tuple[str, ...]
    cipher_keys: Mapping[str, bytes]
    mask_keys: Mapping[str, bytes]
    neighbours: Mapping[str, tuple[str, ...]]
    threshold: int
    encoding: FixedPoint

    def index(self, client: str) -> int:
        """``client``'s Shamir x-coordinate."""
        position = self._positions.get(client)
        if position is None:
            raise ValueError(f"client {client!r} is not in the roster {list(self.clients)}")
        return position + 1

    @functools.cached_property
    def _positions(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.clients)}

    def holders(self, client: str) -> tuple[str, ...]:
        """Who holds shares of ``client``'s secrets: itself and its neighbours."""
        return (client, *self.neighbours[client])


@dataclass(frozen=True)
class ShareKeys:
    """A client's encrypted shares, one ciphertext per holder, and for the server the
    commitments (:func:`commit_share`) to the self-mask share and the mask-key share of each
    holder."""

    client: str
    ciphertexts: Mapping[str, bytes]
    commitments: Mapping[str, tuple[bytes, bytes]]


@dataclass(frozen=True)
class ForwardedShares:
    """The ciphertexts addressed to ``recipient``, by sender: the senders are the clients,
    among the recipient and its neighbours, that shared their keys."""

    recipient: str
    ciphertexts: Mapping[str, bytes]


@dataclass(frozen=True)
class MaskedInput:
    """A client's encoded input plus its self mask and pairwise masks (unsigned arrays)."""

    client: str
    masked: Vector


@dataclass(frozen=True)
class UnmaskRequest:
    """Whose self masks to remove (``survivors``: sent masked input) and whose pairwise masks
    to remove (``dropped``: shared keys but sent no masked input)."""

    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass(frozen=True)
class UnmaskShares:
    """A survivor's shares: of the self-mask seed of each survivor, of the mask key of each
    dropped client (serialized field elements, by owner)."""

    client: str
    self_mask_shares: Mapping[str, bytes]
    mask_key_shares: Mapping[str, bytes]


@dataclass(frozen=True)
class AggregateResult:
    """The weighted sum of the survivors' inputs (float64 arrays), the sum of their weights
    (their count when unweighted), and who took part how."""

    total: Vector
    total_weight: int
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    excluded: tuple[str, ...]  # survivors whose unmasking shares were wrong


def pair_label(purpose: bytes, first: str, second: str) -> bytes:
    """``purpose`` bound to two client names, unambiguously (length-prefixed)."""
    a, b = first.encode(), second.encode()
    return b"fedpipe-secagg/" + purpose + len(a).to_bytes(4, "big") + a + b


def commit_share(session: bytes, kind: bytes, owner: str, holder: str, share: bytes) -> bytes:
    """SHA-256 commitment to the share of ``owner``'s secret ``kind`` held by ``holder``:
    shares are uniform 521-bit field elements, so the hash hides them, and binds them."""
    return hashlib.sha256(session + pair_label(kind, owner, holder) + share).digest()
