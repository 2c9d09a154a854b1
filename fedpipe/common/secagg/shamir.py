"""Shamir's t-out-of-n secret sharing over the prime field GF(2**521 - 1) (Shamir, 1979).

A secret ``s`` (an integer below :data:`PRIME`, here a 32-byte seed or X25519 private key) is
the constant term of a random polynomial ``f`` of degree ``t - 1``; holder ``x`` (a nonzero
field element, a client's index) gets the share ``f(x)``. Any ``t`` shares give ``s = f(0)``
by Lagrange interpolation; fewer than ``t`` are uniformly distributed and reveal nothing.

This is arithmetic, not a cipher: confidentiality of the shares in transit comes from the
authenticated encryption of :mod:`fedpipe.common.secagg.keys`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

__all__ = [
    "PRIME",
    "SHARE_BYTES",
    "lagrange_weights",
    "reconstruct",
    "share_from_bytes",
    "share_to_bytes",
    "split",
]

#: The Mersenne prime 2**521 - 1: every 256-bit secret is a field element.
PRIME = (1 << 521) - 1

#: Bytes of one serialized share value (a field element, big-endian).
SHARE_BYTES = 66

#: Extra random bytes drawn per field element, so reducing modulo PRIME has a bias < 2**-128.
_UNIFORM_BYTES = SHARE_BYTES + 16


def split(
    secrets: Sequence[int], holders: Sequence[int], threshold: int, entropy: Callable[[int], bytes]
) -> dict[int, tuple[int, ...]]:
    """Each holder's x-coordinate to its share of each of ``secrets`` (one independent random
    polynomial per secret), any ``threshold`` of which reconstruct it.

    ``entropy(n)`` returns ``n`` random bytes (the operating system's by default, see
    :class:`fedpipe.common.secagg.client.SecAggClient`).
    """
    for secret in secrets:
        if not 0 <= secret < PRIME:
            raise ValueError(
                f"secret: {secret.bit_length()} bits, expected an integer in [0, 2**521 - 1)"
            )
    if len(set(holders)) != len(holders) or not all(0 < x < PRIME for x in holders):
        raise ValueError(f"holders: {list(holders)}, expected distinct nonzero field elements")
    if not 1 <= threshold <= len(holders):
        raise ValueError(f"threshold: {threshold}, expected 1 <= threshold <= {len(holders)}")
    polynomials = [
        [secret] + [_uniform(entropy) for _ in range(threshold - 1)] for secret in secrets
    ]
    return {x: tuple(_evaluate(poly, x) for poly in polynomials) for x in holders}


def reconstruct(shares: Mapping[int, int], threshold: int) -> int:
    """The secret ``f(0)`` from at least ``threshold`` shares ``{x: f(x)}`` (the first
    ``threshold`` by x-coordinate are used).

    The Lagrange weights depend only on the x-coordinates: they are computed once per set of
    holders (cached), so reconstructing many secrets from the same holders costs
    ``threshold`` multiplications each.
    """
    if len(shares) < threshold:
        raise ValueError(f"shares: {len(shares)} given, expected at least {threshold}")
    points = sorted(shares.items())[:threshold]
    weights = lagrange_weights(tuple(x for x, _ in points))
    return sum(w * y for w, (_, y) in zip(weights, points, strict=True)) % PRIME


def share_to_bytes(value: int) -> bytes:
    return value.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    if len(data) != SHARE_BYTES:
        raise ValueError(f"share: {len(data)} bytes, expected {SHARE_BYTES}")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise ValueError("share: not a field element (>= 2**521 - 1)")
    return value


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    """Horner's rule in exact integers, reduced once: with ``x`` a client's index the value
    grows by a few bits per coefficient, cheaper than a reduction per step."""
    result = 0
    for coefficient in reversed(coefficients):
        result = result * x + coefficient
    return result % PRIME


def _uniform(entropy: Callable[[int], bytes]) -> int:
    return int.from_bytes(entropy(_UNIFORM_BYTES), "big") % PRIME


@functools.lru_cache(maxsize=64)
def lagrange_weights(xs: tuple[int, ...]) -> tuple[int, ...]:
    """The weights ``l_i(0) = prod_{j != i} x_j / (x_j - x_i)`` modulo :data:`PRIME`, so that
    ``f(0) = sum_i l_i(0) f(x_i)`` for every polynomial of degree below ``len(xs)``."""
    weights = []
    for i, xi in enumerate(xs):
        numerator, denominator = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                numerator = numerator * xj % PRIME
                denominator = denominator * (xj - xi) % PRIME
        weights.append(numerator * pow(denominator, -1, PRIME) % PRIME)
    return tuple(weights)
