"""Checkpoints and final models on disk, written atomically (temp file, fsync, rename).

A checkpoint file is ``MAGIC``, the length of a serialized ``PayloadHeader`` (8 bytes, little
endian), that header, then every tensor's raw little-endian bytes in table order: the same
encoding as the wire, so a checkpoint of any size loads without pickle and without one
protobuf message holding the model.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError as ProtobufDecodeError

from fedpipe.common.codec import DecodeError, spec_from_wire
from fedpipe.common.payload import PayloadAssembler, encode_payload
from fedpipe.common.state import State
from fedpipe.common.vector import Vector
from fedpipe.proto.fedpipe.v1 import tensor_pb2

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint", "save_model"]

MAGIC = b"FEDPIPE-CKPT-1\n"
READ_BYTES = 64 << 20


class CheckpointError(ValueError):
    """A checkpoint file is not one, or is damaged."""


def _atomic_write(path: Path, write: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)  # type: ignore[operator]
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(path: Path, state: State) -> None:
    """Write ``state`` (Vectors, arrays, plain data) to ``path`` atomically."""
    payload = encode_payload(state)
    header = payload.header.SerializeToString()

    def write(fh: object) -> None:
        fh.write(MAGIC)  # type: ignore[attr-defined]
        fh.write(len(header).to_bytes(8, "little"))  # type: ignore[attr-defined]
        fh.write(header)  # type: ignore[attr-defined]
        for _, _, data in payload.chunks():  # tensor after tensor, in table order
            fh.write(data)  # type: ignore[attr-defined]

    _atomic_write(path, write)


def load_checkpoint(path: Path, max_bytes: int = 1 << 40) -> State:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises
    ------
    CheckpointError
        Wrong magic, truncated file, or an invalid header.
    """
    with open(path, "rb") as fh:
        if fh.read(len(MAGIC)) != MAGIC:
            raise CheckpointError(f"{path} is not a fedpipe checkpoint")
        size = int.from_bytes(fh.read(8), "little")
        header = tensor_pb2.PayloadHeader()
        try:
            header.ParseFromString(fh.read(size))
            assembler = PayloadAssembler(header, max_bytes=max_bytes)
            for index, spec in enumerate(header.tensors):
                remaining = spec_from_wire(spec, f"tensor {index}", max_bytes).nbytes
                offset = 0
                while remaining:
                    data = fh.read(min(READ_BYTES, remaining))
                    if not data:
                        raise CheckpointError(f"{path} is truncated (tensor {spec.name!r})")
                    assembler.add_chunk(index, offset, data)
                    offset += len(data)
                    remaining -= len(data)
            return assembler.finish()
        except (DecodeError, ProtobufDecodeError) as exc:
            raise CheckpointError(f"{path} is damaged: {exc}") from None


def save_model(path: Path, weights: Vector) -> None:
    """Write the weights as an ``.npz`` archive (one array per weight name), atomically."""
    _atomic_write(path, lambda fh: np.savez(fh, **weights.coefs))  # type: ignore[arg-type]
