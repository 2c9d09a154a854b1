"""Arrays, Vectors and module states <-> protobuf messages (``fedpipe.v1``).

A tensor travels as raw little-endian C-order bytes with its dtype and shape: no pickle, nothing
executable on the wire. Every decoder treats its input as untrusted: a malformed, mistyped or
mis-sized message raises a :class:`DecodeError` (a ``ValueError``) naming the tensor, what it
held and what was expected, and never any other exception type.

Small states travel whole as one ``Value`` (:func:`encode_state`, :func:`state_to_bytes`).
Model-sized payloads travel as a header and chunks (:mod:`fedpipe.common.payload`), built on the
same state encoding.

State encoding, exactly reversible: ``None``, ``bool``, ``int`` (64-bit), ``float``, ``str``,
numpy arrays, :class:`~fedpipe.common.vector.Vector`, lists and dicts with ``str`` keys (key order
kept). Tuples are sent as lists. Containers nest at most :data:`MAX_DEPTH` deep.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError as _ProtobufDecodeError

from fedpipe.common.half import BFLOAT16, is_float_dtype, missing_bfloat16, numpy_dtype
from fedpipe.common.state import State, StateValue
from fedpipe.common.vector import ArraySpec, SpecMismatchError, Vector, describe_spec_mismatch
from fedpipe.proto.fedpipe.v1 import tensor_pb2 as pb

__all__ = [
    "MAX_DEPTH",
    "DecodeError",
    "NonFiniteError",
    "PayloadTooLargeError",
    "SpecError",
    "TruncatedError",
    "decode_array",
    "decode_state",
    "decode_vector",
    "dtype_from_enum",
    "dtype_to_enum",
    "encode_array",
    "encode_state",
    "encode_vector",
    "state_from_bytes",
    "state_to_bytes",
]

MAX_DEPTH = 24
"""Deepest container nesting of a state (protobuf parsers stop at 100 nested messages)."""

_MAX_NDIM = 64  # numpy's own limit
_MAX_ARRAY_BYTES = 1 << 62  # beyond this numpy cannot even describe the array
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


class DecodeError(ValueError):
    """Bytes or a message received from a peer cannot be decoded into what was expected."""


class SpecError(DecodeError, SpecMismatchError):
    """A tensor's name, dtype or shape is unknown, invalid or not the expected one."""


class TruncatedError(DecodeError):
    """A tensor's data does not hold exactly ``prod(shape) * itemsize`` bytes."""


class NonFiniteError(DecodeError):
    """A tensor holds NaN or infinity where only finite values are accepted."""


class PayloadTooLargeError(DecodeError):
    """A message or payload is larger than the receiver accepts."""


# ---- dtypes -------------------------------------------------------------------------------

_DTYPES: dict[pb.DType, np.dtype[Any]] = {
    pb.DTYPE_BOOL: np.dtype("|b1"),
    pb.DTYPE_INT8: np.dtype("|i1"),
    pb.DTYPE_INT16: np.dtype("<i2"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_UINT8: np.dtype("|u1"),
    pb.DTYPE_UINT16: np.dtype("<u2"),
    pb.DTYPE_UINT32: np.dtype("<u4"),
    pb.DTYPE_UINT64: np.dtype("<u8"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
}
if BFLOAT16 is not None and sys.byteorder == "little":  # ml_dtypes arrays are native-endian
    _DTYPES[pb.DTYPE_BFLOAT16] = BFLOAT16
_DTYPE_CODES: dict[str, pb.DType] = {dtype.name: code for code, dtype in _DTYPES.items()}
_DTYPE_NAMES = ", ".join(_DTYPE_CODES)


def wire_dtype(dtype: np.dtype[Any], what: str) -> tuple[pb.DType, np.dtype[Any]]:
    """The ``DType`` code and little-endian numpy dtype of ``dtype`` (``TypeError`` if none)."""
    code = _DTYPE_CODES.get(dtype.name) if dtype.fields is None else None
    if code is None:
        raise TypeError(f"{what}: dtype {dtype} cannot be sent, expected one of {_DTYPE_NAMES}")
    return code, _DTYPES[code]


def dtype_to_enum(dtype: str | np.dtype[Any]) -> pb.DType:
    """The wire ``DType`` of a numpy dtype or dtype name (``TypeError`` if not sendable)."""
    dt = numpy_dtype(dtype) if isinstance(dtype, str) else dtype
    return wire_dtype(dt, f"dtype {dt}")[0]


def dtype_from_enum(code: int) -> str:
    """The numpy dtype name (``ArraySpec.dtype``) of a wire ``DType``; :class:`SpecError` if
    the code is not a valid dtype (``DTYPE_UNSPECIFIED`` included)."""
    dtype = _DTYPES.get(code)  # type: ignore[call-overload]
    if dtype is None:
        raise SpecError(_unknown_dtype(code, f"dtype code {code}"))
    return dtype.name


def _unknown_dtype(code: int, what: str) -> str:
    if code == pb.DTYPE_BFLOAT16:
        return (
            f"{what}: bfloat16 cannot be received here: {missing_bfloat16() or 'big-endian host'}"
        )
    return f"{what} is not valid, expected one of {_DTYPE_NAMES}"


def little_endian(array: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """``array`` as a little-endian C-contiguous array (itself when it already is one)."""
    return np.asarray(array, dtype=dtype, order="C")


def spec_from_wire(spec: pb.TensorSpec, what: str, max_bytes: int = _MAX_ARRAY_BYTES) -> ArraySpec:
    """Validate a ``TensorSpec``'s dtype and shape; raise before anything is allocated.

    Raises :class:`SpecError` for an unknown dtype or a shape no array can have (even with a
    zero dimension), :class:`PayloadTooLargeError` for more than ``max_bytes`` bytes.
    """
    dtype = _DTYPES.get(spec.dtype)
    if dtype is None:
        raise SpecError(_unknown_dtype(spec.dtype, f"{what}: dtype code {spec.dtype}"))
    if len(spec.shape) > _MAX_NDIM:
        raise SpecError(
            f"{what}: shape has {len(spec.shape)} dimensions, expected at most {_MAX_NDIM}"
        )
    shape = tuple(spec.shape)
    extent = dtype.itemsize
    for dim in shape:
        extent *= dim or 1
    if extent > _MAX_ARRAY_BYTES:
        raise SpecError(
            f"{what}: shape {list(shape)} of {dtype.name} is too large for any array, expected "
            f"at most {_MAX_ARRAY_BYTES} bytes"
        )
    nbytes = extent if all(shape) else 0
    if nbytes > max_bytes:
        raise PayloadTooLargeError(
            f"{what}: shape {list(shape)} of {dtype.name} holds {nbytes} bytes, expected at "
            f"most {max_bytes}"
        )
    return ArraySpec(shape, dtype.name)


def _describe(name: str, path: str | None) -> str:
    return f"tensor {name!r}" + (f" at {path}" if path else "")


def check_array_values(array: np.ndarray, what: str, allow_nonfinite: bool) -> None:
    """Reject booleans that are not 0/1 bytes and, unless allowed, NaN and infinity."""
    if array.dtype.kind == "b" and array.size and int(array.view(np.uint8).max()) > 1:
        raise DecodeError(f"{what}: boolean data holds bytes other than 0 and 1")
    if not allow_nonfinite and is_float_dtype(array.dtype) and not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise NonFiniteError(
            f"{what}: {bad} of {array.size} values are NaN or infinite, expected finite values"
        )


def native(array: np.ndarray) -> np.ndarray:
    """``array`` in the host byte order (a no-op on little-endian hosts)."""
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


# ---- arrays and Vectors --------------------------------------------------------------------


def encode_array(name: str, array: np.ndarray) -> pb.Tensor:
    """Encode one array as a ``Tensor`` (little-endian, C order, whatever the input layout).

    Raises
    ------
    TypeError
        If ``array`` is not a numpy array or its dtype is not one of bool, (u)int8-64,
        float16/32/64, bfloat16 (``ml_dtypes.bfloat16``).
    """
    msg = pb.Tensor()
    _fill_tensor(msg, name, array)
    return msg


def _fill_tensor(msg: pb.Tensor, name: str, array: np.ndarray) -> None:
    # Messages are filled in place: protobuf copies a submessage passed to a constructor,
    # which for a nested state would copy every tensor's bytes once per nesting level.
    if not isinstance(array, np.ndarray):
        raise TypeError(f"tensor {name!r}: expected a numpy array, got {type(array).__name__}")
    code, dtype = wire_dtype(array.dtype, f"tensor {name!r}")
    data = little_endian(array, dtype)
    msg.spec.name = name
    msg.spec.dtype = code
    msg.spec.shape.extend(data.shape)
    msg.data = data.tobytes()


def decode_array(
    msg: pb.Tensor, expected: ArraySpec | None = None, *, allow_nonfinite: bool = True
) -> np.ndarray:
    """Decode a ``Tensor`` into a numpy array, validating it first.

    The array is a zero-copy view (``np.frombuffer``) of the message's bytes, hence
    **read-only**; copy it before writing to it.

    Raises
    ------
    SpecError
        Unknown dtype, absurd shape, or dtype/shape other than ``expected``.
    TruncatedError
        The data is not exactly ``prod(shape) * itemsize`` bytes.
    NonFiniteError
        NaN or infinity while ``allow_nonfinite`` is false.
    """
    return _decode_array(msg, expected, allow_nonfinite, path=None)


def _decode_array(
    msg: pb.Tensor, expected: ArraySpec | None, allow_nonfinite: bool, path: str | None
) -> np.ndarray:
    what = _describe(msg.spec.name, path)
    spec = spec_from_wire(msg.spec, what)
    if expected is not None:
        _check_spec(spec, expected, what)
    dtype = _DTYPES[msg.spec.dtype]
    data = msg.data
    if len(data) != spec.nbytes:
        raise TruncatedError(
            f"{what}: {len(data)} bytes of data, expected {spec.nbytes} "
            f"({spec.dtype}{list(spec.shape)})"
        )
    array = native(np.frombuffer(data, dtype=dtype).reshape(spec.shape))
    check_array_values(array, what, allow_nonfinite)
    return array


def _check_spec(spec: ArraySpec, expected: ArraySpec, what: str) -> None:
    if spec.dtype != expected.dtype:
        raise SpecError(f"{what}: dtype {spec.dtype}, expected {expected.dtype}")
    if spec.shape != tuple(expected.shape):
        raise SpecError(f"{what}: shape {list(spec.shape)}, expected {list(expected.shape)}")


def encode_vector(vector: Vector) -> pb.VectorProto:
    """Encode a Vector as a ``VectorProto`` (one ``Tensor`` per array, in order); torch
    tensors are copied to the host first."""
    msg = pb.VectorProto()
    for name, array in vector.to_numpy().coefs.items():
        _fill_tensor(msg.tensors.add(), name, array)
    return msg


def decode_vector(
    msg: pb.VectorProto,
    expected_specs: Mapping[str, ArraySpec] | None = None,
    *,
    allow_nonfinite: bool = True,
) -> Vector:
    """Decode a ``VectorProto``; names, shapes and dtypes are checked before any data.

    Arrays are read-only views of the message's bytes (see :func:`decode_array`).

    Raises
    ------
    SpecError
        Duplicate names, or specs other than ``expected_specs`` (missing, extra or different
        arrays); also a :class:`~fedpipe.common.vector.SpecMismatchError`.
    TruncatedError, NonFiniteError
        As for :func:`decode_array`.
    """
    return _decode_vector(msg, expected_specs, allow_nonfinite, path=None)


def _decode_vector(
    msg: pb.VectorProto,
    expected: Mapping[str, ArraySpec] | None,
    allow_nonfinite: bool,
    path: str | None,
) -> Vector:
    where = f"vector at {path}" if path else "vector"
    specs: dict[str, ArraySpec] = {}
    for tensor in msg.tensors:
        name = tensor.spec.name
        if name in specs:
            raise SpecError(f"{where}: array name {name!r} appears twice, expected unique names")
        specs[name] = spec_from_wire(tensor.spec, _describe(name, path))
    if expected is not None:
        problem = describe_spec_mismatch(specs, expected)
        if problem:
            raise SpecError(f"{where}: {problem}")
    return Vector(
        {
            t.spec.name: _decode_array(t, specs[t.spec.name], allow_nonfinite, path)
            for t in msg.tensors
        }
    )


# ---- states -------------------------------------------------------------------------------


class StateEncoder:
    """Walks a state into a ``Value``; subclasses decide where arrays and Vectors go.

    Messages are filled in place, top-down, so that no tensor is copied more than once.
    """

    def encode(self, state: State, out: pb.Value | None = None) -> pb.Value:
        if not isinstance(state, dict):
            raise TypeError(f"state: expected a dict with str keys, got {type(state).__name__}")
        out = pb.Value() if out is None else out
        self.fill(out, state, "state", 0)
        return out

    def fill(self, out: pb.Value, value: StateValue, path: str, depth: int) -> None:
        if value is None:
            out.null_value = pb.NULL_VALUE
        elif isinstance(value, bool):
            out.bool_value = value
        elif isinstance(value, int):
            if not _INT64_MIN <= value <= _INT64_MAX:
                raise ValueError(f"{path}: int {value} does not fit in 64 bits")
            out.int_value = value
        elif isinstance(value, float):
            out.double_value = value
        elif isinstance(value, str):
            out.string_value = value
        elif isinstance(value, np.ndarray):
            self.array(out, value, path)
        elif isinstance(value, Vector):
            self.vector(out, value, path)
        elif isinstance(value, (dict, list, tuple)):
            if depth >= MAX_DEPTH:
                raise ValueError(f"{path}: containers nested deeper than {MAX_DEPTH} levels")
            if isinstance(value, dict):
                out.map_value.SetInParent()
                for key, item in value.items():
                    if not isinstance(key, str):
                        raise TypeError(
                            f"{path}: dict key {key!r} is {type(key).__name__}, expected str"
                        )
                    entry = out.map_value.entries.add(key=key)
                    self.fill(entry.value, item, f"{path}[{key!r}]", depth + 1)
            else:
                out.list_value.SetInParent()
                for i, item in enumerate(value):
                    self.fill(out.list_value.values.add(), item, f"{path}[{i}]", depth + 1)
        else:
            hint = ""
            if isinstance(value, np.generic):
                hint = " (convert numpy scalars with .item(), or use a 0-d array)"
            raise TypeError(
                f"{path}: cannot encode a {type(value).__name__}{hint}; a state holds None, "
                "bool, int, float, str, numpy arrays, Vectors, lists and dicts with str keys"
            )

    def array(self, out: pb.Value, array: np.ndarray, path: str) -> None:
        _fill_tensor(out.tensor_value, path, array)

    def vector(self, out: pb.Value, vector: Vector, path: str) -> None:
        out.vector_value.SetInParent()
        for name, array in vector.to_numpy().coefs.items():
            _fill_tensor(out.vector_value.tensors.add(), name, array)


class StateDecoder:
    """Rebuilds a state from a ``Value``; subclasses decide where arrays and Vectors come from."""

    def __init__(self, *, allow_nonfinite: bool = True) -> None:
        self.allow_nonfinite = allow_nonfinite

    def decode(self, msg: pb.Value) -> State:
        if msg.WhichOneof("kind") != "map_value":
            raise DecodeError(f"state is a {msg.WhichOneof('kind')}, expected a map_value")
        state = self.value(msg, "state", 0)
        assert isinstance(state, dict)
        return state

    def value(self, msg: pb.Value, path: str, depth: int) -> StateValue:
        kind = msg.WhichOneof("kind")
        if kind == "null_value":
            if msg.null_value != pb.NULL_VALUE:
                raise DecodeError(f"{path}: null_value is {msg.null_value}, expected 0")
            return None
        if kind == "bool_value":
            return bool(msg.bool_value)
        if kind == "int_value":
            return int(msg.int_value)
        if kind == "double_value":
            return float(msg.double_value)
        if kind == "string_value":
            return str(msg.string_value)
        if kind in ("map_value", "list_value"):
            if depth >= MAX_DEPTH:
                raise DecodeError(f"{path}: containers nested deeper than {MAX_DEPTH} levels")
            if kind == "list_value":
                return [
                    self.value(v, f"{path}[{i}]", depth + 1)
                    for i, v in enumerate(msg.list_value.values)
                ]
            out: dict[str, StateValue] = {}
            for entry in msg.map_value.entries:
                if entry.key in out:
                    raise DecodeError(f"{path}: key {entry.key!r} appears twice")
                out[entry.key] = self.value(entry.value, f"{path}[{entry.key!r}]", depth + 1)
            return out
        if kind is None:
            raise DecodeError(f"{path}: value has no kind set")
        return self.tensors(msg, kind, path)

    def tensors(self, msg: pb.Value, kind: str, path: str) -> np.ndarray | Vector:
        if kind == "tensor_value":
            return _decode_array(msg.tensor_value, None, self.allow_nonfinite, path)
        if kind == "vector_value":
            return _decode_vector(msg.vector_value, None, self.allow_nonfinite, path)
        raise DecodeError(f"{path}: {kind} is only valid in a payload header")


def encode_state(state: State) -> pb.Value:
    """Encode a module state as a ``Value`` holding a ``MapValue``, arrays inline.

    Raises
    ------
    TypeError
        A leaf of an unsupported type or a non-str dict key; the message names its path, like
        ``state['mom']['x']``.
    ValueError
        An int beyond 64 bits, or containers nested deeper than :data:`MAX_DEPTH`.
    """
    return StateEncoder().encode(state)


def decode_state(msg: pb.Value, *, allow_nonfinite: bool = True) -> State:
    """Decode a ``Value`` made by :func:`encode_state` (arrays are read-only views)."""
    return StateDecoder(allow_nonfinite=allow_nonfinite).decode(msg)


def state_to_bytes(state: State) -> bytes:
    """Serialize a state to bytes (a ``fedpipe.v1.Value``); for states well below 2 GiB."""
    return bytes(encode_state(state).SerializeToString())


def state_from_bytes(
    data: bytes, *, max_bytes: int | None = None, allow_nonfinite: bool = True
) -> State:
    """Parse bytes made by :func:`state_to_bytes`.

    Any malformed input raises :class:`DecodeError` (never another exception type);
    more than ``max_bytes`` bytes raise :class:`PayloadTooLargeError` before parsing.
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise PayloadTooLargeError(f"state of {len(data)} bytes, expected at most {max_bytes}")
    try:
        msg = pb.Value.FromString(data)
    except _ProtobufDecodeError as exc:
        raise DecodeError(f"state: not a valid fedpipe.v1.Value message ({exc})") from None
    return decode_state(msg, allow_nonfinite=allow_nonfinite)
