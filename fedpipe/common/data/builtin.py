"""Built-in datasets shipped with fedpipe, and synthetic generators for tests and benchmarks.

The real datasets (see ``fedpipe/datasets/README.md`` for origin and license) are small
compressed ``.npz`` files inside the package: nothing is downloaded, scikit-learn is not needed.
"""

from __future__ import annotations

from importlib import resources

import numpy as np

from fedpipe.common.data.dataset import Dataset

__all__ = ["BUILTIN_DATASETS", "load_builtin", "make_classification", "make_regression"]

#: Built-in dataset names and their files under ``fedpipe/datasets/``.
BUILTIN_DATASETS: dict[str, str] = {
    "digits": "digits.npz",
    "breast-cancer": "breast_cancer.npz",
}


def load_builtin(name: str, *, standardize: bool = True) -> Dataset:
    """Load a built-in dataset.

    Parameters
    ----------
    name:
        ``"digits"`` (1797 8x8 images, 64 features, 10 classes) or ``"breast-cancer"``
        (569 samples, 30 features, binary: 1 = benign).
    standardize:
        Scale features for training: digits pixels are divided by 16 (to ``[0, 1]``),
        breast-cancer features are centred and scaled to unit variance (statistics of the
        whole dataset). With ``False``, ``x`` holds the original values as float32.

    Returns
    -------
    Dataset
        ``x`` float32 of shape ``(n, n_features)``, ``y`` int64 class ids.
    """
    if name not in BUILTIN_DATASETS:
        raise ValueError(
            f"unknown built-in dataset {name!r}; known datasets: {', '.join(BUILTIN_DATASETS)}"
        )
    source = resources.files("fedpipe").joinpath("datasets", BUILTIN_DATASETS[name])
    with source.open("rb") as handle, np.load(handle, allow_pickle=False) as archive:
        x = archive["x"].astype(np.float64)
        y = archive["y"].astype(np.int64)
    if standardize:
        if name == "digits":
            x /= 16.0
        else:
            std = x.std(axis=0)
            x = (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)
    return Dataset(x.astype(np.float32), y)


def make_classification(
    n: int,
    n_features: int,
    n_classes: int,
    seed: int | None = None,
    *,
    class_sep: float = 3.0,
) -> Dataset:
    """Gaussian blobs: one random centre per class, unit-variance noise around it.

    The centres are drawn from ``N(0, class_sep^2 / n_features)`` per coordinate, so the
    expected distance between two centres is about ``class_sep * sqrt(2)`` whatever the
    dimension, against unit noise along any direction: a linear model separates the classes
    well but not perfectly (for the default, two classes overlap by about 2%).
    Classes are balanced (sizes differ by at most one). ``x`` is float32, ``y`` int64.
    """
    if n < 1 or n_features < 1 or n_classes < 2:
        raise ValueError(
            f"n={n}, n_features={n_features}, n_classes={n_classes}; expected n >= 1, "
            f"n_features >= 1, n_classes >= 2"
        )
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, n_features)) * (class_sep / np.sqrt(n_features))
    y = rng.permutation(np.arange(n) % n_classes)
    x = centres[y] + rng.standard_normal((n, n_features))
    return Dataset(x.astype(np.float32), y.astype(np.int64))


def make_regression(
    n: int,
    n_features: int,
    n_outputs: int = 1,
    seed: int | None = None,
    *,
    noise: float = 0.1,
) -> Dataset:
    """A noisy linear relation ``y = x @ w + b + noise`` with ``x ~ N(0, 1)``.

    ``w`` and ``b`` are drawn from ``N(0, 1)``; ``noise`` is the standard deviation of the
    Gaussian noise. ``y`` has shape ``(n,)`` for one output, else ``(n, n_outputs)``; both
    arrays are float32.
    """
    if n < 1 or n_features < 1 or n_outputs < 1:
        raise ValueError(f"n={n}, n_features={n_features}, n_outputs={n_outputs}; expected >= 1")
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_features, n_outputs))
    b = rng.standard_normal(n_outputs)
    x = rng.standard_normal((n, n_features))
    y = x @ w + b + noise * rng.standard_normal((n, n_outputs))
    if n_outputs == 1:
        y = y[:, 0]
    return Dataset(x.astype(np.float32), y.astype(np.float32))
