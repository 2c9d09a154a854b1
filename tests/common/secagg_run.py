"""One secure aggregation run, with dropouts and liars, for the secagg tests."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import replace

import numpy as np

from fedpipe.common.secagg import AggregateResult, SecAggClient, SecAggServer
from fedpipe.common.secagg.messages import MaskedInput, Roster
from fedpipe.common.vector import Vector


def seeded(seed: int) -> Callable[[int], bytes]:
    """A reproducible stand-in for ``os.urandom`` (tests only)."""
    rng = np.random.default_rng(seed)
    return lambda n: rng.bytes(n)


def run_secagg(
    updates: Mapping[str, Vector],
    server: SecAggServer,
    *,
    drop_before_shares: Collection[str] = (),
    drop_before_masking: Collection[str] = (),
    drop_before_unmasking: Collection[str] = (),
    liars: Collection[str] = (),
    weights: Mapping[str, int] | None = None,
    seed: int = 0,
) -> tuple[AggregateResult, Roster, dict[str, MaskedInput]]:
    """Run every stage; clients in a ``drop_before_*`` set stop answering at that stage; a
    liar reveals altered shares."""
    clients = [SecAggClient(name, seeded(seed + i)) for i, name in enumerate(updates)]
    for client in clients:
        server.receive_keys(client.advertise())
    roster = server.roster()
    active = [c for c in clients if c.name not in drop_before_shares]
    for client in active:
        server.receive_shares(client.share_keys(roster))
    forwarded = server.forward_shares()
    active = [c for c in active if c.name not in drop_before_masking]
    masked = {}
    for client in active:
        weight = 1 if weights is None else weights[client.name]
        update = updates[client.name]
        masked[client.name] = client.masked_input(forwarded[client.name], update, weight)
        server.receive_masked(masked[client.name])
    request = server.unmask_request()
    for client in active:
        if client.name in drop_before_unmasking:
            continue
        shares = client.unmask(request)
        if client.name in liars:
            shares = replace(shares, self_mask_shares=_altered(shares.self_mask_shares))
        server.receive_unmask(shares)
    return server.result(), roster, masked


def _altered(shares: Mapping[str, bytes]) -> dict[str, bytes]:
    return {owner: bytes([share[0] ^ 1]) + share[1:] for owner, share in shares.items()}


def random_updates(n: int, seed: int = 0, clip: float = 1.0) -> dict[str, Vector]:
    rng = np.random.default_rng(seed)
    return {
        f"client-{i}": Vector(
            {
                "w": rng.uniform(-clip, clip, (30, 10)).astype(np.float32),
                "b": rng.uniform(-clip, clip, 10),
            }
        )
        for i in range(n)
    }


def plain_sum(updates: Mapping[str, Vector], names: Collection[str]) -> dict[str, np.ndarray]:
    first = next(iter(updates.values()))
    return {
        key: np.sum([np.asarray(updates[n].coefs[key], np.float64) for n in names], axis=0)
        for key in first.coefs
    }
