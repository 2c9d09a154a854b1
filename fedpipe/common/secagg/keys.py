"""Key agreement, key derivation and share encryption of secure aggregation, all from the
``cryptography`` package (Bonawitz et al., 2017, §4: KA, PRG seeds and AE).

- X25519 key agreement (RFC 7748) gives each pair of clients a shared secret;
- HKDF-SHA256 (RFC 5869) derives from it, bound to the session and the purpose, the seed of
  their pairwise mask and the key that encrypts the secret shares one sends the other;
- ChaCha20-Poly1305 (RFC 8439) encrypts the shares, with the sender and recipient as
  associated data, so the relaying server can neither read nor redirect them.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = [
    "KEY_BYTES",
    "SEALED_OVERHEAD",
    "ShareDecryptionError",
    "decrypt_shares",
    "derive_seed",
    "encrypt_shares",
    "public_bytes",
    "shared_secret",
]

#: Bytes of an X25519 key (public or private) and of a derived seed.
KEY_BYTES = 32

_NONCE_BYTES = 12
#: Bytes :func:`encrypt_shares` adds to its plaintext: the nonce and the Poly1305 tag.
SEALED_OVERHEAD = _NONCE_BYTES + 16


class ShareDecryptionError(ValueError):
    """A ciphertext of secret shares failed authentication (tampered, or not meant for this
    pair of clients)."""


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32-byte public key of ``key``."""
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def shared_secret(own: X25519PrivateKey, peer_public: bytes) -> bytes:
    """The X25519 shared secret of ``own`` and a peer's raw public key."""
    if len(peer_public) != KEY_BYTES:
        raise ValueError(f"public key: {len(peer_public)} bytes, expected {KEY_BYTES}")
    return own.exchange(X25519PublicKey.from_public_bytes(peer_public))


def derive_seed(secret: bytes, session: bytes, purpose: bytes) -> bytes:
    """32 bytes derived by HKDF-SHA256 from ``secret``, salted by the session id and bound to
    ``purpose`` (which names the use and the clients involved)."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=session, info=purpose)
    return hkdf.derive(secret)


def encrypt_shares(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """``nonce || ciphertext || tag`` of ``plaintext`` under ``key`` (a fresh random nonce)."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def decrypt_shares(key: bytes, message: bytes, associated: bytes) -> bytes:
    """The plaintext of :func:`encrypt_shares`'s ``message``; raises
    :class:`ShareDecryptionError` when authentication fails."""
    nonce, body = message[:_NONCE_BYTES], message[_NONCE_BYTES:]
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, body, associated)
    except InvalidTag as error:
        raise ShareDecryptionError(
            f"shares ({len(message)} bytes) failed authentication for {associated!r}"
        ) from error
