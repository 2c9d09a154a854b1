"""The replies of one round kept for a buffered aggregator: in memory up to a byte budget,
in memory-mapped files beyond it, read back chunk range by chunk range.

Memory bound
------------
While a round collects, the server holds the replies kept in memory (at most
``memory_bytes``; a reply that would pass the budget is written to its own file under
``spill_dir`` and dropped), and the spilled files sit in the page cache, which the kernel
reclaims. While reducing, it holds one ``K x CHUNK_ELEMENTS`` float64 block (``K`` replies:
50 x 65,536 x 8 B = 26 MB), ``K x K`` distance matrices and the model-sized result. So
50 clients x 100M float32 parameters (20 GB of replies) need about 1.5 GB of process memory
with the default 1 GiB budget. The files are removed when the round is reduced
(:meth:`ReplyBuffer.close`), or when the buffer is dropped if the round failed before.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np

from fedpipe.common.summable import Summable
from fedpipe.common.vector import ArraySpec, Vector

__all__ = ["CHUNK_ELEMENTS", "SPILL_PREFIX", "ReplyBuffer", "remove_stale_spills"]

#: Coordinates of one array read from every reply at once while reducing.
CHUNK_ELEMENTS = 1 << 16
#: Name prefix of the temporary directory holding a round's spilled replies.
SPILL_PREFIX = ".aggregation-"
_ALIGN = 64  # each array of a spilled reply starts on a cache line


def remove_stale_spills(directory: Path) -> None:
    """Delete spill directories a killed process left in ``directory``."""
    if directory.is_dir():
        for stale in directory.glob(f"{SPILL_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)


class ReplyBuffer(Summable):
    """The client updates and sample counts of one round, kept rather than summed.

    A :class:`Summable` so that the round loop folds replies into it as into a running sum:
    :meth:`add_` keeps the partial's ``update`` (no copy while under the budget) and its
    ``n_samples``. Rows are numbered in arrival order.

    Parameters
    ----------
    memory_bytes:
        Bytes of replies kept in memory; later replies go to memory-mapped files.
    spill_dir:
        Where the round's temporary directory is made (default: the system's temp dir).
    """

    def __init__(self, memory_bytes: int, spill_dir: Path | None = None) -> None:
        super().__init__({})
        self.memory_bytes = memory_bytes
        self.spill_dir = spill_dir
        self.specs: dict[str, ArraySpec] = {}
        self.rows: list[dict[str, np.ndarray]] = []  # flat arrays: in memory or memory-mapped
        self.n_samples: list[float] = []
        self.norms: list[float] = []  # each reply's L2 norm, for update validation
        self.held_bytes = 0
        self.directory: Path | None = None
        self._remove: weakref.finalize[Any, Any] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"ReplyBuffer({len(self.rows)} replies, {self.spilled} spilled)"

    def add_(self, other: Summable) -> Self:
        """Keep ``other``'s update (numpy, on the host) and sample count."""
        update = other.vector("update").to_numpy()
        if not self.rows:
            self.specs = update.specs()
        update.check_specs(self.specs, "update")
        if self.held_bytes + update.nbytes <= self.memory_bytes:
            row = {n: np.ascontiguousarray(a).reshape(-1) for n, a in update.coefs.items()}
            self.held_bytes += update.nbytes
        else:
            row = self._spill(update)
        self.rows.append(row)
        self.n_samples.append(other.number("n_samples"))
        self.norms.append(update.norm())
        return self

    def _spill(self, update: Vector) -> dict[str, np.ndarray]:
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix=SPILL_PREFIX, dir=self.spill_dir))
            self._remove = weakref.finalize(self, shutil.rmtree, self.directory, True)
        starts, end = [], 0
        for array in update.coefs.values():
            starts.append(end)
            end += -(-array.nbytes // _ALIGN) * _ALIGN
        path = self.directory / f"reply-{len(self.rows)}.bin"
        mapped = np.memmap(path, np.uint8, "w+", shape=(max(end, 1),))
        row = {}
        for (name, array), start in zip(update.coefs.items(), starts, strict=True):
            row[name] = mapped[start : start + array.nbytes].view(array.dtype)
            row[name][...] = array.reshape(-1)
        return row

    def scale_row(self, row: int, factor: float) -> None:
        """Multiply reply ``row`` by ``factor`` (in its file if spilled)."""
        for name, array in self.rows[row].items():
            if array.flags.writeable:
                array *= factor
            else:  # a decoded reply's read-only buffer
                self.rows[row][name] = (array * factor).astype(array.dtype)
        self.norms[row] *= abs(factor)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only replies ``rows`` (renumbered in that order); the others' files stay until
        :meth:`close`."""
        self.rows = [self.rows[i] for i in rows]
        self.n_samples = [self.n_samples[i] for i in rows]
        self.norms = [self.norms[i] for i in rows]

    @property
    def spilled(self) -> int:
        """How many replies are in files."""
        return sum(isinstance(next(iter(r.values()), None), np.memmap) for r in self.rows)

    def close(self) -> None:
        """Drop the replies and remove the spill files (idempotent)."""
        self.rows.clear()
        if self._remove is not None:
            self._remove()

    # ---- chunk-range reads -------------------------------------------------------------------

    def ranges(self) -> Iterator[tuple[str, int, int]]:
        """``(array name, start, stop)`` over the flat coordinates, ``CHUNK_ELEMENTS`` at most."""
        for name, spec in self.specs.items():
            for start in range(0, spec.size, CHUNK_ELEMENTS):
                yield name, start, min(start + CHUNK_ELEMENTS, spec.size)

    def block(self, name: str, start: int, stop: int, rows: Sequence[int] | None = None) -> Any:
        """Coordinates ``start:stop`` of array ``name`` of replies ``rows`` (default: all), as
        a float64 array of shape ``(len(rows), stop - start)``."""
        chosen = range(len(self.rows)) if rows is None else rows
        out = np.empty((len(chosen), stop - start), np.float64)
        for i, row in enumerate(chosen):
            out[i] = self.rows[row][name][start:stop]
        return out

    def coordinatewise(
        self, reduce: Callable[[Any], Any], rows: Sequence[int] | None = None
    ) -> Vector:
        """The Vector whose coordinates are ``reduce(block)`` (one value per column)."""
        out = {n: np.empty(s.shape, s.dtype) for n, s in self.specs.items()}
        for name, start, stop in self.ranges():
            out[name].reshape(-1)[start:stop] = reduce(self.block(name, start, stop, rows))
        return Vector(out)

    def combine(self, coefs: Any, rows: Sequence[int] | None = None) -> Vector:
        """``sum_i coefs[i] * update[rows[i]]``, chunk range by chunk range."""
        return self.coordinatewise(lambda block: np.asarray(coefs) @ block, rows)

    def gram(self) -> Any:
        """The ``K x K`` matrix of dot products between replies (float64)."""
        gram = np.zeros((len(self.rows), len(self.rows)))
        for name, start, stop in self.ranges():
            block = self.block(name, start, stop)
            gram += block @ block.T
        return gram

    def distances(self) -> Any:
        """The ``K x K`` matrix of squared Euclidean distances between replies."""
        gram = self.gram()
        norms = np.diag(gram)
        return np.maximum(norms[:, None] + norms[None, :] - 2.0 * gram, 0.0)
