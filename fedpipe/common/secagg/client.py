"""The client side of secure aggregation, as a state machine (Bonawitz et al., 2017, Fig. 4;
Bell et al., 2020 for the neighbour graph).

A client draws two X25519 key pairs and a self-mask seed from its own entropy (the operating
system's, or a client-local source in tests: never one the server sends), shares the seed and
the mask key among its holders with Shamir's scheme, sends its input encoded in fixed point
plus a self mask and one pairwise mask per neighbour that shared keys, and finally reveals,
for each client, either a share of its self-mask seed (it sent masked input) or of its mask
key (it dropped) — never both, so no one's input is ever unmasked alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from enum import Enum

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from fedpipe.common.secagg import shamir
from fedpipe.common.secagg.keys import (
    KEY_BYTES,
    ShareDecryptionError,
    decrypt_shares,
    derive_seed,
    encrypt_shares,
    public_bytes,
    shared_secret,
)
from fedpipe.common.secagg.messages import (
    AdvertiseKeys,
    ForwardedShares,
    MaskedInput,
    Roster,
    SecureAggregationError,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
    commit_share,
    pair_label,
)
from fedpipe.common.secagg.prg import MaskStreams
from fedpipe.common.vector import Vector

__all__ = ["SecAggClient", "pairwise_seed"]

logger = logging.getLogger(__name__)

SELF_MASK = b"self-mask"
MASK_KEY = b"mask-key"


class _Stage(Enum):
    ADVERTISE = "advertise keys"
    SHARE = "share keys"
    MASK = "send masked input"
    UNMASK = "unmask"
    DONE = "done"


class SecAggClient:
    """One client's part in one secure aggregation.

    Parameters
    ----------
    name:
        The client's name in the session (as the server admitted it).
    entropy:
        ``entropy(n)`` returns ``n`` random bytes; ``os.urandom`` unless a test seeds it
        locally.
    """

    def __init__(self, name: str, entropy: Callable[[int], bytes] = os.urandom) -> None:
        self.name = name
        self._entropy = entropy
        self._cipher_key = X25519PrivateKey.from_private_bytes(entropy(KEY_BYTES))
        self._mask_key = X25519PrivateKey.from_private_bytes(entropy(KEY_BYTES))
        self._self_seed = entropy(KEY_BYTES)
        self._stage = _Stage.ADVERTISE
        self._roster: Roster | None = None
        self._received: dict[str, bytes] = {}
        #: X25519 secrets with each peer's cipher key: agreed once, for sharing and unmasking.
        self._cipher_secrets: dict[str, bytes] = {}

    def advertise(self) -> AdvertiseKeys:
        """Stage 0: the public keys."""
        self._advance(_Stage.ADVERTISE, _Stage.SHARE)
        return self.advertise_record()

    def share_keys(self, roster: Roster) -> ShareKeys:
        """Stage 1: shares of the self-mask seed and of the mask key, encrypted per holder."""
        self._advance(_Stage.SHARE, _Stage.MASK)
        _check_roster(roster, self.name, self.advertise_record())
        self._roster = roster
        holders = roster.holders(self.name)
        xs = [roster.index(h) for h in holders]
        secrets = (_to_int(self._self_seed), _to_int(_raw(self._mask_key)))
        shares = shamir.split(secrets, xs, roster.threshold, self._entropy)
        ciphertexts, commitments = {}, {}
        for holder, x in zip(holders, xs, strict=True):
            seed_share, key_share = map(shamir.share_to_bytes, shares[x])
            label = pair_label(b"shares", self.name, holder)
            key = self._cipher_seed(holder, label)
            ciphertexts[holder] = encrypt_shares(key, seed_share + key_share, label)
            commitments[holder] = (
                commit_share(roster.session, SELF_MASK, self.name, holder, seed_share),
                commit_share(roster.session, MASK_KEY, self.name, holder, key_share),
            )
        return ShareKeys(self.name, ciphertexts, commitments)

    def masked_input(
        self, shares: ForwardedShares, update: Vector, weight: int = 1, *, weighted: bool = False
    ) -> MaskedInput:
        """Stage 2: ``update`` encoded with its integer ``weight`` (see
        :class:`~fedpipe.common.secagg.quantization.FixedPoint`; ``weighted``: ``update`` is
        already times ``weight``), plus the self mask and the pairwise masks shared with every
        neighbour that sent shares."""
        self._advance(_Stage.MASK, _Stage.UNMASK)
        roster = self._require_roster()
        holders = set(roster.holders(self.name))
        if shares.recipient != self.name or not set(shares.ciphertexts) <= holders:
            raise SecureAggregationError(
                f"forwarded shares for {shares.recipient!r} from {sorted(shares.ciphertexts)}: "
                f"expected shares for {self.name!r} from among {sorted(holders)}"
            )
        if len(shares.ciphertexts) < roster.threshold or self.name not in shares.ciphertexts:
            raise SecureAggregationError(
                f"{len(shares.ciphertexts)} clients (self included: "
                f"{self.name in shares.ciphertexts}) shared keys with {self.name!r}, "
                f"expected at least the threshold {roster.threshold}, self included"
            )
        self._received = dict(shares.ciphertexts)
        mine, own = roster.index(self.name), self._mask_key
        peers = [o for o in self._received if o != self.name]
        # The lower-indexed client of a pair adds their mask, the other subtracts it.
        added = (pairwise_seed(roster, own, self.name, o) for o in peers if roster.index(o) > mine)
        subtracted = (
            pairwise_seed(roster, own, self.name, o) for o in peers if roster.index(o) < mine
        )
        masks = MaskStreams([self._self_seed, *added], subtracted, roster.encoding.dtype)
        return MaskedInput(
            self.name, roster.encoding.encode(update, weight, masks, weighted=weighted)
        )

    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Stage 3: shares of the self-mask seeds of survivors, of the mask keys of the
        dropped; a request for both of one client is refused."""
        self._advance(_Stage.UNMASK, _Stage.DONE)
        roster = self._require_roster()
        survivors, dropped = set(request.survivors), set(request.dropped)
        known = set(self._received)
        if survivors & dropped or not (survivors | dropped) <= set(roster.clients):
            raise SecureAggregationError(
                f"unmask request: survivors {sorted(survivors)} and dropped {sorted(dropped)} "
                f"must be disjoint sets of the roster's clients"
            )
        if self.name not in survivors or len(survivors) < roster.threshold:
            raise SecureAggregationError(
                f"unmask request names {len(survivors)} survivors (self included: "
                f"{self.name in survivors}), expected at least {roster.threshold}, self included"
            )
        seed_shares, key_shares = {}, {}
        for owner in sorted(known & (survivors | dropped)):
            plain = self._decrypt(owner)
            if plain is None:
                continue
            if owner in survivors:
                seed_shares[owner] = plain[: shamir.SHARE_BYTES]
            else:
                key_shares[owner] = plain[shamir.SHARE_BYTES :]
        return UnmaskShares(self.name, seed_shares, key_shares)

    @property
    def roster(self) -> Roster | None:
        """The roster of stage 1, once received."""
        return self._roster

    def advertise_record(self) -> AdvertiseKeys:
        """The keys this client advertises (what a roster must list for it)."""
        return AdvertiseKeys(
            self.name, public_bytes(self._cipher_key), public_bytes(self._mask_key)
        )

    def _decrypt(self, owner: str) -> bytes | None:
        label = pair_label(b"shares", owner, self.name)
        try:
            plain = decrypt_shares(self._cipher_seed(owner, label), self._received[owner], label)
        except ShareDecryptionError as error:
            logger.warning("secure aggregation: skipping the shares of %r: %s", owner, error)
            return None
        if len(plain) != 2 * shamir.SHARE_BYTES:
            logger.warning("secure aggregation: shares of %r have %d bytes", owner, len(plain))
            return None
        return plain

    def _cipher_seed(self, peer: str, label: bytes) -> bytes:
        roster = self._require_roster()
        secret = self._cipher_secrets.get(peer)
        if secret is None:
            secret = shared_secret(self._cipher_key, roster.cipher_keys[peer])
            self._cipher_secrets[peer] = secret
        return derive_seed(secret, roster.session, label)

    def _require_roster(self) -> Roster:
        if self._roster is None:
            raise SecureAggregationError(f"client {self.name!r} has no roster yet")
        return self._roster

    def _advance(self, expected: _Stage, following: _Stage) -> None:
        if self._stage is not expected:
            raise SecureAggregationError(
                f"client {self.name!r} asked to {expected.value} while at stage "
                f"{self._stage.value!r}"
            )
        self._stage = following


def pairwise_seed(roster: Roster, own: X25519PrivateKey, name: str, other: str) -> bytes:
    """The seed of the pairwise mask of ``name`` (owning ``own``) and ``other``; both sides,
    or the server holding a dropped client's reconstructed key, derive the same."""
    first, second = sorted((name, other), key=roster.index)
    secret = shared_secret(own, roster.mask_keys[other])
    return derive_seed(secret, roster.session, pair_label(b"mask", first, second))


def _check_roster(roster: Roster, name: str, own: AdvertiseKeys) -> None:
    if name not in roster.clients:
        raise SecureAggregationError(f"roster: {name!r} is not among {list(roster.clients)}")
    if (roster.cipher_keys[name], roster.mask_keys[name]) != (own.cipher_key, own.mask_key):
        raise SecureAggregationError(f"roster: the keys listed for {name!r} are not its own")
    keys = [*roster.cipher_keys.values(), *roster.mask_keys.values()]
    if len(set(keys)) != len(keys):
        raise SecureAggregationError("roster: two public keys are equal, expected all distinct")
    if not 2 <= roster.threshold <= len(roster.holders(name)):
        raise SecureAggregationError(
            f"roster: threshold {roster.threshold}, expected 2 <= threshold <= "
            f"{len(roster.holders(name))} (the holders of {name!r}'s shares)"
        )


def _raw(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _to_int(data: bytes) -> int:
    return int.from_bytes(data, "big")
