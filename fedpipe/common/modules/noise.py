"""Additive Gaussian noise from private entropy, resumable (the noise step of DP-SGD)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from fedpipe.common.modules.base import OptiModule
from fedpipe.common.privacy.entropy import PrivateNoiseSource
from fedpipe.common.state import State
from fedpipe.common.vector import Vector

__all__ = ["GaussianNoise"]

_MASK_64 = (1 << 64) - 1


def _to_words(value: int) -> np.ndarray:
    """A 128-bit int as two uint64 words (high, low): states carry 64-bit ints at most."""
    return np.array([value >> 64, value & _MASK_64], dtype=np.uint64)


def _from_words(words: object) -> int:
    if not isinstance(words, np.ndarray) or words.dtype != np.uint64 or words.shape != (2,):
        raise ValueError(f"gaussian-noise rng state words must be uint64[2], got {words!r}")
    return (int(words[0]) << 64) | int(words[1])


def _small_int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32:
        raise ValueError(f"gaussian-noise rng state holds {value!r}, expected a uint32 int")
    return value


class GaussianNoise(OptiModule, PrivateNoiseSource):
    """Add ``N(0, std^2)`` noise to every coordinate (Abadi et al., 2016, "Deep Learning with
    Differential Privacy"; place it after ``l2-clipping`` with ``std = noise_multiplier *
    max_norm``).

    The noise is drawn from the operating system's entropy. A config cannot seed it: module
    configs come from the server, which could then draw the same noise and subtract it. A
    client's own ``noise_seed`` (client config, never sent) seeds it for reproducible tests
    (:func:`~fedpipe.common.privacy.entropy.seed_private_noise`).

    The state holds the state of the PCG64 random generator (its 128-bit integers as pairs of
    uint64 words, as states carry 64-bit ints at most), so a module resumed from it draws the
    same noise as the original would have. The state stays with the client (its local state
    store); it is never sent to the server.

    Parameters
    ----------
    std:
        Standard deviation of the noise (non-negative).
    seed:
        Refused (ValueError) unless None: kept as a keyword only to explain why.
    """

    name: ClassVar[str] = "gaussian-noise"

    def __init__(self, std: float = 1.0, *, seed: None = None) -> None:
        if not std >= 0:
            raise ValueError(f"gaussian-noise std={std}; expected a non-negative number")
        if seed is not None:
            raise ValueError(
                f"gaussian-noise seed={seed!r}: privacy noise is never seeded from a config "
                "(the server sends module configs, and could subtract noise it can redraw); it "
                "draws from OS entropy. For reproducible tests, set noise_seed in the client's "
                "own config"
            )
        self.std = float(std)
        self.rng: np.random.Generator | None = None
        self._local_seed: np.random.SeedSequence | None = None

    def get_config(self) -> dict[str, Any]:
        return {"std": self.std}

    def seed_locally(self, seed: np.random.SeedSequence) -> None:
        self._local_seed = seed
        self.rng = None

    def run(self, gradients: Vector) -> Vector:
        if self.rng is None:  # the first draw: from the local seed, else OS entropy
            seed = self._local_seed if self._local_seed is not None else np.random.SeedSequence()
            self.rng = np.random.default_rng(seed)
        return gradients + gradients.normal_like(self.rng) * self.std

    def get_state(self) -> State:
        if self.rng is None:
            return {"rng": None}
        raw = self.rng.bit_generator.state
        return {
            "rng": {
                "bit_generator": raw["bit_generator"],
                "state": _to_words(raw["state"]["state"]),
                "inc": _to_words(raw["state"]["inc"]),
                "has_uint32": int(raw["has_uint32"]),
                "uinteger": int(raw["uinteger"]),
            }
        }

    def set_state(self, state: State) -> None:
        rng_state = state.get("rng")
        if rng_state is None:
            self.rng = None
            return
        if not isinstance(rng_state, dict) or rng_state.get("bit_generator") != "PCG64":
            raise ValueError(
                f"gaussian-noise state 'rng' must be a PCG64 generator state, got {rng_state!r}"
            )
        bit_generator = np.random.PCG64()
        bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {
                "state": _from_words(rng_state.get("state")),
                "inc": _from_words(rng_state.get("inc")),
            },
            "has_uint32": _small_int(rng_state.get("has_uint32")),
            "uinteger": _small_int(rng_state.get("uinteger")),
        }
        self.rng = np.random.Generator(bit_generator)
