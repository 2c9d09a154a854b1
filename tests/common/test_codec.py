"""Arrays, Vectors and states through protobuf: exact round trips, and untrusted input rejected
with a DecodeError that says what was wrong."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpipe.common.codec import (
    MAX_DEPTH,
    DecodeError,
    NonFiniteError,
    PayloadTooLargeError,
    SpecError,
    TruncatedError,
    decode_array,
    decode_state,
    decode_vector,
    dtype_from_enum,
    dtype_to_enum,
    encode_array,
    encode_state,
    encode_vector,
    state_from_bytes,
    state_to_bytes,
)
from fedpipe.common.state import StateValue, states_equal
from fedpipe.common.vector import ArraySpec, SpecMismatchError, Vector
from fedpipe.proto.fedpipe.v1 import tensor_pb2 as pb

DTYPES = [
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "bfloat16",  # ml_dtypes.bfloat16
]
SLOW = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def arrays(draw: st.DrawFn, max_dims: int = 3, max_side: int = 4) -> np.ndarray:
    """Any supported dtype, shapes from () to 0-size, arbitrary bit patterns (NaNs too)."""
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, max_side), max_size=max_dims)))
    size = int(np.prod(shape, dtype=np.int64))
    if dtype.kind == "b":
        return np.array(draw(st.lists(st.booleans(), min_size=size, max_size=size)), bool).reshape(
            shape
        )
    raw = draw(st.binary(min_size=size * dtype.itemsize, max_size=size * dtype.itemsize))
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


names = st.text(max_size=12)


@st.composite
def vectors(draw: st.DrawFn) -> Vector:
    keys = draw(st.lists(names, max_size=4, unique=True))
    return Vector({k: draw(arrays()) for k in keys})


leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 63) - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | arrays(max_dims=2)
    | vectors()
)
state_values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(names, inner, max_size=4),
    max_leaves=12,
)
states = st.dictionaries(names, state_values, max_size=5)


def same_array(left: np.ndarray, right: np.ndarray) -> bool:
    return (
        left.dtype.name == right.dtype.name
        and left.shape == right.shape
        and left.astype(left.dtype.newbyteorder("<")).tobytes()
        == right.astype(right.dtype.newbyteorder("<")).tobytes()
    )


def tensor(name: str, dtype: Any, shape: list[int], data: bytes) -> Any:
    return pb.Tensor(spec=pb.TensorSpec(name=name, dtype=dtype, shape=shape), data=data)


# ---- arrays ---------------------------------------------------------------------------------


@SLOW
@given(name=names, array=arrays())
def test_array_round_trip_is_bit_exact(name: str, array: np.ndarray) -> None:
    msg = pb.Tensor.FromString(encode_array(name, array).SerializeToString())
    assert msg.spec.name == name
    assert list(msg.spec.shape) == list(array.shape)
    out = decode_array(msg, ArraySpec(array.shape, array.dtype.name))
    assert same_array(out, array)


def test_scalar_and_empty_arrays_keep_their_shape() -> None:
    scalar = decode_array(encode_array("s", np.array(2.5, np.float32)))
    empty = decode_array(encode_array("e", np.zeros((0, 3), np.int16)))
    assert scalar.shape == () and scalar.dtype == np.float32 and float(scalar) == 2.5
    assert empty.shape == (0, 3) and empty.dtype == np.int16


def test_big_endian_and_strided_arrays_are_sent_little_endian_c_order() -> None:
    array = np.arange(12, dtype=">f8").reshape(3, 4)[:, ::2]
    msg = encode_array("w", array)
    assert msg.data == np.ascontiguousarray(array, dtype="<f8").tobytes()
    out = decode_array(msg)
    assert out.dtype == np.float64 and out.dtype.isnative
    np.testing.assert_array_equal(out, array)


def test_decoded_array_is_a_read_only_view() -> None:
    out = decode_array(encode_array("w", np.ones(4, np.float32)))
    assert not out.flags.writeable
    assert not out.flags.owndata


@pytest.mark.parametrize("dtype", [np.complex64, object, "U3", "datetime64[s]"])
def test_unsupported_dtypes_are_refused_on_encode(dtype: Any) -> None:
    with pytest.raises(TypeError, match=r"tensor 'w': dtype .* cannot be sent, expected one of"):
        encode_array("w", np.zeros(2, dtype=dtype))


def test_expected_dtype_and_shape_are_enforced() -> None:
    msg = encode_array("w", np.zeros((2, 3), np.float32))
    with pytest.raises(SpecError, match=r"tensor 'w': dtype float32, expected float64"):
        decode_array(msg, ArraySpec((2, 3), "float64"))
    with pytest.raises(SpecError, match=r"tensor 'w': shape \[2, 3\], expected \[3, 2\]"):
        decode_array(msg, ArraySpec((3, 2), "float32"))


def test_spec_error_is_also_a_spec_mismatch_error() -> None:
    assert issubclass(SpecError, SpecMismatchError) and issubclass(SpecError, DecodeError)
    assert issubclass(DecodeError, ValueError)


@pytest.mark.parametrize("code", [pb.DTYPE_UNSPECIFIED, 99])
def test_unknown_dtype_codes_are_rejected(code: int) -> None:
    with pytest.raises(SpecError, match=rf"tensor 'w': dtype code {code} is not valid"):
        decode_array(tensor("w", code, [1], b"\x00"))


def test_wrong_byte_count_is_a_truncated_error() -> None:
    msg = encode_array("w", np.zeros(4, np.float32))
    msg.data = msg.data[:-1]
    with pytest.raises(TruncatedError, match=r"tensor 'w': 15 bytes of data, expected 16"):
        decode_array(msg)


def test_absurd_shapes_are_rejected_before_allocating() -> None:
    with pytest.raises(TruncatedError, match="expected 4611686018427387904"):
        decode_array(tensor("w", pb.DTYPE_UINT8, [1 << 31, 1 << 31], b"1234"))
    with pytest.raises(SpecError, match=r"shape \[0, 4611686018427387904\] of float64 is too"):
        decode_array(tensor("w", pb.DTYPE_FLOAT64, [0, 1 << 62], b""))
    with pytest.raises(SpecError, match="65 dimensions, expected at most 64"):
        decode_array(tensor("w", pb.DTYPE_UINT8, [1] * 65, b"\x00"))


def test_non_finite_values_are_rejected_only_when_asked() -> None:
    msg = encode_array("w", np.array([1.0, np.nan, np.inf], np.float32))
    assert np.isnan(decode_array(msg)[1])
    with pytest.raises(NonFiniteError, match=r"tensor 'w': 2 of 3 values are NaN or infinite"):
        decode_array(msg, allow_nonfinite=False)
    decode_array(encode_array("i", np.arange(3)), allow_nonfinite=False)


def test_booleans_must_be_zero_or_one_bytes() -> None:
    with pytest.raises(DecodeError, match=r"tensor 'b': boolean data holds bytes other than"):
        decode_array(tensor("b", pb.DTYPE_BOOL, [2], b"\x01\x02"))


def test_dtype_enum_helpers_cover_every_dtype() -> None:
    for name in DTYPES:
        assert dtype_from_enum(dtype_to_enum(name)) == name
    with pytest.raises(SpecError, match="dtype code 0 is not valid"):
        dtype_from_enum(pb.DTYPE_UNSPECIFIED)
    with pytest.raises(TypeError, match="cannot be sent"):
        dtype_to_enum("complex128")


# ---- Vectors ----------------------------------------------------------------------------------


@SLOW
@given(vector=vectors())
def test_vector_round_trip_keeps_names_order_and_bits(vector: Vector) -> None:
    msg = pb.VectorProto.FromString(encode_vector(vector).SerializeToString())
    out = decode_vector(msg, vector.specs())
    assert list(out) == list(vector)
    assert out.array_equal(vector)


def test_vector_specs_are_checked_against_expected() -> None:
    vector = Vector({"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)})
    msg = encode_vector(vector)
    with pytest.raises(SpecError, match=r"names differ: missing \['c'\], unexpected \['b'\]"):
        decode_vector(msg, {"w": ArraySpec((2, 2), "float32"), "c": ArraySpec((2,), "float32")})
    with pytest.raises(SpecError, match=r"array 'b' has shape \(2,\), expected \(3,\)"):
        decode_vector(msg, {"w": ArraySpec((2, 2), "float32"), "b": ArraySpec((3,), "float32")})


def test_vector_with_duplicate_names_is_rejected() -> None:
    msg = encode_vector(Vector({"w": np.zeros(1)}))
    msg.tensors.append(msg.tensors[0])
    with pytest.raises(SpecError, match=r"array name 'w' appears twice"):
        decode_vector(msg)


def test_vector_rejects_non_finite_when_asked() -> None:
    msg = encode_vector(Vector({"w": np.array([np.inf])}))
    with pytest.raises(NonFiniteError, match="tensor 'w'"):
        decode_vector(msg, allow_nonfinite=False)


# ---- states -----------------------------------------------------------------------------------


@SLOW
@given(state=states)
def test_state_round_trip_is_exact(state: dict[str, StateValue]) -> None:
    out = state_from_bytes(state_to_bytes(state))
    assert states_equal(out, state)


def test_state_types_are_distinguished_exactly() -> None:
    state = {
        "b": True,
        "i": 1,
        "f": 1.0,
        "s": "1",
        "n": None,
        "a": np.array(1),
        "v": Vector({"a": np.array(1)}),
        "d": {"a": np.array(1)},
        "t": (1, 2.0),
        "big": (1 << 63) - 1,
    }
    out = decode_state(encode_state(state))  # type: ignore[arg-type]
    assert [type(v) for v in out.values()] == [
        bool,
        int,
        float,
        str,
        type(None),
        np.ndarray,
        Vector,
        dict,
        list,
        int,
    ]
    assert out["t"] == [1, 2.0] and type(out["t"][1]) is float
    assert out["big"] == (1 << 63) - 1


def test_dict_key_order_round_trips() -> None:
    state: dict[str, StateValue] = {"z": {"b": 1, "a": 2, "c": 3}, "a": 0}
    out = state_from_bytes(state_to_bytes(state))
    assert list(out) == ["z", "a"]
    assert isinstance(out["z"], dict) and list(out["z"]) == ["b", "a", "c"]


@pytest.mark.parametrize(
    ("state", "pattern"),
    [
        ({"mom": {"x": object()}}, r"state\['mom'\]\['x'\]: cannot encode a object"),
        ({"h": [1, 2, {1, 2}]}, r"state\['h'\]\[2\]: cannot encode a set"),
        ({"m": {"x": np.float32(1.0)}}, r"state\['m'\]\['x'\]: .*numpy scalars with \.item\(\)"),
        ({"m": {1: 2}}, r"state\['m'\]: dict key 1 is int, expected str"),
    ],
)
def test_unsupported_leaves_name_their_path(state: Any, pattern: str) -> None:
    with pytest.raises(TypeError, match=pattern):
        encode_state(state)


def test_state_must_be_a_dict() -> None:
    with pytest.raises(TypeError, match="state: expected a dict with str keys, got list"):
        encode_state([1])  # type: ignore[arg-type]


def test_ints_beyond_64_bits_are_refused() -> None:
    with pytest.raises(ValueError, match=r"state\['n'\]: int 9223372036854775808 does not fit"):
        encode_state({"n": 1 << 63})


def _nested(depth: int) -> dict[str, StateValue]:
    state: dict[str, StateValue] = {"leaf": np.arange(3)}
    for _ in range(depth):
        state = {"k": [state]}
    return state


def test_nesting_up_to_max_depth_round_trips_and_deeper_is_refused() -> None:
    ok = _nested(MAX_DEPTH // 2 - 1)  # each level is a dict and a list
    assert states_equal(state_from_bytes(state_to_bytes(ok)), ok)
    with pytest.raises(ValueError, match=f"nested deeper than {MAX_DEPTH} levels"):
        encode_state(_nested(MAX_DEPTH))


def test_too_deep_values_are_rejected_on_decode() -> None:
    msg = pb.Value(null_value=pb.NULL_VALUE)
    for _ in range(MAX_DEPTH + 1):
        msg = pb.Value(list_value=pb.ListValue(values=[msg]))
    top = pb.Value(map_value=pb.MapValue(entries=[pb.MapEntry(key="x", value=msg)]))
    with pytest.raises(DecodeError, match="nested deeper than"):
        decode_state(top)


@pytest.mark.parametrize(
    ("msg", "pattern"),
    [
        (pb.Value(), "state is a None, expected a map_value"),
        (pb.Value(list_value=pb.ListValue()), "state is a list_value, expected a map_value"),
        (
            pb.Value(map_value=pb.MapValue(entries=[pb.MapEntry(key="x")])),
            r"state\['x'\]: value has no kind set",
        ),
        (
            pb.Value(
                map_value=pb.MapValue(
                    entries=[pb.MapEntry(key="x", value=pb.Value(int_value=1))] * 2
                )
            ),
            "key 'x' appears twice",
        ),
        (
            pb.Value(
                map_value=pb.MapValue(
                    entries=[pb.MapEntry(key="r", value=pb.Value(tensor_ref=pb.TensorRef()))]
                )
            ),
            r"state\['r'\]: tensor_ref is only valid in a payload header",
        ),
    ],
)
def test_malformed_state_messages_are_decode_errors(msg: Any, pattern: str) -> None:
    with pytest.raises(DecodeError, match=pattern):
        decode_state(msg)


def test_state_tensors_are_named_by_path_in_errors() -> None:
    data = bytearray(state_to_bytes({"mom": {"x": np.arange(4, dtype=np.float64)}}))
    msg = pb.Value.FromString(bytes(data))
    inner = msg.map_value.entries[0].value.map_value.entries[0].value.tensor_value
    inner.data = inner.data[:8]
    with pytest.raises(TruncatedError, match=r"at state\['mom'\]\['x'\]: 8 bytes of data"):
        decode_state(msg)


def test_state_from_bytes_enforces_max_bytes() -> None:
    data = state_to_bytes({"w": np.zeros(100)})
    with pytest.raises(PayloadTooLargeError, match=f"state of {len(data)} bytes, expected at"):
        state_from_bytes(data, max_bytes=100)
    assert list(state_from_bytes(data, max_bytes=len(data))) == ["w"]


def _decodes_or_raises_decode_error(data: bytes) -> None:
    try:
        state = state_from_bytes(data)
    except DecodeError:
        return
    assert isinstance(state, dict)


@SLOW
@given(data=st.binary(max_size=200))
def test_random_bytes_never_raise_anything_but_decode_error(data: bytes) -> None:
    _decodes_or_raises_decode_error(data)


@SLOW
@given(state=states, data=st.data())
def test_corrupted_and_truncated_encodings_never_crash(state: Any, data: st.DataObject) -> None:
    encoded = bytearray(state_to_bytes(state))
    if not encoded:
        return
    cut = data.draw(st.integers(0, len(encoded) - 1))
    _decodes_or_raises_decode_error(bytes(encoded[:cut]))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(encoded) - 1))
        encoded[pos] = data.draw(st.integers(0, 255))
    _decodes_or_raises_decode_error(bytes(encoded))
