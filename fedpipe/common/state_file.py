"""States on disk: written atomically, read back without trusting a byte of the file.

A state file is a ``magic`` line naming its kind, the length of a serialized ``PayloadHeader``
(8 bytes, little endian), that header, then every tensor's raw little-endian bytes in table
order: the encoding of the wire (:mod:`fedpipe.common.payload`), so a state of any size loads
without pickle and without one protobuf message holding it. The server's checkpoints and the
clients' module states use it.

A write goes to a temp file (``.<name>.tmp-<pid>``), is fsynced, renamed over the target and
the directory is fsynced: after a crash the file is the old one or the new one, never a mix.
A read bounds every size by what the file holds before it allocates anything.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from google.protobuf.message import DecodeError as ProtobufDecodeError

from fedpipe.common.codec import DecodeError, spec_from_wire
from fedpipe.common.payload import PayloadAssembler, encode_payload
from fedpipe.common.state import State
from fedpipe.proto.fedpipe.v1 import tensor_pb2

__all__ = [
    "StateFileError",
    "atomic_write",
    "read_state_file",
    "remove_stale_temp_files",
    "write_state_file",
]

log = logging.getLogger(__name__)

READ_BYTES = 64 << 20
LENGTH_BYTES = 8


class StateFileError(ValueError):
    """A state file is not one of the expected kind, or is damaged; the message names it."""


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(file)``: temp file, fsync, rename, directory fsync."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    # The rename lives in the directory: without this a power cut may forget it.
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temp_files(directory: Path, name: str) -> list[Path]:
    """Delete the temp files a killed writer of ``directory/name`` left behind."""
    removed = []
    for stale in sorted(directory.glob(f".{name}.tmp-*")):
        stale.unlink(missing_ok=True)
        removed.append(stale)
        log.info("removed %s, left by an interrupted write", stale)
    return removed


def write_state_file(path: Path, state: State, magic: bytes) -> None:
    """Write ``state`` (Vectors, arrays, plain data) to ``path`` atomically."""
    payload = encode_payload(state)
    header = payload.header.SerializeToString()

    def write(fh: BinaryIO) -> None:
        fh.write(magic)
        fh.write(len(header).to_bytes(LENGTH_BYTES, "little"))
        fh.write(header)
        for _, _, data in payload.chunks():  # tensor after tensor, in table order
            fh.write(data)

    atomic_write(path, write)


def read_state_file(path: Path, magic: bytes, kind: str) -> State:
    """Read a file written by :func:`write_state_file` with the same ``magic``.

    Raises
    ------
    StateFileError
        Not a ``kind`` file, truncated, trailing bytes, or an invalid header or value; the
        message names ``path``. Never ``MemoryError``: sizes are checked against the file's.
    OSError
        The file cannot be opened or read.
    """
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if fh.read(len(magic)) != magic:
            raise StateFileError(f"{path} is not a fedpipe {kind} (wrong magic bytes)")
        raw = fh.read(LENGTH_BYTES)
        left = size - len(magic) - LENGTH_BYTES
        header_size = int.from_bytes(raw, "little")
        if len(raw) != LENGTH_BYTES or header_size > left:
            raise StateFileError(
                f"{path} is damaged: its header is {header_size} bytes long, but the file "
                f"holds {max(left, 0)} bytes after the length field"
            )
        try:
            header = tensor_pb2.PayloadHeader.FromString(fh.read(header_size))
            data_size = left - header_size
            # Tensors are allocated from the header: never more than the file can fill.
            assembler = PayloadAssembler(header, max_bytes=data_size)
            if assembler.total_bytes != data_size:
                raise StateFileError(
                    f"{path} is damaged: its tensors hold {assembler.total_bytes} bytes, but "
                    f"{data_size} bytes follow the header"
                )
            for index, spec in enumerate(header.tensors):
                nbytes = spec_from_wire(spec, f"tensor {index}", data_size).nbytes
                _read_tensor(fh, assembler, index, nbytes, spec.name, path)
            return assembler.finish()
        except (DecodeError, ProtobufDecodeError) as exc:
            raise StateFileError(f"{path} is damaged: {exc}") from None


def _read_tensor(
    fh: BinaryIO, assembler: PayloadAssembler, index: int, nbytes: int, name: str, path: Path
) -> None:
    offset = 0
    while offset < nbytes:
        data = fh.read(min(READ_BYTES, nbytes - offset))
        if not data:
            raise StateFileError(f"{path} is truncated (tensor {name!r})")
        assembler.add_chunk(index, offset, data)
        offset += len(data)
