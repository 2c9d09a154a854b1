"""Client tokens stored as salted scrypt hashes, so that a leaked server config reveals none.

A stored entry is either the token itself or ``scrypt$n=16384,r=8,p=1$<salt>$<hash>`` (salt and
hash in base64), as printed by ``fedpipe hash-token``. Both compare in constant time: plain
tokens as SHA-256 digests, so that neither token's length shows either.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

__all__ = ["SCHEME", "dummy_hash", "hash_token", "is_hashed", "parse_hashed", "verify_token"]

SCHEME = "scrypt"
#: scrypt's cost: about 16 MiB and a few tens of milliseconds per check.
N, R, P = 1 << 14, 8, 1
SALT_BYTES = 16
HASH_BYTES = 32
#: Bounds on the parameters a config may ask for: a typo must not allocate gigabytes.
MAX_MEMORY, MAX_R, MAX_P = 256 << 20, 32, 16


def hash_token(token: str, *, n: int = N, r: int = R, p: int = P) -> str:
    """The storable form of ``token``: scrypt with a fresh random salt."""
    if not token:
        raise ValueError("an empty token cannot be hashed: it would admit anyone")
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(token, salt, n, r, p, HASH_BYTES)
    return f"{SCHEME}$n={n},r={r},p={p}${_b64(salt)}${_b64(digest)}"


def dummy_hash(like: str) -> str:
    """A hashed entry with the parameters of ``like`` that no token matches: checking a
    token against it costs what checking against ``like`` does (for names with no token)."""
    n, r, p, salt, digest = parse_hashed(like)
    fake = secrets.token_bytes(len(digest))  # the hash of no known token
    return f"{SCHEME}$n={n},r={r},p={p}${_b64(secrets.token_bytes(len(salt)))}${_b64(fake)}"


def is_hashed(stored: str) -> bool:
    return stored.startswith(SCHEME + "$")


def parse_hashed(stored: str) -> tuple[int, int, int, bytes, bytes]:
    """``(n, r, p, salt, hash)`` of a hashed entry.

    Raises
    ------
    ValueError
        The entry is not ``scrypt$n=N,r=R,p=P$<salt>$<hash>`` with parameters in bounds.
    """
    expected = "expected scrypt$n=N,r=R,p=P$<salt>$<hash> as printed by `fedpipe hash-token`"
    parts = stored.split("$")
    if len(parts) != 4 or parts[0] != SCHEME:
        raise ValueError(f"hashed token {stored[:24]!r}...: {expected}")
    try:
        params = dict(item.split("=", 1) for item in parts[1].split(","))
        n, r, p = int(params["n"]), int(params["r"]), int(params["p"])
        salt, digest = base64.b64decode(parts[2], validate=True), base64.b64decode(parts[3])
    except (ValueError, KeyError, binascii.Error):
        raise ValueError(f"hashed token {stored[:24]!r}...: {expected}") from None
    if (
        not (1 < n and n & (n - 1) == 0 and 1 <= r <= MAX_R and 1 <= p <= MAX_P)
        or 128 * n * r > MAX_MEMORY
    ):
        raise ValueError(
            f"hashed token parameters n={n}, r={r}, p={p}: expected n a power of two, "
            f"r <= {MAX_R}, p <= {MAX_P} and 128*n*r <= {MAX_MEMORY >> 20} MiB"
        )
    if not salt or len(digest) < 16:
        raise ValueError(f"hashed token {stored[:24]!r}...: salt or hash too short")
    return n, r, p, salt, digest


def verify_token(presented: str, stored: str) -> bool:
    """Whether ``presented`` matches the stored entry (plain or hashed), in constant time.

    A hashed entry costs one scrypt: call it off the event loop.
    """
    if not is_hashed(stored):
        # Equal-length digests: the comparison takes as long whatever either token's length.
        same = hmac.compare_digest(_sha256(presented), _sha256(stored))
        return same and bool(stored) and bool(presented)
    if not presented:
        return False
    n, r, p, salt, digest = parse_hashed(stored)
    return hmac.compare_digest(_scrypt(presented, salt, n, r, p, len(digest)), digest)


def _scrypt(token: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    # maxmem above the 128 * n * r bytes scrypt needs (OpenSSL's default cap is 32 MiB).
    maxmem = 128 * n * r * (p + 1) + (1 << 20)
    return hashlib.scrypt(token.encode(), salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=length)


def _sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
