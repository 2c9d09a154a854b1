"""What the Dask transport sends a worker to build its clients: a few joined arrays."""

from __future__ import annotations

import numpy as np

from fedpipe.server.transports.dask.payloads import inits_from, packed_inits


def test_packed_inits_join_arrays_of_one_kind_and_give_each_client_its_own_back() -> None:
    rng = np.random.default_rng(0)
    inits = {
        "a": {"train": (rng.random((3, 4), np.float32), np.arange(3)), "eval": None, "r": None},
        "b": {
            "train": (rng.random((5, 4), np.float32), np.arange(5)),
            "eval": (rng.random((2, 4), np.float32), np.arange(2)),
            "r": {"steps": 7},
        },
        "c": {"train": (rng.random((1, 2, 2)), np.ones((1, 3), np.int8)), "eval": None, "r": 1},
    }
    packed = packed_inits(inits)

    # x of a, b (train and eval) in one float32 (n, 4) array; y of a and b in one int64 array.
    shapes = sorted((a.dtype.str, a.shape) for a in packed["arrays"])
    assert shapes == sorted([("<f4", (10, 4)), ("<i8", (10,)), ("<f8", (1, 2, 2)), ("|i1", (1, 3))])
    back = inits_from(packed)
    assert list(back) == ["a", "b", "c"]
    for name, init in inits.items():
        assert back[name]["r"] == init["r"]
        for part in ("train", "eval"):
            if init[part] is None:
                assert back[name][part] is None
                continue
            for sent, got in zip(init[part], back[name][part], strict=True):
                assert got.dtype == sent.dtype and np.array_equal(got, sent)


def test_no_client_to_build_packs_to_nothing() -> None:
    assert inits_from(packed_inits({})) == {}
