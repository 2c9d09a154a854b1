"""Streaming of model-sized states: a header message, then tensor chunks.

No protobuf message ever holds a whole model, so payloads are bounded by memory, not by the
2 GiB limit of protobuf messages.

Sender::

    payload = encode_payload(state)           # once per round, shared by every receiver
    send(envelope(payload=payload.header))
    for tensor, offset, data in payload.chunks():
        send_raw(chunk_frame(15, tensor, offset, data))

Receiver::

    assembler = PayloadAssembler(header, max_bytes=limit, expected=weight_specs)
    for frame in frames:                      # raw bytes of each envelope
        chunk = parse_chunk_frame(frame, 15)  # fast path, no protobuf parsing
        if chunk is None:                     # not a bare chunk: parse the envelope normally
            ...
        assembler.add_chunk(*chunk)
    state = assembler.finish()

The header's ``structure`` is the state encoded as by :mod:`fedpipe.common.codec`, except that
arrays are ``TensorRef`` leaves and Vectors ``VectorRef`` leaves pointing into the header's
tensor table; each tensor's bytes arrive in ``Chunk`` messages. Envelopes of ``fedpipe.v1``
streams carry their ``Chunk`` at field 15, which :func:`chunk_frame` and
:func:`parse_chunk_frame` write and read by hand (bytes identical to protobuf's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from fedpipe.common.codec import (
    DecodeError,
    NonFiniteError,
    PayloadTooLargeError,
    SpecError,
    StateDecoder,
    StateEncoder,
    TruncatedError,
    check_array_values,
    little_endian,
    spec_from_wire,
    wire_dtype,
)
from fedpipe.common.half import is_float_dtype, numpy_dtype
from fedpipe.common.host_staging import HostStaging
from fedpipe.common.spilled_vector import SpilledVector
from fedpipe.common.state import State
from fedpipe.common.vector import ArraySpec, Vector, describe_spec_mismatch
from fedpipe.proto.fedpipe.v1 import tensor_pb2 as pb

__all__ = [
    "CHUNK_FIELD",
    "DeferredVector",
    "EncodedPayload",
    "PayloadAssembler",
    "chunk_frame",
    "encode_payload",
    "parse_chunk_frame",
]

CHUNK_FIELD = 15
"""Field number of the ``Chunk`` in every ``fedpipe.v1`` stream envelope."""

MAX_TENSORS = 1 << 20
"""Most tensors a payload header may announce."""


# ---- sending ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeferredVector:
    """A Vector of a state whose values are made chunk by chunk while the payload streams,
    never whole: ``values(name, start, stop)`` gives the flat elements ``[start, stop)`` of
    array ``name`` (a new array of ``specs[name]``'s dtype). Encoded as a Vector would be."""

    specs: Mapping[str, ArraySpec]
    values: Callable[[str, int, int], np.ndarray]


@dataclass(frozen=True)
class _Deferred:
    """One array of a :class:`DeferredVector` in a payload's tensor table."""

    vector: DeferredVector
    name: str

    @property
    def nbytes(self) -> int:
        return self.vector.specs[self.name].nbytes

    def chunk(self, offset: int, size: int) -> memoryview:
        """Bytes ``[offset, offset + size)`` of the array, little-endian."""
        itemsize = numpy_dtype(self.vector.specs[self.name].dtype).itemsize
        first = offset // itemsize
        stop = -(-(offset + size) // itemsize)
        values = self.vector.values(self.name, first, stop)
        data = little_endian(values, values.dtype.newbyteorder("<")).view(np.uint8)
        skip = offset - first * itemsize
        return memoryview(data)[skip : skip + size]  # type: ignore[arg-type]


@dataclass(frozen=True)
class EncodedPayload:
    """A state ready to stream: its header and the little-endian arrays its chunks slice.

    The arrays share memory with the encoded state's arrays whenever these already are
    little-endian and C-contiguous: do not modify them while the payload is being sent.
    A :class:`DeferredVector`'s arrays are made as their chunks are taken.
    """

    header: pb.PayloadHeader
    arrays: tuple[np.ndarray | _Deferred, ...]
    chunk_size: int

    @property
    def total_bytes(self) -> int:
        return int(self.header.total_bytes)

    def chunks(self) -> Iterator[tuple[int, int, memoryview]]:
        """Yield ``(tensor_index, byte_offset, data)`` for every chunk, tensor after tensor.

        ``data`` is a zero-copy slice of at most ``chunk_size`` bytes; zero-size tensors have no
        chunk. Each call starts over, so one payload can be streamed to many receivers.
        """
        size = self.chunk_size
        for index, array in enumerate(self.arrays):
            if isinstance(array, _Deferred):
                total = array.nbytes
                for offset in range(0, total, size):
                    yield index, offset, array.chunk(offset, min(size, total - offset))
                continue
            flat = memoryview(array.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
            for offset in range(0, len(flat), size):
                yield index, offset, flat[offset : offset + size]


class _PayloadEncoder(StateEncoder):
    def __init__(self, staging: HostStaging | None) -> None:
        self.specs: list[pb.TensorSpec] = []
        self.arrays: list[np.ndarray | _Deferred] = []
        self.staging = staging

    def fill(self, out: pb.Value, value: object, path: str, depth: int) -> None:
        if not isinstance(value, DeferredVector):
            super().fill(out, value, path, depth)  # type: ignore[arg-type]
            return
        out.vector_ref.SetInParent()
        for name, spec in value.specs.items():
            code, _ = wire_dtype(numpy_dtype(spec.dtype), f"{path}[{name!r}]")
            self.specs.append(pb.TensorSpec(name=name, dtype=code, shape=spec.shape))
            self.arrays.append(_Deferred(value, name))
            out.vector_ref.indices.append(len(self.arrays) - 1)

    def _add(self, name: str, array: np.ndarray, what: str) -> int:
        if not isinstance(array, np.ndarray):
            raise TypeError(f"{what}: expected a numpy array, got {type(array).__name__}")
        code, dtype = wire_dtype(array.dtype, what)
        data = little_endian(array, dtype)
        self.specs.append(pb.TensorSpec(name=name, dtype=code, shape=data.shape))
        self.arrays.append(data)
        return len(self.arrays) - 1

    def array(self, out: pb.Value, array: np.ndarray, path: str) -> None:
        out.tensor_ref.index = self._add(path, array, path)

    def vector(self, out: pb.Value, vector: Vector, path: str) -> None:
        out.vector_ref.SetInParent()
        host = vector.to_numpy() if self.staging is None else self.staging.to_host(vector)
        for name, array in host.coefs.items():
            out.vector_ref.indices.append(self._add(name, array, f"{path}[{name!r}]"))


def encode_payload(
    state: State, chunk_size: int = 4 << 20, *, staging: HostStaging | None = None
) -> EncodedPayload:
    """Split a state into a header and the arrays to stream in chunks of ``chunk_size`` bytes.

    Every numpy array and every Vector array of ``state`` goes into the tensor table, without a
    copy when it already is little-endian and C-contiguous (otherwise one converted copy); so
    do CPU tensors (whose memory numpy shares). Tensors on a device are copied once to the host:
    into ``staging``'s reused (pinned) buffer when given, whose memory the chunks then slice,
    and which this call takes over (:meth:`HostStaging.begin`): send the previous payload
    encoded with it first.

    Raises
    ------
    TypeError, ValueError
        As :func:`fedpipe.common.codec.encode_state`, or a ``chunk_size`` below 1.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size is {chunk_size}, expected at least 1 byte")
    if staging is not None:
        staging.begin()
    encoder = _PayloadEncoder(staging)
    header = pb.PayloadHeader()
    encoder.encode(state, header.structure)
    header.tensors.extend(encoder.specs)
    header.total_bytes = sum(a.nbytes for a in encoder.arrays)
    return EncodedPayload(header, tuple(encoder.arrays), chunk_size)


# ---- receiving --------------------------------------------------------------------------------


class _PayloadDecoder(StateDecoder):
    """Builds the state from the header's structure, allocating each referenced tensor once.

    Vectors are checked against ``expected`` before their arrays are allocated; the Vectors
    directly under the map ``state[spill]`` go to disk instead (:class:`SpilledVector`).
    """

    def __init__(
        self,
        names: list[str],
        specs: list[ArraySpec],
        expected: Mapping[str, ArraySpec] | None,
        spill: str | None = None,
        into: Mapping[str, Mapping[str, np.ndarray]] | None = None,
        spill_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.spill_dir = spill_dir
        self.names, self.specs, self.expected = names, specs, expected
        self.into = {f"state[{key!r}]": arrays for key, arrays in (into or {}).items()}
        self.arrays: list[np.ndarray | None] = [None] * len(specs)
        self.labels = [f"tensor {i} ({n!r})" for i, n in enumerate(names)]
        self.spill = spill
        #: Spilled Vectors by their key in the ``spill`` map; tensor index -> (Vector, name).
        self.spilled: dict[str, SpilledVector] = {}
        self.spilled_tensors: dict[int, tuple[SpilledVector, str]] = {}

    def _check_ref(self, index: int, path: str) -> None:
        if index >= len(self.specs):
            raise DecodeError(
                f"{path}: tensor reference {index}, expected an index below {len(self.specs)}"
            )
        if self.arrays[index] is not None or index in self.spilled_tensors:
            raise DecodeError(f"{path}: tensor {index} is referenced twice, expected once")

    def _allocate(self, index: int, label: str, into: np.ndarray | None = None) -> np.ndarray:
        spec = self.specs[index]
        array = into if into is not None else np.empty(spec.shape, dtype=self._dtype(index))
        self.arrays[index] = array
        self.labels[index] = label
        return array

    def tensors(self, msg: pb.Value, kind: str, path: str) -> np.ndarray | Vector:
        if kind == "tensor_ref":
            self._check_ref(msg.tensor_ref.index, path)
            return self._allocate(msg.tensor_ref.index, path)
        if kind != "vector_ref":
            raise DecodeError(f"{path}: {kind} in a payload header, expected tensor references")
        indices: dict[str, int] = {}
        for index in msg.vector_ref.indices:
            self._check_ref(index, path)
            name = self.names[index]
            if name in indices:
                raise SpecError(f"vector at {path}: array name {name!r} appears twice")
            indices[name] = index
        if self.expected is not None:
            specs = {name: self.specs[index] for name, index in indices.items()}
            problem = describe_spec_mismatch(specs, self.expected)
            if problem:
                raise SpecError(f"vector at {path}: {problem}")
        key = _spill_key(self.spill, path)
        if key is not None:
            return self._spilled(key, indices)
        into = self._landing(indices, self.into.get(path))
        labels = {n: f"tensor {n!r} at {path}" for n in indices}
        return Vector({n: self._allocate(i, labels[n], into.get(n)) for n, i in indices.items()})

    def _dtype(self, index: int) -> np.dtype:
        return numpy_dtype(self.specs[index].dtype).newbyteorder("<")

    def _landing(
        self, indices: Mapping[str, int], arrays: Mapping[str, np.ndarray] | None
    ) -> Mapping[str, np.ndarray]:
        """``arrays`` if the Vector can be received straight into them (the same names, shapes
        and little-endian dtypes, C-contiguous and writable), else nothing: then it gets
        arrays of its own, and whoever reads it finds its specs as sent."""
        if arrays is None or set(arrays) != set(indices):
            return {}
        for name, index in indices.items():
            array = arrays[name]
            fits = array.shape == self.specs[index].shape and array.dtype == self._dtype(index)
            if not (fits and array.flags.c_contiguous and array.flags.writeable):
                return {}
        return arrays

    def _spilled(self, key: str, indices: dict[str, int]) -> Vector:
        specs = {name: self.specs[index] for name, index in indices.items()}
        spilled = SpilledVector(specs, self.spill_dir)
        self.spilled[key] = spilled
        for name, index in indices.items():
            self.spilled_tensors[index] = (spilled, name)
            self.labels[index] = f"tensor {name!r} of {key!r}"
        return _SPILLED  # taken out of the state by PayloadAssembler


#: Where a spilled Vector sat in the decoded state (removed before the state is returned).
_SPILLED = Vector({})


def _spill_key(spill: str | None, path: str) -> str | None:
    """The key of ``path`` in the map ``state[spill]``, if that is where it is."""
    prefix = f"state[{spill!r}]["
    if spill is None or not path.startswith(prefix) or not path.endswith("]"):
        return None
    key = path[len(prefix) : -1]
    return key[1:-1] if repr(key[1:-1]) == key else None


class PayloadAssembler:
    """Receives a streamed payload into arrays preallocated from its header.

    Parameters
    ----------
    header:
        The ``PayloadHeader`` received first. It is validated entirely (dtypes known, shapes
        sane, sizes consistent, total within ``max_bytes``, every tensor referenced exactly once,
        Vectors as expected) before any array is allocated.
    max_bytes:
        Largest total tensor size accepted.
    expected:
        Specs that **every Vector** of the payload must have exactly (the model's weight specs);
        plain array leaves are bounded by ``max_bytes`` only. ``None`` checks nothing.
    allow_nonfinite:
        If false, :meth:`add_chunk` rejects float data holding NaN or infinity.
    spill:
        Key of a map at the top of the state (``"partial"``) whose Vectors are received to
        disk (:class:`~fedpipe.common.spilled_vector.SpilledVector`, which
        records NaN and infinity instead of raising) rather than into memory; they are left
        out of the returned state and found in :attr:`spilled`.
    spill_dir:
        Where those files are made (``None``, or a folder that is not there: the system's
        temporary folder); the run directory, on disk, rather than a RAM-backed ``/tmp``.
    into:
        Arrays to receive Vectors straight into, by the Vector's key at the top of the state
        (``{"weights": model_arrays}``): a client's model takes the global weights with no
        model-sized copy in between. A Vector whose specs these arrays do not have exactly
        (or that are not C-contiguous and writable) gets arrays of its own, as without.
        What arrived before a rejected chunk stays written in them.

    Raises
    ------
    DecodeError
        An invalid header: :class:`~fedpipe.common.codec.SpecError` for an unknown dtype or
        unexpected specs, :class:`~fedpipe.common.codec.PayloadTooLargeError` beyond
        ``max_bytes``.

    Notes
    -----
    The chunks of one tensor must arrive in order (each at the offset where the previous one
    ended), which is how :meth:`EncodedPayload.chunks` sends them; chunks of different tensors
    may interleave. Each received byte is copied once, straight into its array. The arrays of
    the returned state are writable and owned by it (except those given as ``into``).
    """

    def __init__(
        self,
        header: pb.PayloadHeader,
        *,
        max_bytes: int,
        expected: Mapping[str, ArraySpec] | None = None,
        allow_nonfinite: bool = True,
        max_tensors: int = MAX_TENSORS,
        spill: str | None = None,
        into: Mapping[str, Mapping[str, np.ndarray]] | None = None,
        spill_dir: str | None = None,
    ) -> None:
        self.allow_nonfinite = allow_nonfinite
        if len(header.tensors) > max_tensors:
            raise PayloadTooLargeError(
                f"payload header announces {len(header.tensors)} tensors, expected at most "
                f"{max_tensors}"
            )
        specs: list[ArraySpec] = []
        total = 0
        for index, spec in enumerate(header.tensors):
            parsed = spec_from_wire(spec, f"tensor {index} ({spec.name!r})", max_bytes)
            total += parsed.nbytes
            if total > max_bytes:
                raise PayloadTooLargeError(
                    f"payload tensors 0 to {index} already hold {total} bytes, expected at "
                    f"most {max_bytes} in all"
                )
            specs.append(parsed)
        if total != header.total_bytes:
            raise DecodeError(
                f"payload header announces total_bytes={header.total_bytes}, but its tensors "
                f"hold {total} bytes"
            )
        if not header.HasField("structure"):
            raise DecodeError("payload header has no structure")

        names = [spec.name for spec in header.tensors]
        decoder = _PayloadDecoder(names, specs, expected, spill, into, spill_dir)
        try:
            self._state = decoder.decode(header.structure)
            _check_all_referenced(decoder)
        except BaseException:
            for spilled in decoder.spilled.values():
                spilled.close()
            raise
        #: The Vectors received to disk, by their key in the ``spill`` map.
        self.spilled = decoder.spilled
        self._spilled_tensors = decoder.spilled_tensors
        if self.spilled:
            _take_spilled(self._state, spill)
        #: The in-memory arrays, by tensor index (the staged ones are on disk).
        self._arrays = {i: a for i, a in enumerate(decoder.arrays) if a is not None}
        self._flat = [None if a is None else a.reshape(-1).view(np.uint8) for a in decoder.arrays]
        self._sizes = [spec.nbytes for spec in specs]
        self._received = [0] * len(specs)
        self._remaining = total
        self._labels = decoder.labels
        # Float tensors are checked for NaN/inf chunk by chunk, while the bytes are in cache.
        self._floats = [
            None if a is None or allow_nonfinite or not is_float_dtype(a.dtype) else a.reshape(-1)
            for a in decoder.arrays
        ]
        self._checked = [0] * len(specs)
        self._finished = False

    @property
    def total_bytes(self) -> int:
        return sum(self._sizes)

    @property
    def received_bytes(self) -> int:
        return sum(self._received)

    @property
    def complete(self) -> bool:
        """True once every byte of every tensor has arrived (:meth:`finish` may still reject
        the values)."""
        return self._remaining == 0

    def add_chunk(self, tensor: int, offset: int, data: bytes | memoryview) -> None:
        """Copy one chunk's bytes into its tensor.

        Raises
        ------
        DecodeError
            Unknown tensor index, an offset other than where the tensor's previous chunk ended,
            data past the tensor's end, or a chunk after :meth:`finish`.
        NonFiniteError
            NaN or infinity in a float tensor while ``allow_nonfinite`` is false (checked as
            the chunks arrive, so a bad update is rejected before it is fully received).
        """
        if self._finished:
            raise DecodeError(f"chunk for tensor {tensor} after the payload was finished")
        if not 0 <= tensor < len(self._sizes):
            raise DecodeError(
                f"chunk for tensor {tensor}, expected an index below {len(self._sizes)}"
            )
        start = self._received[tensor]
        if offset != start:
            raise DecodeError(
                f"chunk for {self._labels[tensor]} at byte offset {offset}, expected offset "
                f"{start} (each tensor's chunks arrive in order, each byte once)"
            )
        chunk = np.frombuffer(data, dtype=np.uint8)
        end = start + chunk.size
        if end > self._sizes[tensor]:
            raise DecodeError(
                f"chunk for {self._labels[tensor]} ends at byte {end}, expected at most "
                f"{self._sizes[tensor]} bytes"
            )
        flat = self._flat[tensor]
        if flat is None:  # spilled: to disk, checked finite on the way
            spilled, name = self._spilled_tensors[tensor]
            spilled.write(name, start, data)
        else:
            flat[start:end] = chunk
        self._received[tensor] = end
        self._remaining -= chunk.size
        elements = self._floats[tensor]
        if elements is not None:
            self._check_finite(tensor, elements, end // elements.itemsize)

    def _check_finite(self, tensor: int, elements: np.ndarray, upto: int) -> None:
        start = self._checked[tensor]
        if upto > start:
            finite = np.isfinite(elements[start:upto])
            if not finite.all():
                first = start + int(np.argmin(finite))
                raise NonFiniteError(
                    f"{self._labels[tensor]}: element {first} is {elements[first]}, expected "
                    "finite values"
                )
            self._checked[tensor] = upto

    def finish(self) -> State:
        """Check every byte arrived (and values are valid) and return the state.

        Raises
        ------
        TruncatedError
            A tensor did not receive all its bytes.
        DecodeError
            Boolean data other than 0/1 bytes.
        """
        for index, size in enumerate(self._sizes):
            if self._received[index] != size:
                raise TruncatedError(
                    f"{self._labels[index]}: received {self._received[index]} of {size} bytes"
                )
        for index, array in self._arrays.items():
            check_array_values(array, self._labels[index], allow_nonfinite=True)
        self._finished = True
        return self._state

    def discard(self) -> None:
        """Drop what was received (the spilled Vectors' files); for a payload never finished."""
        for spilled in self.spilled.values():
            spilled.close()


def _check_all_referenced(decoder: _PayloadDecoder) -> None:
    unused = [
        i
        for i, array in enumerate(decoder.arrays)
        if array is None and i not in decoder.spilled_tensors
    ]
    if unused:
        raise DecodeError(
            f"payload header: tensors {unused[:10]} are not referenced by the structure, "
            "expected every tensor to be referenced once"
        )


def _take_spilled(state: State, spill: str | None) -> None:
    """Remove the spilled Vectors' places from the map ``state[spill]``."""
    node = state.get(spill) if spill is not None else None
    assert isinstance(node, dict)
    for key in [k for k, v in node.items() if v is _SPILLED]:
        del node[key]


# ---- raw chunk frames -------------------------------------------------------------------------

_MAX_FIELD = (1 << 29) - 1


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def chunk_frame(field_number: int, tensor: int, offset: int, data: memoryview | bytes) -> bytes:
    """Serialize an envelope message whose only field is ``Chunk`` at ``field_number``.

    Byte-for-byte what protobuf's ``SerializeToString`` gives for that message, built with one
    copy of ``data`` and no protobuf object, so chunks go to the wire at memcpy speed.
    """
    if not 1 <= field_number <= _MAX_FIELD or 19000 <= field_number <= 19999:
        raise ValueError(f"field_number is {field_number}, expected a valid protobuf field")
    if not 0 <= tensor < 1 << 32:
        raise ValueError(f"tensor is {tensor}, expected a uint32")
    if not 0 <= offset < 1 << 64:
        raise ValueError(f"offset is {offset}, expected a uint64")
    view = data if isinstance(data, memoryview) else memoryview(data)
    if view.ndim != 1 or view.format not in ("B", "b", "c"):
        view = view.cast("B")
    size = view.nbytes
    inner = bytearray()
    if tensor:
        inner += b"\x08" + _varint(tensor)
    if offset:
        inner += b"\x10" + _varint(offset)
    if size:
        inner += b"\x1a" + _varint(size)
    prefix = _varint(field_number << 3 | 2) + _varint(len(inner) + size) + inner
    return b"".join((prefix, view))


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """Decode a varint at ``pos``; return ``(value, next_pos)``, or ``(-1, pos)`` if invalid."""
    value = shift = 0
    while pos < end and shift < 64:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (value, pos) if value < 1 << 64 else (-1, pos)
        shift += 7
    return -1, pos


def parse_chunk_frame(frame: bytes, field_number: int) -> tuple[int, int, memoryview] | None:
    """Read ``(tensor, offset, data)`` from a frame made of exactly one ``Chunk`` field.

    ``data`` is a zero-copy view into ``frame``. Returns None when the frame is anything else
    (another field, several fields, unknown chunk fields, malformed bytes): the caller then
    parses it with protobuf, which also reports malformed input.
    """
    end = len(frame)
    tag, pos = _read_varint(frame, 0, end)
    if tag != (field_number << 3 | 2):
        return None
    length, pos = _read_varint(frame, pos, end)
    if length != end - pos:
        return None
    tensor = offset = -1
    data_start = data_end = -1
    while pos < end:
        key, pos = _read_varint(frame, pos, end)
        if key == 0x08 and tensor < 0:
            tensor, pos = _read_varint(frame, pos, end)
            if tensor < 0 or tensor >= 1 << 32:
                return None
        elif key == 0x10 and offset < 0:
            offset, pos = _read_varint(frame, pos, end)
            if offset < 0:
                return None
        elif key == 0x1A and data_start < 0:
            size, pos = _read_varint(frame, pos, end)
            if size < 0 or size > end - pos:
                return None
            data_start, data_end = pos, pos + size
            pos = data_end
        else:
            return None
    view = memoryview(frame)[data_start:data_end] if data_start >= 0 else memoryview(b"")
    return max(tensor, 0), max(offset, 0), view
