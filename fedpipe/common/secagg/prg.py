"""Mask expansion: a 32-byte seed stretched into ring elements by the AES-256-CTR keystream
(NIST SP 800-38A, from the ``cryptography`` package), the PRG of Bonawitz et al. (2017, §4).

A client adds up to ``n`` masks of its model's size, so each keystream goes straight into one
preallocated scratch buffer, added in place to the input (no allocation per mask, no Python
loop per element). AES-CTR with AES-NI runs at several GB/s, about twice ChaCha20's speed on
the same core (4.3 against 2.3 GB/s on the benchmark VM).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedpipe.common.secagg.keys import KEY_BYTES
from fedpipe.common.vector import Vector

__all__ = ["add_masks", "expand_mask"]

#: The seeds are single-use (derived per session and purpose), so one fixed counter block is
#: safe; the 128-bit counter never wraps within one mask.
_COUNTER = bytes(16)

#: The keystream is written in chunks of this many bytes: the zero source stays small.
_CHUNK_BYTES = 1 << 20


def _keystream_into(seed: bytes, out: np.ndarray, zeros: bytes) -> None:
    """Overwrite ``out`` (a contiguous array) with the keystream of ``seed``, encrypting
    ``zeros`` (zero bytes, a multiple of the 16-byte block) chunk after chunk."""
    if len(seed) != KEY_BYTES:
        raise ValueError(f"seed: {len(seed)} bytes, expected {KEY_BYTES}")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_COUNTER)).encryptor()
    view, source = out.data.cast("B"), memoryview(zeros)
    for start in range(0, len(view), len(source)):
        part = view[start : start + len(source)]
        encryptor.update_into(source[: len(part)], part)


def _zeros(nbytes: int) -> bytes:
    return bytes(min(nbytes, _CHUNK_BYTES) or 16)


def expand_mask(seed: bytes, size: int, dtype: np.dtype) -> np.ndarray:
    """``size`` uniformly random words of the unsigned ``dtype`` from ``seed``."""
    out = np.empty(size, dtype=dtype)
    _keystream_into(seed, out, _zeros(out.nbytes))
    return out


def add_masks(target: Vector, added: Iterable[bytes], subtracted: Iterable[bytes] = ()) -> None:
    """In place: ``target += sum(mask(s) for s in added) - sum(mask(s) for s in subtracted)``,
    wrapping around, where ``mask(s)`` is :func:`expand_mask` of ``s`` laid over the arrays
    in sorted name order.

    ``target`` holds numpy arrays of one unsigned dtype; reduce modulo ``2**bits`` afterwards
    (the words' own wrap-around is modulo a multiple of it). The seeds are consumed lazily,
    so a caller may derive each one as it is needed.
    """
    names = sorted(target.coefs)
    dtype = target.coefs[names[0]].dtype if names else np.dtype(np.uint32)
    scratch = np.empty(target.size, dtype=dtype)
    zeros = _zeros(scratch.nbytes)  # a read-only source: cheaper than zeroing scratch per mask
    for seeds, fold in ((added, np.add), (subtracted, np.subtract)):
        for seed in seeds:
            _keystream_into(seed, scratch, zeros)
            start = 0
            for name in names:
                array = target.coefs[name]
                fold(array, scratch[start : start + array.size].reshape(array.shape), out=array)
                start += array.size
