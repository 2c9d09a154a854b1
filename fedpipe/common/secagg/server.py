"""The server side of secure aggregation, as a state machine (Bonawitz et al., 2017, Fig. 4;
Bell et al., 2020 for the neighbour graph).

The server relays keys and encrypted shares, sums the masked inputs as they arrive (one
running sum, modulo ``2**bits``), then removes the masks: each survivor's self mask from its
reconstructed seed, and each dropped client's pairwise masks from its reconstructed mask key.
Every revealed share is checked against the commitment its owner made when sharing: a
client that reveals a wrong share is excluded from reconstruction and reported.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from enum import Enum

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedpipe.common.secagg import shamir
from fedpipe.common.secagg.client import MASK_KEY, SELF_MASK, pairwise_seed
from fedpipe.common.secagg.graph import neighbour_graph
from fedpipe.common.secagg.keys import KEY_BYTES, public_bytes
from fedpipe.common.secagg.messages import (
    AdvertiseKeys,
    AggregateResult,
    ForwardedShares,
    MaskedInput,
    Roster,
    SecureAggregationError,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
    commit_share,
)
from fedpipe.common.secagg.prg import add_masks
from fedpipe.common.secagg.quantization import FixedPoint
from fedpipe.common.vector import Vector

__all__ = ["SecAggServer"]

logger = logging.getLogger(__name__)

#: Where each kind of share's commitment sits in :attr:`ShareKeys.commitments`.
_POSITION = {SELF_MASK: 0, MASK_KEY: 1}


class _Stage(Enum):
    ADVERTISE = "collect keys"
    SHARE = "collect shares"
    MASK = "collect masked inputs"
    UNMASK = "collect unmasking shares"
    DONE = "done"


class SecAggServer:
    """The server's part in one secure aggregation.

    Parameters
    ----------
    threshold:
        Shares needed to reconstruct a client's secret (``t``): the sum is recovered while at
        least ``t`` holders of each client's shares answer, and up to ``t - 1`` colluding
        clients learn nothing about an honest client's input.
    bits, clip:
        The fixed-point encoding (:class:`~fedpipe.common.secagg.quantization.FixedPoint`).
    neighbours:
        Degree of the SecAgg+ neighbour graph (even), or None for the complete graph.
    entropy:
        Random bytes for the session id and the graph (public values).
    """

    def __init__(
        self,
        threshold: int,
        bits: int = 32,
        clip: float = 1.0,
        neighbours: int | None = None,
        max_weight: int = 1,
        entropy: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.threshold, self.bits, self.clip, self.neighbours = threshold, bits, clip, neighbours
        self.max_weight = max_weight
        self._entropy = entropy
        self._stage = _Stage.ADVERTISE
        self._keys: dict[str, AdvertiseKeys] = {}
        self._roster: Roster | None = None
        self._shares: dict[str, ShareKeys] = {}
        self._sum: Vector | None = None
        self._masked: list[str] = []
        self._request: UnmaskRequest | None = None
        self._revealed: dict[str, UnmaskShares] = {}
        self._excluded: list[str] = []

    # ---- stage 0: keys -----------------------------------------------------------------------

    def receive_keys(self, message: AdvertiseKeys) -> None:
        self._expect(_Stage.ADVERTISE)
        if message.client in self._keys:
            raise SecureAggregationError(f"client {message.client!r} advertised keys twice")
        for field in ("cipher_key", "mask_key"):
            if len(getattr(message, field)) != KEY_BYTES:
                raise SecureAggregationError(
                    f"{field} of {message.client!r}: {len(getattr(message, field))} bytes, "
                    f"expected {KEY_BYTES}"
                )
        self._keys[message.client] = message

    def roster(self) -> Roster:
        """Close stage 0: the roster every client of it receives."""
        self._expect(_Stage.ADVERTISE)
        clients = tuple(self._keys)
        graph = neighbour_graph(clients, self.neighbours, self._entropy)
        smallest = min((len(n) + 1 for n in graph.values()), default=0)
        if not 2 <= self.threshold <= smallest:
            raise SecureAggregationError(
                f"threshold {self.threshold} with {len(clients)} clients advertising keys and "
                f"{smallest} holders per client: expected 2 <= threshold <= {smallest}"
            )
        self._roster = Roster(
            session=self._entropy(16),
            clients=clients,
            cipher_keys={c: k.cipher_key for c, k in self._keys.items()},
            mask_keys={c: k.mask_key for c, k in self._keys.items()},
            neighbours=graph,
            threshold=self.threshold,
            encoding=FixedPoint(self.bits, self.clip, len(clients), self.max_weight),
        )
        self._stage = _Stage.SHARE
        return self._roster

    # ---- stage 1: shares ---------------------------------------------------------------------

    def receive_shares(self, message: ShareKeys) -> None:
        self._expect(_Stage.SHARE)
        roster = self._require_roster()
        sender = message.client
        if sender not in roster.clients or sender in self._shares:
            raise SecureAggregationError(
                f"shares from {sender!r}: not in the roster, or sent twice"
            )
        holders = set(roster.holders(sender))
        if set(message.ciphertexts) != holders or set(message.commitments) != holders:
            raise SecureAggregationError(
                f"shares from {sender!r} address {sorted(message.ciphertexts)}, "
                f"expected its holders {sorted(holders)}"
            )
        self._shares[sender] = message

    def forward_shares(self) -> dict[str, ForwardedShares]:
        """Close stage 1: the ciphertexts for each client that shared keys."""
        self._expect(_Stage.SHARE)
        roster = self._require_roster()
        self._check_enough("shared keys", len(self._shares))
        forwarded = {
            recipient: ForwardedShares(
                recipient,
                {
                    sender: self._shares[sender].ciphertexts[recipient]
                    for sender in roster.holders(recipient)
                    if sender in self._shares
                },
            )
            for recipient in self._shares
        }
        self._stage = _Stage.MASK
        return forwarded

    # ---- stage 2: masked inputs --------------------------------------------------------------

    def receive_masked(self, message: MaskedInput) -> None:
        """Add a masked input to the running sum (streaming: nothing else is kept)."""
        self._expect(_Stage.MASK)
        encoding = self._require_roster().encoding
        if message.client not in self._shares or message.client in self._masked:
            raise SecureAggregationError(
                f"masked input from {message.client!r}: it did not share keys, or sent twice"
            )
        masked = message.masked
        if any(a.dtype != encoding.dtype for a in masked.coefs.values()):
            raise SecureAggregationError(
                f"masked input from {message.client!r}: expected {encoding.dtype.name} arrays"
            )
        if self._sum is None:
            self._sum = masked.copy()
        else:
            masked.check_specs(self._sum.specs(), f"masked input from {message.client!r}")
            self._sum.add_(masked)
        self._masked.append(message.client)

    def unmask_request(self) -> UnmaskRequest:
        """Close stage 2: who sent masked input, who dropped after sharing keys."""
        self._expect(_Stage.MASK)
        self._check_enough("sent masked inputs", len(self._masked))
        dropped = tuple(c for c in self._shares if c not in self._masked)
        self._request = UnmaskRequest(tuple(self._masked), dropped)
        self._stage = _Stage.UNMASK
        return self._request

    # ---- stage 3: unmasking ------------------------------------------------------------------

    def receive_unmask(self, message: UnmaskShares) -> None:
        """Keep a survivor's shares if every one matches its owner's commitment; otherwise
        exclude the survivor (it lied, or its shares were corrupted) and log why."""
        self._expect(_Stage.UNMASK)
        request = self._require_request()
        sender = message.client
        if sender not in request.survivors or sender in self._revealed:
            raise SecureAggregationError(
                f"unmasking shares from {sender!r}: not a survivor, or sent twice"
            )
        problem = self._check_revealed(message)
        if problem:
            logger.warning("secure aggregation: excluding %r: %s", sender, problem)
            self._excluded.append(sender)
            return
        self._revealed[sender] = message

    def result(self) -> AggregateResult:
        """Close stage 3: the unmasked sum of the survivors' inputs."""
        self._expect(_Stage.UNMASK)
        roster, request = self._require_roster(), self._require_request()
        if self._sum is None:
            raise SecureAggregationError("no masked input was received")
        total = self._sum
        add_masks(total, *self._masks_to_remove(roster, request))
        modulus_mask = (1 << roster.encoding.bits) - 1
        total = total.apply(lambda a: a & a.dtype.type(modulus_mask))
        self._stage = _Stage.DONE
        weighted_sum, total_weight = roster.encoding.decode(total)
        return AggregateResult(
            total=weighted_sum,
            total_weight=total_weight,
            survivors=request.survivors,
            dropped=request.dropped,
            excluded=tuple(self._excluded),
        )

    # ---- helpers -----------------------------------------------------------------------------

    def _masks_to_remove(
        self, roster: Roster, request: UnmaskRequest
    ) -> tuple[list[bytes], list[bytes]]:
        """The seeds of the masks to add to, and to subtract from, the sum: each survivor's
        self mask goes, and so does every pairwise mask a dropped client shared with a survivor
        (which added it if it came first in the roster, else subtracted it)."""
        survivors, added = set(request.survivors), list[bytes]()
        subtracted = [
            self._reconstruct(owner, SELF_MASK).to_bytes(KEY_BYTES, "big")
            for owner in request.survivors
        ]
        for owner in request.dropped:
            key = self._reconstruct_mask_key(owner)
            for peer in roster.neighbours[owner]:
                if peer in survivors:
                    seed = pairwise_seed(roster, key, owner, peer)
                    first = roster.index(peer) < roster.index(owner)
                    (subtracted if first else added).append(seed)
        return added, subtracted

    def _check_revealed(self, message: UnmaskShares) -> str:
        roster, request = self._require_roster(), self._require_request()
        wanted = (
            (SELF_MASK, message.self_mask_shares, request.survivors),
            (MASK_KEY, message.mask_key_shares, request.dropped),
        )
        for kind, shares, owners in wanted:
            for owner, share in shares.items():
                if owner not in owners or message.client not in roster.holders(owner):
                    return f"a {kind.decode()} share of {owner!r} was not asked of it"
                expected = self._shares[owner].commitments[message.client][_POSITION[kind]]
                if commit_share(roster.session, kind, owner, message.client, share) != expected:
                    return f"its {kind.decode()} share of {owner!r} does not match the commitment"
        return ""

    def _reconstruct(self, owner: str, kind: bytes) -> int:
        roster = self._require_roster()
        shares = {}
        for holder, message in self._revealed.items():
            revealed = message.mask_key_shares if kind == MASK_KEY else message.self_mask_shares
            if owner in revealed:
                shares[roster.index(holder)] = shamir.share_from_bytes(revealed[owner])
        if len(shares) < roster.threshold:
            raise SecureAggregationError(
                f"only {len(shares)} valid {kind.decode()} shares of {owner!r} arrived "
                f"(excluded: {self._excluded}), fewer than the threshold {roster.threshold}: "
                f"the sum cannot be unmasked"
            )
        secret = shamir.reconstruct(shares, roster.threshold)
        if secret >= 1 << (8 * KEY_BYTES):
            raise SecureAggregationError(f"the {kind.decode()} of {owner!r} is not 32 bytes")
        return secret

    def _reconstruct_mask_key(self, owner: str) -> X25519PrivateKey:
        raw = self._reconstruct(owner, MASK_KEY).to_bytes(KEY_BYTES, "big")
        key = X25519PrivateKey.from_private_bytes(raw)
        if public_bytes(key) != self._require_roster().mask_keys[owner]:
            raise SecureAggregationError(
                f"the reconstructed mask key of {owner!r} does not match its public key"
            )
        return key

    def _check_enough(self, what: str, count: int) -> None:
        threshold = self._require_roster().threshold
        if count < threshold:
            raise SecureAggregationError(
                f"only {count} clients {what}, fewer than the threshold {threshold}: "
                f"the round's secure aggregation is abandoned"
            )

    def _require_roster(self) -> Roster:
        if self._roster is None:
            raise SecureAggregationError("the roster is not drawn yet (call roster())")
        return self._roster

    def _require_request(self) -> UnmaskRequest:
        if self._request is None:
            raise SecureAggregationError("no unmask request yet (call unmask_request())")
        return self._request

    def _expect(self, stage: _Stage) -> None:
        if self._stage is not stage:
            raise SecureAggregationError(
                f"the server is at stage {self._stage.value!r}, not {stage.value!r}"
            )
