"""Where privacy noise comes from: the operating system's entropy, never a seed the server sent.

The server sends each client its module configs (``client_optimizer``) and the run ``seed``
(batch shuffling): were either to seed privacy noise, the server could draw the same noise
and subtract it. So a privacy-noise generator is seeded only from

- the OS entropy (``np.random.SeedSequence()`` with no argument), the default; or
- ``noise_seed`` of the client's own config (or of a simulation, whose owner owns its
  clients): reproducible noise for tests, a setting the server never sees. Each client mixes
  its own name in, so two clients given the same ``noise_seed`` still draw different noise.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

import numpy as np

__all__ = ["PrivateNoiseSource", "private_rng", "seed_private_noise"]

log = logging.getLogger(__name__)


class PrivateNoiseSource:
    """What a module drawing privacy noise implements: the client seeds it locally."""

    def seed_locally(self, seed: np.random.SeedSequence) -> None:
        """Draw from ``seed`` (a client-local seed) from now on, in place of OS entropy."""
        raise NotImplementedError


def _words(text: str) -> list[int]:
    digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


def private_rng(local_seed: int | None, client: str, stream: str) -> np.random.Generator:
    """A generator for privacy noise: OS entropy when ``local_seed`` is None, else a stream
    derived from the client-local seed, the client's name and ``stream`` (the use)."""
    if local_seed is None:
        return np.random.default_rng(np.random.SeedSequence())
    return np.random.default_rng(_local_sequence(local_seed, client, stream))


def _local_sequence(local_seed: int, client: str, stream: str) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(local_seed) & 0xFFFFFFFF, *_words(f"{client}/{stream}")])


def seed_private_noise(modules: Iterable[object], local_seed: int | None, client: str) -> None:
    """Seed each privacy-noise module of a pipeline from the client-local ``local_seed``
    (nothing to do when it is None: they draw from OS entropy)."""
    if local_seed is None:
        return
    for index, module in enumerate(modules):
        if isinstance(module, PrivateNoiseSource):
            module.seed_locally(_local_sequence(local_seed, client, f"module-{index}"))
            log.info("client %s: module %d draws privacy noise from noise_seed", client, index)
