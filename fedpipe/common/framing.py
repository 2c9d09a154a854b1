"""Frames of the federation stream: an envelope (``ServerMessage`` / ``ClientMessage``)
serialized once, followed by its payload's chunk frames.

Chunk frames are written by :func:`fedpipe.common.payload.chunk_frame`, byte-compatible with
an envelope whose only field is ``chunk = 15``; the receiver copies each chunk's bytes
straight into the array preallocated from the header. A transport carries the frames as raw
bytes; what the messages mean is :mod:`fedpipe.common.records`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
from google.protobuf.message import DecodeError as ProtobufDecodeError
from google.protobuf.message import Message

from fedpipe.common.codec import DecodeError
from fedpipe.common.payload import (
    CHUNK_FIELD,
    EncodedPayload,
    PayloadAssembler,
    chunk_frame,
    parse_chunk_frame,
)
from fedpipe.common.protocol import MAX_CONTROL_BYTES, ProtocolError
from fedpipe.common.spilled_vector import SpilledVector
from fedpipe.common.state import State

__all__ = [
    "FrameReceiver",
    "Received",
    "announced_bytes",
    "envelope_frames",
    "is_chunk_frame",
    "payload_frames",
]

M = TypeVar("M", bound=Message)


def envelope_frames(envelope: Message, payload: EncodedPayload | None) -> Iterator[bytes]:
    """The frames of one message: the envelope, then its payload's chunk frames."""
    yield envelope.SerializeToString()
    if payload is not None:
        yield from payload_frames(payload)


def payload_frames(payload: EncodedPayload) -> Iterator[bytes]:
    """The chunk frames of ``payload``, in order."""
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
