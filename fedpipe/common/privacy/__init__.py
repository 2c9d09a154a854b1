"""Differential privacy shared by both sides: where privacy noise comes from, and what a
client does to its update under client-level DP (see docs/privacy.md)."""

from fedpipe.common.privacy.entropy import private_rng, seed_private_noise

__all__ = ["private_rng", "seed_private_noise"]
