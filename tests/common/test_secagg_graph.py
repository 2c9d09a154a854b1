from __future__ import annotations

import pytest

from fedpipe.common.secagg.graph import neighbour_graph
from tests.common.secagg_run import seeded

CLIENTS = [f"c{i}" for i in range(20)]


def test_default_graph_is_complete() -> None:
    graph = neighbour_graph(CLIENTS[:5], None, seeded(0))
    assert graph["c2"] == ("c0", "c1", "c3", "c4")
    assert neighbour_graph(CLIENTS[:5], 4, seeded(0)) == graph


def test_secagg_plus_graph_is_k_regular_symmetric_and_random() -> None:
    graph = neighbour_graph(CLIENTS, 6, seeded(0))
    assert all(len(n) == 6 and c not in n for c, n in graph.items())
    assert all(c in graph[o] for c, n in graph.items() for o in n)
    assert graph != neighbour_graph(CLIENTS, 6, seeded(1))
    assert set(graph["c0"]) != {"c17", "c18", "c19", "c1", "c2", "c3"}  # the ring is shuffled


@pytest.mark.parametrize("k", [0, 3])
def test_odd_or_zero_degree_is_refused(k: int) -> None:
    with pytest.raises(ValueError, match=f"neighbours: {k}, expected an even number >= 2"):
        neighbour_graph(CLIENTS, k, seeded(0))
