"""Who masks with whom: the complete graph of SecAgg (Bonawitz et al., 2017) or the sparse
k-regular graph of SecAgg+ (Bell et al., 2020).

SecAgg+ places the clients, in a random order the server draws, on a ring and joins each to
the ``k / 2`` nearest on either side (the Harary graph H(k, n)); with ``k`` of order
``log n`` the cost per client drops from O(n) to O(log n) key agreements, masks and shares,
while a set of colluding clients below the threshold still cannot unmask an honest one with
high probability. Each client's secrets are shared among its neighbours and itself.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

__all__ = ["neighbour_graph"]


def neighbour_graph(
    clients: Sequence[str], neighbours: int | None, entropy: Callable[[int], bytes]
) -> dict[str, tuple[str, ...]]:
    """Each client's neighbours (itself excluded, in ``clients`` order): everyone when
    ``neighbours`` is None or at least ``len(clients) - 1``, else a random Harary graph of
    even degree ``neighbours``."""
    n = len(clients)
    if neighbours is None or neighbours >= n - 1:
        return {c: tuple(o for o in clients if o != c) for c in clients}
    if neighbours < 2 or neighbours % 2:
        raise ValueError(f"neighbours: {neighbours}, expected an even number >= 2 (or None)")
    ring = list(clients)
    # The graph is public; only its unpredictability to clients matters, not secrecy.
    random.Random(entropy(32)).shuffle(ring)
    position = {c: i for i, c in enumerate(ring)}
    half = neighbours // 2
    linked = {
        c: {ring[(position[c] + d) % n] for d in range(-half, half + 1) if d} for c in clients
    }
    return {c: tuple(o for o in clients if o in linked[c]) for c in clients}
