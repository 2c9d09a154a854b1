"""States on disk: written atomically, read back without trusting a byte of the file.

A state file is a ``magic`` line naming its kind and format version, the length of a
serialized ``PayloadHeader`` (8 bytes, little endian), that header, every tensor's raw
little-endian bytes in table order, then the CRC-32 of everything between the magic and it
(4 bytes, little endian): the encoding of the wire (:mod:`fedpipe.common.payload`), so a state
of any size loads without pickle and without one protobuf message holding it, and a flipped
bit anywhere fails the read instead of loading silently. The server's checkpoints and the
clients' module states use it.

A write goes to a temp file (``.<name>.tmp-<pid>``), is fsynced, renamed over the target and
the directory is fsynced: after a crash the file is the old one or the new one, never a mix.
A read bounds every size by what the file holds before it allocates anything.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Callable, Iterator
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
CHECKSUM_BYTES = 4


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
        crc = 0
        # The checksum follows the bytes as they go out: no model-sized copy to hash.
        for part in _body(header, payload.chunks()):
            fh.write(part)
            crc = zlib.crc32(part, crc)
        fh.write(crc.to_bytes(CHECKSUM_BYTES, "little"))

    atomic_write(path, write)


def _body(
    header: bytes, chunks: Iterator[tuple[int, int, memoryview]]
) -> Iterator[bytes | memoryview]:
    yield len(header).to_bytes(LENGTH_BYTES, "little")
    yield header
    for _, _, data in chunks:  # tensor after tensor, in table order
        yield data  # a view of the array: written and hashed without a copy


def read_state_file(path: Path, magic: bytes, kind: str) -> State:
    """Read a file written by :func:`write_state_file` with the same ``magic``.

    Raises
    ------
    StateFileError
        Not a ``kind`` file (or one of another format version), truncated, trailing bytes, a
        checksum that does not match, or an invalid header or value; the message names
        ``path``. Never ``MemoryError``: sizes are checked against the file's.
    OSError
        The file cannot be opened or read.
    """
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        _check_magic(fh.read(len(magic)), magic, kind, path)
        raw = fh.read(LENGTH_BYTES)
        left = size - len(magic) - LENGTH_BYTES - CHECKSUM_BYTES
        header_size = int.from_bytes(raw, "little")
        if len(raw) != LENGTH_BYTES or header_size > left:
            raise StateFileError(
                f"{path} is damaged: its header is {header_size} bytes long, but the file "
                f"holds {max(left + CHECKSUM_BYTES, 0)} bytes after the length field (its "
                f"{CHECKSUM_BYTES}-byte checksum included)"
            )
        crc = zlib.crc32(raw)
        try:
            header_bytes = fh.read(header_size)
            crc = zlib.crc32(header_bytes, crc)
            header = tensor_pb2.PayloadHeader.FromString(header_bytes)
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
                crc = _read_tensor(fh, assembler, index, nbytes, spec.name, path, crc)
            stored = int.from_bytes(fh.read(CHECKSUM_BYTES), "little")
            if stored != crc:
                raise StateFileError(
                    f"{path} is damaged: its checksum is {stored:08x}, but its contents hash "
                    f"to {crc:08x} (a changed or corrupted byte)"
                )
            return assembler.finish()
        except (DecodeError, ProtobufDecodeError) as exc:
            raise StateFileError(f"{path} is damaged: {exc}") from None


def _check_magic(found: bytes, magic: bytes, kind: str, path: Path) -> None:
    """Refuse a file of another kind, and say so plainly for one of another format version."""
    if found == magic:
        return
    # A magic is ``FEDPIPE-<KIND>-<version>\n``: the same kind in another version is told apart.
    stem, _, version = magic.rstrip(b"\n").rpartition(b"-")
    other = found.rstrip(b"\n").rpartition(b"-")
    if other[0] == stem and other[2].isdigit() and version.isdigit():
        older = int(other[2]) < int(version)
        raise StateFileError(
            f"{path} is a {kind} written by {'an older' if older else 'a newer'} fedpipe "
            f"(format {int(other[2])}; this version reads format {int(version)} only)"
        )
    raise StateFileError(f"{path} is not a fedpipe {kind} (wrong magic bytes)")


def _read_tensor(
    fh: BinaryIO,
    assembler: PayloadAssembler,
    index: int,
    nbytes: int,
    name: str,
    path: Path,
    crc: int,
) -> int:
    """Read one tensor into ``assembler``; ``crc`` carried on over its bytes."""
    offset = 0
    while offset < nbytes:
        data = fh.read(min(READ_BYTES, nbytes - offset))
        if not data:
            raise StateFileError(f"{path} is truncated (tensor {name!r})")
        crc = zlib.crc32(data, crc)
        assembler.add_chunk(index, offset, data)
        offset += len(data)
    return crc
