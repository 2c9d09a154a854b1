"""Streamed payloads: header + chunks reassemble exactly, bad headers are rejected before any
allocation, and the hand-written chunk frames are byte-identical to protobuf's."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError as ProtobufDecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpipe.common.codec import (
    DecodeError,
    NonFiniteError,
    PayloadTooLargeError,
    SpecError,
    TruncatedError,
)
from fedpipe.common.payload import (
    CHUNK_FIELD,
    DeferredVector,
    PayloadAssembler,
    chunk_frame,
    encode_payload,
    parse_chunk_frame,
)
from fedpipe.common.state import State, states_equal
from fedpipe.common.vector import ArraySpec, Vector
from fedpipe.proto.fedpipe.v1 import tensor_pb2 as pb

SLOW = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = ["bool", "int8", "uint16", "int32", "uint64", "float16", "float32", "float64", "bfloat16"]
MB = 1 << 20


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    size = int(np.prod(shape, dtype=np.int64))
    if dtype.kind == "b":
        return np.array(draw(st.lists(st.booleans(), min_size=size, max_size=size)), bool).reshape(
            shape
        )
    raw = draw(st.binary(min_size=size * dtype.itemsize, max_size=size * dtype.itemsize))
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


@st.composite
def vectors(draw: st.DrawFn) -> Vector:
    keys = draw(st.lists(st.text(max_size=6), max_size=3, unique=True))
    return Vector({k: draw(arrays()) for k in keys})


states = st.dictionaries(
    st.text(max_size=6),
    st.recursive(
        st.none() | st.integers(-5, 5) | st.floats() | st.text(max_size=4) | arrays() | vectors(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
        max_leaves=10,
    ),
    max_size=4,
)


def transfer(state: State, chunk_size: int = 4 * MB, **kwargs: Any) -> State:
    """Sender -> serialized header and frames -> receiver, as on the wire."""
    payload = encode_payload(state, chunk_size)
    header = pb.PayloadHeader.FromString(payload.header.SerializeToString())
    assembler = PayloadAssembler(header, max_bytes=kwargs.pop("max_bytes", 1 << 30), **kwargs)
    for tensor, offset, data in payload.chunks():
        chunk = parse_chunk_frame(chunk_frame(CHUNK_FIELD, tensor, offset, data), CHUNK_FIELD)
        assert chunk is not None
        assembler.add_chunk(*chunk)
    assert assembler.complete
    return assembler.finish()


def model() -> Vector:
    return Vector({"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3)})


# ---- round trips ------------------------------------------------------------------------------


@SLOW
@given(state=states, chunk_size=st.integers(1, 64))
def test_random_states_reassemble_exactly_with_any_chunk_size(
    state: State, chunk_size: int
) -> None:
    assert states_equal(transfer(state, chunk_size), state)


def test_vector_dict_and_array_stay_distinct() -> None:
    arr = np.arange(3, dtype=np.int64)
    state: State = {"v": Vector({"a": arr}), "d": {"a": arr}, "a": arr, "n": [arr, 1, "x"]}
    out = transfer(state)
    assert isinstance(out["v"], Vector) and list(out["v"]) == ["a"]
    assert isinstance(out["d"], dict) and isinstance(out["a"], np.ndarray)
    assert states_equal(out, state)


def test_tiny_chunk_size_forces_many_chunks_and_reassembles() -> None:
    state: State = {"weights": model(), "step": 7}
    payload = encode_payload(state, chunk_size=5)
    chunks = list(payload.chunks())
    assert len(chunks) == -(-48 // 5) + -(-24 // 5)  # ceil per tensor
    assert all(len(data) <= 5 for _, _, data in chunks)
    assert states_equal(transfer(state, chunk_size=5), state)
    assert states_equal(transfer(state, chunk_size=1), state)


def test_header_describes_the_tensor_table() -> None:
    payload = encode_payload({"weights": model(), "mom": np.zeros((2, 2), np.float16)})
    header = payload.header
    assert [t.name for t in header.tensors] == ["w", "b", "state['mom']"]
    assert [list(t.shape) for t in header.tensors] == [[3, 4], [3], [2, 2]]
    assert header.total_bytes == 48 + 24 + 8 == payload.total_bytes
    weights = header.structure.map_value.entries[0].value
    assert list(weights.vector_ref.indices) == [0, 1]


def test_chunks_are_zero_copy_views_of_little_endian_arrays() -> None:
    weights = np.arange(1000, dtype=np.float32)
    payload = encode_payload({"w": weights}, chunk_size=1000)
    _, offset, data = list(payload.chunks())[1]
    assert offset == 1000
    assert np.shares_memory(np.frombuffer(data, np.uint8), weights)
    big_endian = np.arange(4, dtype=">i4")
    payload = encode_payload({"w": big_endian})
    (_, _, data), *_ = payload.chunks()
    assert bytes(data) == np.arange(4, dtype="<i4").tobytes()


def test_chunks_can_be_streamed_again() -> None:
    payload = encode_payload({"weights": model()}, chunk_size=7)
    assert [(t, o, bytes(d)) for t, o, d in payload.chunks()] == [
        (t, o, bytes(d)) for t, o, d in payload.chunks()
    ]


def test_empty_and_tensorless_states_are_complete_at_once() -> None:
    tensorless: list[State] = [{}, {"n": 1, "s": [None, "x"]}, {"e": np.zeros((0, 4))}]
    for state in tensorless:
        payload = encode_payload(state)
        assert list(payload.chunks()) == []
        assembler = PayloadAssembler(payload.header, max_bytes=0)
        assert assembler.complete
        assert states_equal(assembler.finish(), state)


def test_received_arrays_are_writable() -> None:
    out = transfer({"weights": model()})
    weights = out["weights"]
    assert isinstance(weights, Vector)
    weights.coefs["w"][0, 0] = 42.0
    assert weights.coefs["w"].flags.writeable


def test_a_vector_is_received_straight_into_the_arrays_given_for_its_key() -> None:
    sent = {"weights": Vector({"w": np.arange(6.0).reshape(2, 3), "b": np.ones(3, np.float32)})}
    sent["other"] = Vector({"w": np.full((2, 3), 7.0), "b": np.zeros(3, np.float32)})
    model = {"w": np.zeros((2, 3)), "b": np.zeros(3, np.float32)}
    got = transfer(sent, chunk_size=8, into={"weights": model})
    assert states_equal(got, sent)
    assert all(got["weights"].coefs[n] is model[n] for n in model)
    np.testing.assert_array_equal(model["w"], np.arange(6.0).reshape(2, 3))
    assert not any(np.shares_memory(got["other"].coefs[n], model[n]) for n in model)


@pytest.mark.parametrize(
    "model",
    [
        {"w": np.zeros((3, 2)), "b": np.zeros(3, np.float32)},  # another shape
        {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)},  # another dtype
        {"w": np.zeros((3, 2)).T, "b": np.zeros(3, np.float32)},  # not C-contiguous
        {"w": np.zeros((2, 3))},  # a name missing
    ],
)
def test_arrays_that_do_not_fit_exactly_leave_the_vector_its_own(
    model: dict[str, np.ndarray],
) -> None:
    sent = {"weights": Vector({"w": np.arange(6.0).reshape(2, 3), "b": np.ones(3, np.float32)})}
    got = transfer(sent, into={"weights": model})
    assert states_equal(got, sent)
    assert not np.any(model["w"])  # untouched: the specs are as sent, for the caller to check
    read_only = {"w": np.zeros((2, 3)), "b": np.zeros(3, np.float32)}
    read_only["w"].flags.writeable = False
    assert transfer(sent, into={"weights": read_only})["weights"].coefs["w"] is not read_only["w"]


def test_chunk_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="chunk_size is 0, expected at least 1 byte"):
        encode_payload({}, chunk_size=0)


# ---- header validation ------------------------------------------------------------------------


def header_of(state: State) -> Any:
    return encode_payload(state).header


def test_payload_over_max_bytes_is_rejected_before_allocating() -> None:
    header = header_of({"w": np.zeros(10, np.float32)})
    header.tensors[0].shape[:] = [1 << 40]  # 4 TiB: allocating would fail loudly
    header.total_bytes = 4 << 40
    with pytest.raises(
        PayloadTooLargeError,
        match=r"tensor 0 \(\"state\['w'\]\"\): shape \[1099511627776\] of float32 holds",
    ):
        PayloadAssembler(header, max_bytes=1 << 30)
    two = header_of({"a": np.zeros(5, np.float32), "b": np.zeros(5, np.float32)})
    with pytest.raises(PayloadTooLargeError, match="tensors 0 to 1 already hold 40 bytes, exp"):
        PayloadAssembler(two, max_bytes=39)


def test_expected_specs_apply_to_every_vector() -> None:
    expected = model().specs()
    state: State = {"weights": model(), "aux": {"c": model()}, "other": np.zeros(5)}
    assert states_equal(transfer(state, expected=expected), state)
    wrong = dict(expected, b=ArraySpec((4,), "float64"))
    with pytest.raises(SpecError, match=r"vector at state\['aux'\]\['c'\]: array 'b' has shape"):
        PayloadAssembler(header_of({"aux": {"c": model()}}), max_bytes=MB, expected=wrong)


@pytest.mark.parametrize(
    ("corrupt", "error", "pattern"),
    [
        (lambda h: setattr(h.tensors[0], "dtype", 0), SpecError, "dtype code 0 is not valid"),
        (lambda h: setattr(h, "total_bytes", 1), DecodeError, "announces total_bytes=1, but"),
        (lambda h: h.ClearField("structure"), DecodeError, "header has no structure"),
        (
            lambda h: h.tensors.add(name="x", dtype=pb.DTYPE_INT8, shape=[0]),
            DecodeError,
            r"tensors \[2\] are not referenced",
        ),
        (
            lambda h: h.structure.map_value.entries[0].value.vector_ref.indices.append(5),
            DecodeError,
            "tensor reference 5, expected an index below 2",
        ),
        (
            lambda h: h.structure.map_value.entries.add(
                key="y", value=pb.Value(tensor_ref=pb.TensorRef(index=1))
            ),
            DecodeError,
            r"state\['y'\]: tensor 1 is referenced twice",
        ),
        (
            lambda h: setattr(h.tensors[1], "name", "w"),
            SpecError,
            "array name 'w' appears twice",
        ),
        (
            lambda h: h.structure.map_value.entries.add(
                key="x", value=pb.Value(tensor_value=pb.Tensor())
            ),
            DecodeError,
            r"state\['x'\]: tensor_value in a payload header",
        ),
    ],
)
def test_invalid_headers_are_rejected(corrupt: Any, error: type, pattern: str) -> None:
    header = header_of({"weights": model()})
    corrupt(header)
    with pytest.raises(error, match=pattern):
        PayloadAssembler(header, max_bytes=MB)


# ---- chunks -----------------------------------------------------------------------------------


def assembler_for(state: State, **kwargs: Any) -> PayloadAssembler:
    return PayloadAssembler(encode_payload(state).header, max_bytes=MB, **kwargs)


def test_chunk_errors_name_the_tensor_and_what_was_expected() -> None:
    assembler = assembler_for({"weights": model()})
    with pytest.raises(DecodeError, match="chunk for tensor 2, expected an index below 2"):
        assembler.add_chunk(2, 0, b"x")
    with pytest.raises(DecodeError, match=r"tensor 'w' at state\['weights'\] at byte offset 4, "):
        assembler.add_chunk(0, 4, b"xxxx")
    assembler.add_chunk(0, 0, b"x" * 40)
    with pytest.raises(DecodeError, match="at byte offset 0, expected offset 40"):
        assembler.add_chunk(0, 0, b"x" * 8)  # a byte twice
    with pytest.raises(DecodeError, match="ends at byte 49, expected at most 48 bytes"):
        assembler.add_chunk(0, 40, b"x" * 9)
    assert assembler.received_bytes == 40 and not assembler.complete


def test_chunks_of_different_tensors_may_interleave() -> None:
    state: State = {"weights": model()}
    payload = encode_payload(state, chunk_size=8)
    chunks = sorted(payload.chunks(), key=lambda c: (c[1], c[0]))  # by offset, then tensor
    assembler = PayloadAssembler(payload.header, max_bytes=MB)
    for chunk in chunks:
        assembler.add_chunk(*chunk)
    assert states_equal(assembler.finish(), state)


def test_missing_bytes_are_a_truncated_error() -> None:
    assembler = assembler_for({"weights": model()})
    assembler.add_chunk(0, 0, bytes(48))
    assembler.add_chunk(1, 0, bytes(16))
    with pytest.raises(TruncatedError, match=r"tensor 'b' at state\['weights'\]: received 16 of"):
        assembler.finish()


def test_non_finite_values_are_rejected_as_chunks_arrive_when_asked() -> None:
    state: State = {"w": Vector({"a": np.array([1.0, 2.0, np.inf, 3.0])})}
    assert states_equal(transfer(state), state)
    assert states_equal(transfer({"w": model()}, 3, allow_nonfinite=False), {"w": model()})
    assembler = assembler_for(state, allow_nonfinite=False)
    data = encode_payload(state).arrays[0].tobytes()
    assembler.add_chunk(0, 0, data[:20])  # two whole elements and half of the inf
    with pytest.raises(NonFiniteError, match=r"tensor 'a' at state\['w'\]: element 2 is inf"):
        assembler.add_chunk(0, 20, data[20:])


def test_invalid_booleans_are_rejected_on_finish() -> None:
    assembler = assembler_for({"mask": np.zeros(2, bool)})
    assembler.add_chunk(0, 0, b"\x01\x07")
    with pytest.raises(DecodeError, match=r"state\['mask'\]: boolean data holds bytes"):
        assembler.finish()


def test_no_chunk_after_finish() -> None:
    assembler = assembler_for({"n": 1})
    assembler.finish()
    with pytest.raises(DecodeError, match="after the payload was finished"):
        assembler.add_chunk(0, 0, b"")


# ---- raw frames -------------------------------------------------------------------------------


def envelope_class(field_number: int) -> Any:
    """A message type ``Envelope { fedpipe.v1.Chunk chunk = field_number; }``."""
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(pb.DESCRIPTOR.serialized_pb)
    proto = descriptor_pb2.FileDescriptorProto(
        name="envelope.proto", package="test", dependency=["fedpipe/v1/tensor.proto"]
    )
    message = proto.message_type.add(name="Envelope")
    message.field.add(
        name="chunk",
        number=field_number,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
        type_name=".fedpipe.v1.Chunk",
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("test.Envelope"))


FIELDS = [1, 2, 15, 16, 2047, 2048, (1 << 29) - 1]
ENVELOPES = {n: envelope_class(n) for n in FIELDS}


@given(
    field=st.sampled_from(FIELDS),
    tensor=st.integers(0, (1 << 32) - 1) | st.just(0),
    offset=st.integers(0, (1 << 64) - 1) | st.just(0),
    data=st.binary(max_size=300),
)
def test_chunk_frames_match_protobuf_byte_for_byte(
    field: int, tensor: int, offset: int, data: bytes
) -> None:
    frame = chunk_frame(field, tensor, offset, memoryview(data))
    chunk = pb.Chunk(tensor=tensor, offset=offset, data=data)
    fields = {"tensor": tensor, "offset": offset, "data": data}
    assert frame == ENVELOPES[field](chunk=fields).SerializeToString()
    if field == CHUNK_FIELD:
        assert frame == pb.ChunkFrame(chunk=chunk).SerializeToString()
    parsed = parse_chunk_frame(frame, field)
    assert parsed is not None
    assert (parsed[0], parsed[1], bytes(parsed[2])) == (tensor, offset, data)


def test_parsed_chunk_data_is_a_view_of_the_frame() -> None:
    frame = chunk_frame(CHUNK_FIELD, 1, 2, b"abcdef")
    parsed = parse_chunk_frame(frame, CHUNK_FIELD)
    assert parsed is not None and parsed[2].obj is frame


def test_chunk_frame_accepts_typed_memoryviews() -> None:
    data = memoryview(np.arange(3, dtype=np.float64))  # type: ignore[arg-type]
    frame = chunk_frame(CHUNK_FIELD, 0, 0, data)
    assert pb.ChunkFrame.FromString(frame).chunk.data == np.arange(3.0).tobytes()


def test_chunk_frame_rejects_out_of_range_fields() -> None:
    with pytest.raises(ValueError, match="field_number is 19000"):
        chunk_frame(19000, 0, 0, b"")
    with pytest.raises(ValueError, match="tensor is -1, expected a uint32"):
        chunk_frame(15, -1, 0, b"")


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        pb.ChunkFrame().SerializeToString() + b"\x08\x01",  # another field
        pb.ChunkFrame(chunk=pb.Chunk(tensor=1)).SerializeToString() * 2,  # two chunk fields
        chunk_frame(14, 0, 0, b"abc"),  # chunk at another field
        chunk_frame(15, 0, 0, b"abc")[:-1],  # truncated
        b"\x7a\x05\x08\x01\x20\x02\x00",  # unknown field 4 inside the chunk
        b"\x7a\x04\x08\x01\x08\x02",  # tensor twice
    ],
)
def test_frames_that_are_not_one_bare_chunk_are_left_to_protobuf(frame: bytes) -> None:
    assert parse_chunk_frame(frame, CHUNK_FIELD) is None


def test_non_canonical_but_valid_frames_parse_like_protobuf() -> None:
    frame = b"\x7a\x07\x1a\x01z\x10\x00\x08\x03"  # data first, explicit zero offset
    parsed = parse_chunk_frame(frame, CHUNK_FIELD)
    chunk = pb.ChunkFrame.FromString(frame).chunk
    assert parsed is not None
    assert (parsed[0], parsed[1], bytes(parsed[2])) == (chunk.tensor, chunk.offset, chunk.data)


@SLOW
@given(frame=st.binary(max_size=40))
def test_parse_chunk_frame_never_disagrees_with_protobuf(frame: bytes) -> None:
    parsed = parse_chunk_frame(frame, CHUNK_FIELD)
    if parsed is None:
        return
    message = pb.ChunkFrame.FromString(frame)
    assert message.ByteSize() == len(frame)  # nothing unknown or repeated was skipped
    chunk = message.chunk
    assert (parsed[0], parsed[1], bytes(parsed[2])) == (chunk.tensor, chunk.offset, chunk.data)


@SLOW
@given(state=states, data=st.data())
def test_corrupted_headers_raise_only_decode_errors(state: State, data: st.DataObject) -> None:
    encoded = bytearray(encode_payload(state).header.SerializeToString())
    for _ in range(data.draw(st.integers(1, 4)) if encoded else 0):
        encoded[data.draw(st.integers(0, len(encoded) - 1))] = data.draw(st.integers(0, 255))
    try:
        header = pb.PayloadHeader.FromString(bytes(encoded))
    except ProtobufDecodeError:  # the envelope parser's error, reported by the caller
        return
    try:
        assembler = PayloadAssembler(header, max_bytes=MB)
    except DecodeError:
        return
    assert assembler.total_bytes <= MB


def test_a_deferred_vector_streams_the_bytes_of_the_vector_it_stands_for() -> None:
    arrays = {"a": np.arange(7, dtype=np.float32) / 3, "b": np.arange(6, dtype=">f8").reshape(2, 3)}
    specs = {n: ArraySpec(a.shape, a.dtype.name) for n, a in arrays.items()}
    calls: list[tuple[str, int, int]] = []

    def values(name: str, start: int, stop: int) -> np.ndarray:
        calls.append((name, start, stop))
        return arrays[name].reshape(-1)[start:stop].copy()

    for size in (3, 4, 64):  # chunks cutting elements in two, and whole arrays
        real = encode_payload({"u": Vector(arrays), "n": 2}, size)
        deferred = encode_payload({"u": DeferredVector(specs, values), "n": 2}, size)
        assert deferred.header == real.header
        assert [(t, o, bytes(d)) for t, o, d in deferred.chunks()] == [
            (t, o, bytes(d)) for t, o, d in real.chunks()
        ]
    assert calls[:2] == [("a", 0, 1), ("a", 0, 2)]  # bytes 0-2, then 3-5: elements 0 and 1
