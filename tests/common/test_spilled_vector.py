"""A payload's Vectors received to disk: read back as sent, NaN and infinity found even in an
element cut across two chunks, nothing left behind."""

from __future__ import annotations

import numpy as np
import pytest

from fedpipe.common.payload import PayloadAssembler, encode_payload
from fedpipe.common.vector import Vector


def received(vector: Vector, chunk_bytes: int) -> PayloadAssembler:
    state = {"partial": {"update": vector, "weight": 2.0}, "aux_vars": {"v": vector.copy()}}
    payload = encode_payload(state, chunk_bytes)
    assembler = PayloadAssembler(payload.header, max_bytes=1 << 20, spill="partial")
    for tensor, offset, data in payload.chunks():
        assembler.add_chunk(tensor, offset, data)
    return assembler


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int32"])
def test_spilled_arrays_read_back_as_sent(dtype: str) -> None:
    rng = np.random.default_rng(0)
    wide = 100 * rng.standard_normal((7, 9))
    vector = Vector({"a": wide.astype(dtype), "b": np.ones(3, dtype)})
    assembler = received(vector, 13)  # chunks cut elements in two
    state = assembler.finish()
    assert state["partial"] == {"weight": 2.0}  # the Vector is on disk, not in the state
    assert isinstance(state["aux_vars"]["v"], Vector)  # only the "partial" map spills
    spilled = assembler.spilled["update"]
    assert spilled.nonfinite is None and spilled.specs == vector.specs()
    back = {name: np.zeros(spec.shape, dtype).reshape(-1) for name, spec in spilled.specs.items()}
    for name, start, values in spilled.chunks():
        back[name][start : start + values.size] = values
    for name, array in vector.coefs.items():
        np.testing.assert_array_equal(back[name].reshape(array.shape), array)
    assert spilled.norm() == pytest.approx(vector.norm(), rel=1e-12)


def test_an_infinity_cut_across_two_chunks_is_found_and_nothing_more_is_written() -> None:
    vector = Vector({"a": np.arange(40, dtype=np.float32)})
    vector.coefs["a"][25] = np.inf  # bytes 100..103: chunks of 6 bytes cut it at 102
    spilled = received(vector, 6).spilled["update"]
    assert spilled.nonfinite == "array 'a': element 25 is inf"
    with pytest.raises(ValueError, match="closed file"):
        next(spilled.chunks())


def test_a_discarded_payload_closes_its_files() -> None:
    vector = Vector({"a": np.arange(40, dtype=np.float32)})
    payload = encode_payload({"partial": {"update": vector}}, 16)
    assembler = PayloadAssembler(payload.header, max_bytes=1 << 20, spill="partial")
    tensor, offset, data = next(payload.chunks())
    assembler.add_chunk(tensor, offset, data)
    spilled = assembler.spilled["update"]
    assembler.discard()
    with pytest.raises(ValueError, match="closed file"):
        next(spilled.chunks())
