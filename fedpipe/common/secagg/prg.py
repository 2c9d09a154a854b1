"""Mask expansion: a 32-byte seed stretched into field elements by the ChaCha20 keystream
(RFC 8439, from the ``cryptography`` package) — the PRG of Bonawitz et al. (2017, §4)."""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedpipe.common.secagg.keys import KEY_BYTES
from fedpipe.common.vector import Vector

__all__ = ["add_mask", "expand_mask"]

#: The seeds are single-use (derived per session and purpose), so one fixed nonce is safe.
_NONCE = bytes(16)


def expand_mask(seed: bytes, size: int, dtype: np.dtype) -> np.ndarray:
    """``size`` uniformly random words of the unsigned ``dtype`` from ``seed``."""
    if len(seed) != KEY_BYTES:
        raise ValueError(f"seed: {len(seed)} bytes, expected {KEY_BYTES}")
    out = np.zeros(size, dtype=dtype)
    encryptor = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
    buffer = out.data.cast("B")
    encryptor.update_into(buffer, buffer)  # the keystream XOR zeros, in place
    return out


def add_mask(target: Vector, seed: bytes, subtract: bool = False) -> None:
    """In place: ``target += mask`` (or ``-=``), wrapping around, where the mask is
    :func:`expand_mask` of ``seed`` laid over the arrays in sorted name order.

    ``target`` holds numpy arrays of one unsigned dtype; reduce modulo ``2**bits`` afterwards
    (the words' own wrap-around is modulo a multiple of it).
    """
    names = sorted(target.coefs)
    dtype = target.coefs[names[0]].dtype if names else np.dtype(np.uint32)
    mask = expand_mask(seed, target.size, dtype)
    start = 0
    for name in names:
        array = target.coefs[name]
        part = mask[start : start + array.size].reshape(array.shape)
        start += array.size
        if subtract:
            np.subtract(array, part, out=array)
        else:
            np.add(array, part, out=array)
