"""What both ends of the federation stream share: framing, limits, channel options, and the
conversion of tasks and replies to and from payload states.

Frames are raw bytes on the gRPC stream (the method uses identity serializers): an envelope
(``ServerMessage`` / ``ClientMessage``) serialized once, followed by chunk frames written by
:func:`fedpipe.common.payload.chunk_frame`, which are byte-compatible with an envelope whose
only field is ``chunk = 15``. The receiver copies each chunk's bytes straight into the array
preallocated from the header.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
from google.protobuf.message import DecodeError as ProtobufDecodeError
from google.protobuf.message import Message

from fedpipe.common.codec import DecodeError, decode_state, encode_state
from fedpipe.common.payload import (
    CHUNK_FIELD,
    EncodedPayload,
    PayloadAssembler,
    chunk_frame,
    parse_chunk_frame,
)
from fedpipe.common.spilled_vector import SpilledVector
from fedpipe.common.state import State, StateValue
from fedpipe.common.summable import Summable
from fedpipe.common.training import EvalResult, TrainResult
from fedpipe.common.vector import Vector

__all__ = [
    "CHUNK_FIELD",
    "PROTOCOL_VERSION",
    "SESSION_METHOD",
    "FrameReceiver",
    "ProtocolError",
    "Received",
    "announced_bytes",
    "channel_options",
    "envelope_frames",
    "eval_reply_parts",
    "eval_result_from",
    "is_chunk_frame",
    "settings_data",
    "settings_value",
    "summables_from",
    "task_state",
    "train_reply_parts",
    "train_result_from",
    "weights_from",
]

#: 2: secure aggregation's masks are AES-256-CTR keystreams (1: ChaCha20), so a client and
#: a server of different versions would disagree on every mask.
PROTOCOL_VERSION = 2
SESSION_METHOD = "/fedpipe.v1.Federation/Session"
#: Largest non-chunk message accepted (headers, settings): well below gRPC's limit.
MAX_CONTROL_BYTES = 64 << 20

M = TypeVar("M", bound=Message)


class ProtocolError(ValueError):
    """The peer sent something the protocol does not allow (the reason says what)."""


def channel_options(chunk_bytes: int) -> list[tuple[str, Any]]:
    """gRPC options for both ends: explicit message limits and keepalive."""
    limit = max(MAX_CONTROL_BYTES, 2 * chunk_bytes + (1 << 20))
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ]


def envelope_frames(envelope: Message, payload: EncodedPayload | None) -> Iterator[bytes]:
    """The frames of one message: the envelope, then its payload's chunk frames."""
    yield envelope.SerializeToString()
    if payload is not None:
        for tensor, offset, data in payload.chunks():
            yield chunk_frame(CHUNK_FIELD, tensor, offset, data)


@dataclass
class Received(Generic[M]):
    """One complete message from the peer, with its decoded payload (empty if none) and the
    Vectors of it received to disk (see ``FrameReceiver``'s ``spill``)."""

    message: M
    payload: State
    spilled: dict[str, SpilledVector] = field(default_factory=dict)


class FrameReceiver(Generic[M]):
    """Turns the peer's raw frames into complete messages and decoded payloads.

    Parameters
    ----------
    envelope_type:
        ``ClientMessage`` on the server, ``ServerMessage`` on the client.
    max_payload_bytes:
        Largest payload accepted; a header announcing more is rejected before allocation.
    max_tensors:
        Most tensors a payload may announce (decoding a header costs time per tensor).
    accept:
        Called with every message that announces a payload, before anything is allocated:
        True to receive the payload, False to skip its chunks (a reply nobody waits for any
        more); it may raise :class:`ProtocolError` to refuse the message.

    Attributes
    ----------
    into:
        Arrays that payloads' top-level Vectors are received straight into, by key (see
        :class:`~fedpipe.common.payload.PayloadAssembler`); may change between messages.
    """

    def __init__(
        self,
        envelope_type: type[M],
        max_payload_bytes: int,
        *,
        max_tensors: int = 1 << 16,
        accept: Callable[[M], bool] | None = None,
        spill: Callable[[M], str | None] | None = None,
        spill_dir: str | None = None,
    ) -> None:
        self.envelope_type = envelope_type
        self.max_payload_bytes = max_payload_bytes
        self.max_tensors = max_tensors
        self.accept = accept
        self.into: Mapping[str, Mapping[str, np.ndarray]] | None = None
        self.spill, self.spill_dir = spill, spill_dir
        self._pending: M | None = None
        self._assembler: PayloadAssembler | None = None
        self._skipping = 0  # bytes of an unwanted payload still to skip
        self.received_bytes = 0  # of the payload in progress, received or skipped

    @property
    def assembling(self) -> bool:
        """True while a payload is being received into allocated arrays."""
        return self._assembler is not None

    def decode(self, frame: bytes) -> M:
        """Decode a (non-chunk) envelope frame; pass the result to :meth:`feed` so that a
        receiver can look at it first (reserve memory for :func:`announced_bytes`)."""
        if len(frame) > MAX_CONTROL_BYTES:
            raise ProtocolError(f"control message of {len(frame)} bytes exceeds the limit")
        message = self.envelope_type()
        try:
            message.ParseFromString(frame)
        except ProtobufDecodeError as exc:
            raise ProtocolError(f"undecodable message: {exc}") from None
        return message

    @property
    def busy(self) -> bool:
        """True while a payload's chunks are still expected."""
        return self._assembler is not None or self._skipping > 0

    @property
    def pending(self) -> M | None:
        """The message whose payload is being received into allocated arrays, if any."""
        return self._pending if self._assembler is not None else None

    def skip(self, message: M) -> None:
        """Refuse ``message`` (decoded, not fed): skip its payload's chunks unallocated.

        Raises
        ------
        ProtocolError
            A payload is still in progress, or the refused one is larger than accepted.
        """
        if self.busy:
            self._reset()
            raise ProtocolError("a new message arrived before the previous payload was complete")
        self._skip_bytes(announced_bytes(message))

    def skip_rest(self) -> int:
        """Stop receiving the payload in progress (its arrays are dropped) and skip its
        remaining chunks; return how many bytes are left to skip."""
        if self._assembler is not None:
            remaining = self._assembler.total_bytes - self._assembler.received_bytes
            self._assembler.discard()
            self._pending, self._assembler = None, None
            self._skipping = remaining
        return self._skipping

    def _skip_bytes(self, nbytes: int) -> None:
        if nbytes > self.max_payload_bytes:
            raise ProtocolError(f"payload of {nbytes} bytes exceeds {self.max_payload_bytes}")
        self._skipping, self.received_bytes = nbytes, 0

    def feed(self, frame: bytes, decoded: M | None = None) -> Received[M] | None:
        """Take one frame; return a message once it and all its chunks have arrived.
        ``decoded`` is the frame already passed through :meth:`decode`, if it was.

        Raises
        ------
        ProtocolError
            The frame is malformed or out of place (a chunk with no announced payload, a
            new message before the previous payload finished, an oversized payload...).
        """
        chunk = parse_chunk_frame(frame, CHUNK_FIELD)
        if chunk is not None and self._skipping:
            if len(chunk[2]) > self._skipping:
                raise ProtocolError("a skipped payload sent more bytes than it announced")
            self._skipping -= len(chunk[2])
            self.received_bytes += len(chunk[2])
            return None
        if chunk is not None:
            if self._assembler is None or self._pending is None:
                raise ProtocolError("received a chunk frame with no payload announced")
            tensor, offset, data = chunk
            try:
                self._assembler.add_chunk(tensor, offset, data)
            except DecodeError as exc:
                self._reset()
                raise ProtocolError(f"bad chunk: {exc}") from None
            self.received_bytes += len(data)
            if self._assembler.complete:
                return self._complete()
            return None
        if self.busy:
            self._reset()
            raise ProtocolError("a new message arrived before the previous payload was complete")
        message = decoded if decoded is not None else self.decode(frame)
        header = _payload_header(message)
        if header is None:
            return Received(message, {})
        if self.accept is not None and not self.accept(message):
            self._skip_bytes(int(header.total_bytes))
            return None
        try:
            self._assembler = PayloadAssembler(
                header,
                max_bytes=self.max_payload_bytes,
                max_tensors=self.max_tensors,
                into=self.into,
                spill=self.spill(message) if self.spill is not None else None,
                spill_dir=self.spill_dir,
            )
        except DecodeError as exc:
            raise ProtocolError(f"bad payload header: {exc}") from None
        self._pending, self.received_bytes = message, 0
        if self._assembler.complete:
            return self._complete()
        return None

    def _complete(self) -> Received[M]:
        assert self._assembler is not None and self._pending is not None
        assembler = self._assembler
        try:
            state = assembler.finish()
        except DecodeError as exc:
            assembler.discard()
            raise ProtocolError(f"bad payload: {exc}") from None
        finally:
            message, self._pending, self._assembler = self._pending, None, None
        return Received(message, state, assembler.spilled)

    def abandon(self) -> None:
        """Drop the payload in progress, if any (the stream ended): its spilled files go."""
        self._reset()

    def _reset(self) -> None:
        if self._assembler is not None:
            self._assembler.discard()
        self._pending, self._assembler, self._skipping = None, None, 0


def announced_bytes(message: Message) -> int:
    """Bytes of payload a decoded envelope announces (0 for none)."""
    header = _payload_header(message)
    return 0 if header is None else int(header.total_bytes)


def is_chunk_frame(frame: bytes) -> bool:
    """Cheap test: does ``frame`` start like a chunk frame (field ``CHUNK_FIELD``, bytes)?"""
    return frame[:1] == _CHUNK_TAG


_CHUNK_TAG = bytes([CHUNK_FIELD << 3 | 2])


def _payload_header(message: Message) -> Any:
    kind = message.WhichOneof("kind")
    if kind is None:
        raise ProtocolError("message has no kind set")
    inner = getattr(message, kind)
    has_payload = "payload" in inner.DESCRIPTOR.fields_by_name and inner.HasField("payload")
    return inner.payload if has_payload else None


# ---- plain data and Summables in untrusted states -----------------------------------------


def settings_value(data: Mapping[str, Any]) -> Any:
    """Encode plain data (configs, counts) as a protobuf ``Value``."""
    return encode_state(dict(data))


def settings_data(value: Any) -> dict[str, Any]:
    """Decode a ``Value`` of plain data; tensors are not allowed there."""
    state = decode_state(value)
    if not isinstance(state, dict):
        raise ProtocolError(f"settings must be a map, got {type(state).__name__}")
    _check_plain(state, "settings")
    return state


def _check_plain(value: StateValue, path: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain(item, f"{path}[{i}]")
    elif not (value is None or isinstance(value, bool | int | float | str)):
        raise ProtocolError(f"{path} holds a {type(value).__name__}; only plain data is allowed")


def summable_state(summable: Summable) -> dict[str, StateValue]:
    return dict(summable.fields)


def summable_from(value: StateValue, path: str) -> Summable:
    """A :class:`Summable` from an untrusted state node (a map of Vectors and numbers)."""
    if not isinstance(value, dict):
        raise ProtocolError(f"{path} must be a map of Vectors and numbers")
    fields: dict[str, Vector | float | int] = {}
    for key, item in value.items():
        if isinstance(item, bool) or not isinstance(item, Vector | int | float):
            raise ProtocolError(f"{path}.{key} must be a Vector or a number")
        fields[key] = item
    return Summable(fields)


def summables_from(value: StateValue, path: str) -> dict[str, Summable]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{path} must be a map")
    return {key: summable_from(item, f"{path}.{key}") for key, item in value.items()}


def number(info: Mapping[str, Any], key: str, *, integer: bool = False) -> Any:
    value = info.get(key)
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < 0:
        raise ProtocolError(f"reply info {key!r} is {value!r}, expected a non-negative number")
    return value


# ---- results <-> reply payloads ------------------------------------------------------------


def train_reply_parts(result: TrainResult) -> tuple[dict[str, Any], State]:
    info = {
        "n_samples": result.n_samples,
        "n_steps": result.n_steps,
        "loss_sum": result.loss_sum,
        "n_samples_seen": result.n_samples_seen,
        "seconds": result.seconds,
    }
    if result.sample_epsilon is not None:
        info["sample_epsilon"] = result.sample_epsilon
    payload: State = {
        "partial": summable_state(result.partial),
        "aux_vars": {k: summable_state(v) for k, v in result.aux_vars.items()},
    }
    if result.masked is not None:  # secure aggregation: the update masked, partial empty
        payload["masked"] = result.masked.masked
    return info, payload


def train_result_from(info: Mapping[str, Any], payload: State) -> TrainResult:
    return TrainResult(
        partial=summable_from(payload.get("partial"), "partial"),
        aux_vars=summables_from(payload.get("aux_vars", {}), "aux_vars"),
        n_samples=number(info, "n_samples", integer=True),
        n_steps=number(info, "n_steps", integer=True),
        loss_sum=float(number(info, "loss_sum")),
        n_samples_seen=number(info, "n_samples_seen", integer=True),
        seconds=float(number(info, "seconds")),
        sample_epsilon=(
            float(number(info, "sample_epsilon")) if "sample_epsilon" in info else None
        ),
    )


def eval_reply_parts(result: EvalResult) -> tuple[dict[str, Any], State]:
    info = {"n_samples": result.n_samples, "seconds": result.seconds}
    return info, {"metrics": {k: summable_state(v) for k, v in result.metrics.items()}}


def eval_result_from(info: Mapping[str, Any], payload: State) -> EvalResult:
    return EvalResult(
        metrics=summables_from(payload.get("metrics", {}), "metrics"),
        n_samples=number(info, "n_samples", integer=True),
        seconds=float(number(info, "seconds")),
    )


def task_state(weights: Vector, aux_vars: Mapping[str, Summable]) -> State:
    return {"weights": weights, "aux_vars": {k: summable_state(v) for k, v in aux_vars.items()}}


def weights_from(payload: State) -> Vector:
    weights = payload.get("weights")
    if not isinstance(weights, Vector):
        raise ProtocolError("task payload has no 'weights' Vector")
    return weights
