"""Split one dataset among simulated clients: IID, Dirichlet label skew, quantity skew.

Every scheme uses each sample exactly once, gives each client at least ``min_size`` samples,
and is a pure function of ``seed``. Each client's samples keep the dataset's order.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedpipe.common.data.dataset import Dataset
from fedpipe.common.data.loaders import save_dataset

__all__ = ["SCHEMES", "partition", "partition_indices", "save_partitions"]

#: Label-skew draws are repeated this many times before the minimum size is forced.
MAX_DIRICHLET_DRAWS = 100


def _iid(y: np.ndarray, n_clients: int, rng: np.random.Generator, **_: object) -> list[np.ndarray]:
    """Shuffle and deal out: client sizes differ by at most one."""
    return np.array_split(rng.permutation(len(y)), n_clients)


def _quantity_skew(
    y: np.ndarray, n_clients: int, rng: np.random.Generator, *, alpha: float, min_size: int
) -> list[np.ndarray]:
    """Client sizes follow Dirichlet(alpha) proportions; labels stay IID within clients.

    Each client first gets ``min_size`` samples; the rest are shared by the drawn proportions.
    """
    spare = len(y) - n_clients * min_size
    shares = rng.dirichlet(np.full(n_clients, alpha))
    extra = np.diff(np.floor(np.cumsum(shares) * spare).astype(np.int64), prepend=0)
    extra[-1] += spare - extra.sum()  # floating cumsum may end a hair below 1
    cuts = np.cumsum(extra + min_size)[:-1]
    return np.split(rng.permutation(len(y)), cuts)


def _dirichlet(
    y: np.ndarray, n_clients: int, rng: np.random.Generator, *, alpha: float, min_size: int
) -> list[np.ndarray]:
    """Label skew (Hsu, Qi & Brown, 2019): each class is shared among clients by its own
    Dirichlet(alpha) proportions, so a small ``alpha`` gives each client few classes.

    Draws are repeated (up to :data:`MAX_DIRICHLET_DRAWS`) until every client has
    ``min_size`` samples, as in the reference implementations; if none qualifies, samples are
    moved at random from the largest clients to the smallest until all reach ``min_size``.
    """
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        if y.ndim == 1 and np.array_equal(y, np.round(y)):
            y = y.astype(np.int64)
        else:
            raise ValueError(
                "the 'dirichlet' scheme needs class labels: y of shape (n,) with integer "
                f"values, got {y.dtype.name}{list(y.shape)}"
            )
    classes = np.unique(y)
    by_class = [np.flatnonzero(y == c) for c in classes]
    parts: list[list[np.ndarray]] = []
    for _ in range(MAX_DIRICHLET_DRAWS):
        parts = [[] for _ in range(n_clients)]
        for members in by_class:
            members = rng.permutation(members)
            shares = rng.dirichlet(np.full(n_clients, alpha))
            cuts = np.floor(np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
        sizes = [sum(len(c) for c in p) for p in parts]
        if min(sizes) >= min_size:
            break
    clients = [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]
    return _fill_up(clients, min_size, rng)


def _fill_up(
    clients: list[np.ndarray], min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Move random samples from the largest client to the smallest until all have
    ``min_size`` (the caller checked that ``n_clients * min_size <= n``)."""
    clients = list(clients)
    while True:
        sizes = np.array([len(c) for c in clients])
        small = int(np.argmin(sizes))
        if sizes[small] >= min_size:
            return clients
        large = int(np.argmax(sizes))
        donor = rng.permutation(clients[large])
        take = min(min_size - sizes[small], sizes[large] - min_size)
        clients[small] = np.concatenate([clients[small], donor[:take]])
        clients[large] = donor[take:]


Scheme = Callable[..., list[np.ndarray]]

#: Partitioning schemes by name.
SCHEMES: dict[str, Scheme] = {
    "iid": _iid,
    "dirichlet": _dirichlet,
    "quantity-skew": _quantity_skew,
}


def partition_indices(
    y: np.ndarray,
    n_clients: int,
    scheme: str = "iid",
    *,
    seed: int | None = None,
    alpha: float = 0.5,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Sorted sample indices of each client; see :func:`partition`."""
    if scheme not in SCHEMES:
        raise ValueError(
            f"unknown partition scheme {scheme!r}; known schemes: {', '.join(SCHEMES)}"
        )
    y = np.asarray(y)
    if n_clients < 1:
        raise ValueError(f"n_clients={n_clients}; expected at least 1")
    if min_size < 0 or n_clients * min_size > len(y):
        raise ValueError(
            f"cannot give {n_clients} clients at least {min_size} samples each "
            f"from {len(y)} samples"
        )
    if alpha <= 0:
        raise ValueError(f"alpha={alpha}; expected a positive concentration")
    rng = np.random.default_rng(seed)
    parts = SCHEMES[scheme](y, n_clients, rng, alpha=alpha, min_size=min_size)
    return [np.sort(p).astype(np.int64) for p in parts]


def partition(
    dataset: Dataset,
    n_clients: int,
    scheme: str = "iid",
    *,
    seed: int | None = None,
    alpha: float = 0.5,
    min_size: int = 1,
) -> list[Dataset]:
    """Split ``dataset`` among ``n_clients`` clients.

    Parameters
    ----------
    dataset:
        The data to share out; every sample goes to exactly one client.
    n_clients:
        Number of parts.
    scheme:
        ``"iid"`` (uniform shuffle, equal sizes), ``"dirichlet"`` (label skew, Hsu et al.
        2019; needs integer class labels) or ``"quantity-skew"`` (sizes skewed by
        Dirichlet(alpha) proportions, labels IID).
    seed:
        Same seed, same partition.
    alpha:
        Dirichlet concentration for the skewed schemes: small is skewed, large near IID.
    min_size:
        Minimum samples per client (the ``iid`` scheme satisfies it whenever possible).
    """
    parts = partition_indices(
        dataset.y, n_clients, scheme, seed=seed, alpha=alpha, min_size=min_size
    )
    return [dataset.subset(p) for p in parts]


def save_partitions(parts: list[Dataset], out_dir: str | Path) -> list[Path]:
    """Write each part as a dataset folder ``out_dir/client_{i}/``; return the folders."""
    out = Path(out_dir)
    return [save_dataset(part, out / f"client_{i}") for i, part in enumerate(parts)]
