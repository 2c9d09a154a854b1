"""Mask expansion: a 32-byte seed stretched into ring elements by the AES-256-CTR keystream
(NIST SP 800-38A, from the ``cryptography`` package), the PRG of Bonawitz et al. (2017, §4).

A client adds up to ``n`` masks of its model's size: the input is taken a cache-sized chunk at
a time, and each mask's keystream for that chunk is written into one small scratch buffer and
added in place (no model-sized temporary, no Python loop per element, the chunk read from
memory once for every mask). AES-CTR with AES-NI runs at several GB/s, about twice
ChaCha20's speed on the same core (4.3 against 2.3 GB/s on the benchmark VM).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from fedpipe.common.secagg.keys import KEY_BYTES
from fedpipe.common.vector import Vector

__all__ = ["add_masks", "expand_mask"]

#: The seeds are single-use (derived per session and purpose), so one fixed counter block is
#: safe; the 128-bit counter never wraps within one mask.
_COUNTER = bytes(16)

#: The keystream is written, and folded into its target, in chunks of this many bytes: the
#: chunk of keystream stays in cache between the cipher and the addition, and the zero source
#: (shared, read-only) stays small.
_CHUNK_BYTES = 1 << 16
_ZEROS = memoryview(bytes(_CHUNK_BYTES))


def _encryptor(seed: bytes) -> CipherContext:
    """The AES-256-CTR encryptor of ``seed`` at counter 0."""
    if len(seed) != KEY_BYTES:
        raise ValueError(f"seed: {len(seed)} bytes, expected {KEY_BYTES}")
    return Cipher(algorithms.AES(seed), modes.CTR(_COUNTER)).encryptor()


def expand_mask(seed: bytes, size: int, dtype: np.dtype) -> np.ndarray:
    """``size`` uniformly random words of the unsigned ``dtype`` from ``seed``."""
    out = np.empty(size, dtype=dtype)
    encryptor, view = _encryptor(seed), out.data.cast("B")
    for start in range(0, len(view), _CHUNK_BYTES):
        part = view[start : start + _CHUNK_BYTES]
        encryptor.update_into(_ZEROS[: len(part)], part)
    return out


def add_masks(target: Vector, added: Iterable[bytes], subtracted: Iterable[bytes] = ()) -> None:
    """In place: ``target += sum(mask(s) for s in added) - sum(mask(s) for s in subtracted)``,
    wrapping around, where ``mask(s)`` is :func:`expand_mask` of ``s`` laid over the arrays
    in sorted name order.

    ``target`` holds numpy arrays of one unsigned dtype; reduce modulo ``2**bits`` afterwards
    (the words' own wrap-around is modulo a multiple of it). Arrays laid out as views of one
    buffer in name order (an encoded input's) are masked in place; others are gathered and
    scattered back.
    """
    names = sorted(target.coefs)
    flat = _one_buffer(target, names)
    gathered = flat is None
    if flat is None:
        arrays = [np.ravel(target.coefs[n]) for n in names]
        flat = np.concatenate(arrays) if arrays else np.empty(0, np.uint32)
    streams: list[tuple[CipherContext, np.ufunc]] = [(_encryptor(s), np.add) for s in added]
    streams += [(_encryptor(s), np.subtract) for s in subtracted]
    scratch = np.empty(max(1, min(flat.size, _CHUNK_BYTES // flat.itemsize)), flat.dtype)
    view = scratch.data.cast("B")
    # Chunk by chunk of the target, every mask in turn: the chunk stays in cache.
    for start in range(0, flat.size, scratch.size):
        part = flat[start : start + scratch.size]
        for encryptor, fold in streams:
            encryptor.update_into(_ZEROS[: part.nbytes], view[: part.nbytes])
            fold(part, scratch[: part.size], out=part)
    if gathered:
        start = 0
        for name in names:
            array = target.coefs[name]
            array[...] = flat[start : start + array.size].reshape(array.shape)
            start += array.size


def _one_buffer(target: Vector, names: list[str]) -> np.ndarray | None:
    """The flat buffer whose consecutive views are ``target``'s arrays in ``names`` order
    (as :meth:`~fedpipe.common.secagg.quantization.FixedPoint.encode` lays them out), or None
    when they are separate arrays."""
    base = target.coefs[names[0]].base if names else None
    if not isinstance(base, np.ndarray) or base.ndim != 1 or base.size != target.size:
        return None
    if base.dtype != target.coefs[names[0]].dtype:
        return None
    address = base.__array_interface__["data"][0]
    for name in names:
        array = target.coefs[name]
        if array.base is not base or not array.flags.c_contiguous:
            return None
        if array.__array_interface__["data"][0] != address:
            return None
        address += array.nbytes
    return base
