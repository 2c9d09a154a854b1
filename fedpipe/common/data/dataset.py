"""In-memory datasets: two aligned arrays, batched and shuffled reproducibly."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeAlias

import numpy as np

__all__ = ["Dataset", "Seed"]

#: A seed for shuffling: an int (reproducible), a Generator (continue its stream), or None.
Seed: TypeAlias = int | np.random.Generator | None


class Dataset:
    """Inputs ``x`` and targets ``y``, aligned on their first axis.

    The arrays are kept as given (no copy); :meth:`subset` and :meth:`split` return copies.

    Parameters
    ----------
    x:
        Inputs, shape ``(n, ...)``.
    y:
        Targets, shape ``(n,)`` or ``(n, k)``.
    """

    __slots__ = ("x", "y")

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim == 0 or y.ndim == 0:
            raise ValueError(f"x and y must have a sample axis, got shapes {x.shape} and {y.shape}")
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}; expected equal lengths")
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return len(self.x)

    def __repr__(self) -> str:
        return (
            f"Dataset(n={len(self)}, x={self.x.dtype.name}{list(self.x.shape[1:])}, "
            f"y={self.y.dtype.name}{list(self.y.shape[1:])})"
        )

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: Seed = None,
        drop_remainder: bool = False,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(x, y)`` batches covering the dataset once.

        Parameters
        ----------
        batch_size:
            Samples per batch; the last batch is smaller unless ``drop_remainder``.
        shuffle:
            Draw a new sample order (from ``seed``) instead of the stored order.
        seed:
            An int gives the same order every time; a Generator is advanced, so successive
            epochs differ but a whole run is reproducible; None draws fresh entropy.
        drop_remainder:
            Skip the last, incomplete batch.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; expected at least 1")
        n = len(self)
        order = np.random.default_rng(seed).permutation(n) if shuffle else None
        stop = n - n % batch_size if drop_remainder else n
        for start in range(0, stop, batch_size):
            if order is None:
                yield self.x[start : start + batch_size], self.y[start : start + batch_size]
            else:
                idx = order[start : start + batch_size]
                yield self.x[idx], self.y[idx]

    def subset(self, indices: np.ndarray | list[int]) -> Dataset:
        """A new Dataset of the samples at ``indices`` (copied, in that order)."""
        idx = np.asarray(indices, dtype=np.int64)
        return Dataset(self.x[idx], self.y[idx])

    def split(self, fraction: float, seed: Seed = None) -> tuple[Dataset, Dataset]:
        """Shuffle, then split into ``(train, test)``.

        ``fraction`` is the share of samples that go to the *first* part (train), rounded
        down: ``ds.split(0.8, seed=0)`` keeps 80% for training and 20% for testing.
        """
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction={fraction}; expected a number in [0, 1]")
        order = np.random.default_rng(seed).permutation(len(self))
        cut = int(np.floor(fraction * len(self)))
        return self.subset(order[:cut]), self.subset(order[cut:])
