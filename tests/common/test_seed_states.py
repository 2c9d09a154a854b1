"""Generators seeded in bulk are numpy's ``default_rng(seed)``, draw for draw."""

from __future__ import annotations

import numpy as np
import pytest

from fedpipe.common.seed_states import generators
from fedpipe.common.training import round_seed


def test_bulk_generators_draw_what_default_rng_draws() -> None:
    edges = [0, 1, 2**32 - 1, 2**32, 2**63, 2**64 - 1]
    drawn = np.random.default_rng(0).integers(0, 2**64 - 1, 300, dtype=np.uint64).tolist()
    names = [round_seed(7, f"client-{i}", 3) for i in range(300)]  # what the trainer uses
    seeds = edges + drawn + names
    for seed, rng in zip(seeds, generators(seeds), strict=True):
        numpy = np.random.default_rng(seed)
        np.testing.assert_array_equal(rng.permutation(33), numpy.permutation(33))
        assert rng.random() == numpy.random()


def test_a_precomputed_seed_serves_only_its_own_size() -> None:
    (rng,) = generators([5])
    with pytest.raises(ValueError, match="precomputed for 4 uint64 words, asked 2"):
        rng.bit_generator.seed_seq.generate_state(2, np.uint64)  # type: ignore[attr-defined]
