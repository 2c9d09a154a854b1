"""A client's data as torch ``DataLoader`` objects: its own transforms, augmentation, batching.

Needs the ``torch`` extra. A client names a factory in its own config (``loaders =
"mypkg.data:loaders"``); the factory returns the training ``DataLoader``, or a pair
``(train, eval)`` whose second item may be None. When the client also has fedpipe data
(``data`` or ``dataset``, or its partition in a simulation), the factory is called with it,
``factory(train, eval)`` (two :class:`~fedpipe.common.data.Dataset`, the second possibly None),
to wrap it into loaders of its own; otherwise ``factory()`` loads whatever it likes.

The loader owns batching and shuffling: fedpipe's ``batch_size``, ``drop_remainder`` and its
per-round shuffling seed apply to its own :class:`~fedpipe.common.data.Dataset` only. Each
batch must be an ``(inputs, targets)`` pair (tensors or arrays).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from fedpipe.common.data.dataset import Dataset
from fedpipe.common.plugins import PluginError, import_object

__all__ = ["LoaderData", "host_array", "load_loaders"]


class LoaderData:
    """A ``DataLoader`` where fedpipe takes a client's data: ``len()`` is the number of samples
    of its dataset (the client's averaging weight), :meth:`batches` one pass over it."""

    def __init__(self, loader: DataLoader[Any], source: str = "the DataLoader") -> None:
        try:
            self.n_samples = len(loader.dataset)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError(
                f"{source}: its dataset has no len(); fedpipe needs the number of samples "
                "(the client's weight in the average): give the Dataset a __len__"
            ) from None
        self.loader, self.source = loader, source

    def __len__(self) -> int:
        return self.n_samples

    def __repr__(self) -> str:
        return f"LoaderData(n={self.n_samples}, {self.source})"

    def batches(self, *, host_targets: bool = False) -> Iterator[tuple[Any, Any]]:
        """One pass over the loader, in its own order, as ``(inputs, targets)`` pairs; with
        ``host_targets`` the targets are numpy arrays (for the metrics).

        Raises
        ------
        ValueError
            A batch is not an ``(inputs, targets)`` pair.
        """
        for batch in self.loader:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                kind = f"a {type(batch).__name__}"
                if isinstance(batch, (tuple, list)):
                    kind += f" of {len(batch)} items"
                raise ValueError(f"{self.source} yields {kind}; expected (inputs, targets) pairs")
            yield batch[0], host_array(batch[1]) if host_targets else batch[1]

    def first_batch(self) -> tuple[Any, Any]:
        """The first batch (to check that the model takes this data)."""
        for batch in self.batches():
            return batch
        raise ValueError(f"{self.source} yields no batch")


def host_array(values: Any) -> np.ndarray:
    """``values`` (a tensor on any device, or an array) as a numpy array on the host."""
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def load_loaders(
    path: str, train: Dataset | None = None, eval_data: Dataset | None = None
) -> tuple[LoaderData, LoaderData | None]:
    """Call the loaders factory named by ``path`` (see the module docstring).

    Raises
    ------
    PluginError
        ``path`` cannot be imported, is not callable, or returned something other than a
        ``DataLoader`` or a ``(DataLoader, DataLoader | None)`` pair.
    """
    factory = import_object(path, "loaders")
    if not callable(factory):
        raise PluginError(f"loaders {path!r} is a {type(factory).__name__}, not callable")
    made = factory() if train is None else factory(train, eval_data)
    pair = made if isinstance(made, tuple) else (made, None)
    if len(pair) != 2 or not isinstance(pair[0], DataLoader) or not _loader_or_none(pair[1]):
        raise PluginError(
            f"loaders {path!r} returned {type(made).__name__} {made!r:.80}; expected a "
            "torch DataLoader or a pair (train DataLoader, eval DataLoader or None)"
        )
    try:
        evaluation = None if pair[1] is None else LoaderData(pair[1], f"eval loader of {path!r}")
        return LoaderData(pair[0], f"train loader of {path!r}"), evaluation
    except ValueError as exc:
        raise PluginError(str(exc)) from None


def _loader_or_none(value: Any) -> bool:
    return value is None or isinstance(value, DataLoader)
