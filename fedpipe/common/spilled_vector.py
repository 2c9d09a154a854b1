"""A Vector received to disk: the arrays of a streamed reply, written chunk by chunk to an
unlinked temporary file as they arrive and read back chunk by chunk when they are folded.

A server that folds replies into one running sum cannot fold a chunk the moment it arrives
and still survive a reply that breaks off halfway: a float sum does not give back the terms
added to it (``(s + x) - x != s``), so the half already folded could not be taken out again.
Each reply in flight therefore lands here, where it costs disk (page cache), not process
memory; the server folds it once it is complete and accepted, and a reply that breaks off is
simply closed (its file had no name, so nothing is left behind).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping

import numpy as np

from fedpipe.common.half import is_float_dtype, numpy_dtype
from fedpipe.common.vector import ArraySpec

__all__ = ["SpilledVector"]

#: Bytes read back at a time (a few MiB: in cache while the caller folds them).
READ_BYTES = 4 << 20


class SpilledVector:
    """The arrays of one Vector with ``specs``, on disk.

    Arrays are written by :meth:`write` (each array's bytes in order, as a payload's chunks
    arrive) and checked for NaN and infinity in the same pass: the first non-finite element
    is recorded in :attr:`nonfinite` and nothing more is written.

    Parameters
    ----------
    specs:
        Names, shapes and dtypes of the arrays (little-endian on disk, as on the wire).
    directory:
        Where the temporary file is made (``None``, or a folder that is not there: the
        system's temporary folder).
    """

    def __init__(self, specs: Mapping[str, ArraySpec], directory: str | None = None) -> None:
        self.specs = dict(specs)
        self._dtypes = {n: numpy_dtype(s.dtype).newbyteorder("<") for n, s in specs.items()}
        self._start: dict[str, int] = {}
        offset = 0
        for name, spec in self.specs.items():
            self._start[name] = offset
            offset += spec.nbytes
        self.nbytes = offset
        there = directory is not None and os.path.isdir(directory)
        self._file = tempfile.TemporaryFile(dir=directory if there else None)
        self._checked = dict.fromkeys(self.specs, 0)  # bytes of each array checked finite
        self._tail: dict[str, bytes] = {}  # an element cut in two by a chunk boundary
        #: Why the values are rejected (the first NaN or infinity), or None.
        self.nonfinite: str | None = None

    def write(self, name: str, offset: int, data: bytes | memoryview) -> None:
        """Write ``data`` at byte ``offset`` of array ``name`` (where its last write ended)."""
        if self.nonfinite is not None or self._file.closed:
            return
        if self._checked[name] + len(self._tail.get(name, b"")) != offset:
            raise ValueError(f"array {name!r}: write at byte {offset}, expected the next byte")
        dtype = self._dtypes[name]
        if is_float_dtype(dtype):
            self._check_finite(name, dtype, data)
        else:
            self._checked[name] = offset + len(data)
        if self.nonfinite is None:
            _write_all(self._file.fileno(), data, self._start[name] + offset)

    def _check_finite(self, name: str, dtype: np.dtype, data: bytes | memoryview) -> None:
        tail = self._tail.pop(name, b"")
        buffer = tail + bytes(data) if tail else data
        whole = len(buffer) // dtype.itemsize * dtype.itemsize
        if whole < len(buffer):
            self._tail[name] = bytes(buffer[whole:])
        values = np.frombuffer(buffer, dtype=dtype, count=whole // dtype.itemsize)
        finite = np.isfinite(values)
        if not finite.all():
            first = int(np.argmin(finite))
            element = self._checked[name] // dtype.itemsize + first
            self.nonfinite = f"array {name!r}: element {element} is {values[first]}"
            self.close()
            return
        self._checked[name] += whole

    def chunks(self) -> Iterator[tuple[str, int, np.ndarray]]:
        """``(name, first element, values)`` over every array, a few MiB at a time. The
        values are read into one reused buffer: use them before taking the next."""
        buffer = bytearray(READ_BYTES)
        for name, spec in self.specs.items():
            dtype = self._dtypes[name]
            step = max(1, READ_BYTES // dtype.itemsize) * dtype.itemsize
            for start in range(0, spec.nbytes, step):
                nbytes = min(step, spec.nbytes - start)
                view = memoryview(buffer)[:nbytes]
                read = os.preadv(self._file.fileno(), [view], self._start[name] + start)
                if read != nbytes:
                    raise OSError(f"array {name!r}: read {read} of {nbytes} bytes back")
                yield name, start // dtype.itemsize, np.frombuffer(view, dtype=dtype)

    def norm(self) -> float:
        """Global L2 norm over all arrays (float64 sums of squares; one pass over the file)."""
        total = 0.0
        for _, _, values in self.chunks():
            wide = values.astype(np.float64)
            total += float(np.dot(wide, wide))
        return float(np.sqrt(total))

    def finite_times(self, factor: float) -> bool:
        """Whether every value stays finite once multiplied by ``factor`` (a pass over the
        file: for a factor above 1, before anything is folded)."""
        return all(bool(np.isfinite(values * factor).all()) for _, _, values in self.chunks())

    def close(self) -> None:
        """Drop the file (idempotent)."""
        self._file.close()


def _write_all(fd: int, data: bytes | memoryview, at: int) -> None:
    """``os.pwrite`` until every byte is written (a short write, e.g. on a nearly full
    disk, would leave a hole that reads back as zeros); an error raises ``OSError``."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, at)
        if written <= 0:
            raise OSError(f"wrote {written} of {len(view)} bytes at {at}")
        view, at = view[written:], at + written
