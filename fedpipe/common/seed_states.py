"""Many seeded generators at once: ``np.random.default_rng(seed)`` for thousands of seeds.

``default_rng(seed)`` hashes the seed with :class:`numpy.random.SeedSequence` into the 256
bits that seed its PCG64; that hashing, done one seed at a time, costs more than a small
client's whole local step. :func:`generators` does it for every seed in a few vectorized
uint32 operations (O'Neill's seed_seq hash as numpy implements it: ``mix_entropy`` of the
seed's 32-bit words into a pool of 4, then ``generate_state``) and hands each PCG64 its
words through :class:`numpy.random.bit_generator.ISeedSequence`, the documented interface for
seed sequences. Each generator is the one ``default_rng(seed)`` gives, draw for draw (tested
against numpy for seeds of every size below 2**64).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.random.bit_generator import ISeedSequence

__all__ = ["generators"]

_INIT_A, _MULT_A = np.uint32(0x43B0D7E5), np.uint32(0x931E8875)
_INIT_B, _MULT_B = np.uint32(0x8B51F9DD), np.uint32(0x58F38DED)
_MIX_L, _MIX_R = np.uint32(0xCA01F9DD), np.uint32(0x4973F715)
_SHIFT = np.uint32(16)
_POOL = 4  # numpy's DEFAULT_POOL_SIZE


class _Words(ISeedSequence):
    """The PCG64 seed words that ``SeedSequence(seed).generate_state(4, uint64)`` gives."""

    __slots__ = ("words",)

    def __init__(self, words: np.ndarray) -> None:
        self.words = words

    def generate_state(self, n_words: int, dtype: Any = np.uint32) -> np.ndarray:
        if n_words != len(self.words) or np.dtype(dtype) != np.uint64:
            raise ValueError(f"precomputed for {len(self.words)} uint64 words, asked {n_words}")
        return self.words


def generators(seeds: Sequence[int]) -> list[np.random.Generator]:
    """``[np.random.default_rng(s) for s in seeds]`` for seeds in ``[0, 2**64)``."""
    words = _states(np.array(seeds, dtype=np.uint64))
    # numpy accepts any ISeedSequence (its documented interface); its stubs list SeedSequence
    return [np.random.Generator(np.random.PCG64(_Words(row))) for row in words]  # type: ignore[arg-type]


def _states(seeds: np.ndarray, n_words: int = 4) -> np.ndarray:
    """``SeedSequence(seed).generate_state(n_words, uint64)`` of each seed, ``(K, n_words)``."""
    low = (seeds & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    high = (seeds >> np.uint64(32)).astype(np.uint32)  # 0: a one-word seed, hashed the same
    hash_const = np.full(len(seeds), _INIT_A, dtype=np.uint32)
    with np.errstate(over="ignore"):  # uint32 arithmetic wraps around, as in numpy's C

        def hashmix(value: np.ndarray) -> np.ndarray:
            nonlocal hash_const
            value = value ^ hash_const
            hash_const = hash_const * _MULT_A
            value = value * hash_const
            return value ^ (value >> _SHIFT)

        zero = np.zeros(len(seeds), np.uint32)
        pool = [hashmix(word) for word in (low, high, zero, zero)]
        for src in range(_POOL):
            for dst in range(_POOL):
                if src != dst:
                    mixed: np.ndarray = pool[dst] * _MIX_L - hashmix(pool[src]) * _MIX_R
                    pool[dst] = mixed ^ (mixed >> _SHIFT)
        out = np.empty((len(seeds), 2 * n_words), np.uint32)
        hash_b = np.full(len(seeds), _INIT_B, dtype=np.uint32)
        for i in range(2 * n_words):
            value = pool[i % _POOL] ^ hash_b
            hash_b = hash_b * _MULT_B
            value = value * hash_b
            out[:, i] = value ^ (value >> _SHIFT)
    return out.view(np.uint64)  # as numpy's generate_state views its uint32 words
