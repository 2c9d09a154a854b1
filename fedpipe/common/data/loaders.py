"""Read datasets from .npz, .npy and CSV files, and write them as dataset folders.

A *dataset folder* (what :func:`save_dataset` writes and :func:`load_dataset` reads) holds two
plain numpy files, ``x.npy`` and ``y.npy``. Plain ``.npy`` rather than one ``.npz`` so that a
large folder can later be memory-mapped without unzipping. Nothing here ever unpickles:
every ``np.load`` runs with ``allow_pickle=False``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from fedpipe.common.data.builtin import load_builtin
from fedpipe.common.data.dataset import Dataset

__all__ = [
    "DataFormatError",
    "load_csv",
    "load_dataset",
    "load_npy",
    "load_npz",
    "load_source",
    "save_dataset",
]

PathLike = str | Path


class DataFormatError(ValueError):
    """A data file exists but does not hold what was expected (keys, fields, numbers)."""


def load_npz(path: PathLike, x_key: str = "x", y_key: str = "y") -> Dataset:
    """Load ``x`` and ``y`` arrays stored under ``x_key`` / ``y_key`` in an ``.npz`` file."""
    with np.load(path, allow_pickle=False) as archive:
        missing = [key for key in (x_key, y_key) if key not in archive.files]
        if missing:
            raise DataFormatError(
                f"{path}: no array named {', '.join(map(repr, missing))}; the file holds "
                f"{sorted(archive.files)} (choose them with x_key=..., y_key=...)"
            )
        return Dataset(archive[x_key], archive[y_key])


def load_npy(x_path: PathLike, y_path: PathLike) -> Dataset:
    """Load inputs and targets from two ``.npy`` files."""
    return Dataset(np.load(x_path, allow_pickle=False), np.load(y_path, allow_pickle=False))


def load_csv(
    path: PathLike,
    target_column: str | int = -1,
    *,
    header: bool | None = None,
    delimiter: str = ",",
) -> Dataset:
    """Load a numeric CSV file: one column is the target, the others the features.

    Parameters
    ----------
    path:
        The file. Blank lines are skipped.
    target_column:
        Index of the target column (negative counts from the end) or, with a header, its name.
    header:
        Whether the first row holds column names; ``None`` guesses: it is a header if any of
        its fields is not a number.
    delimiter:
        Field separator.

    Returns
    -------
    Dataset
        ``x`` as float64 of shape ``(n, n_columns - 1)``; ``y`` as int64 if every target is a
        whole number (class ids), else float64.

    Raises
    ------
    DataFormatError
        A row with the wrong number of fields or a field that is not a number (the message
        names the line and the column), an unknown target column, or no data rows.
    """
    rows: list[list[float]] = []
    names: list[str] | None = None
    width = 0
    with open(path, newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        for fields in reader:
            if not fields or all(not f.strip() for f in fields):
                continue
            line = reader.line_num
            if width == 0:
                width = len(fields)
                is_header = header if header is not None else not all(map(_is_number, fields))
                if is_header:
                    names = [f.strip() for f in fields]
                    continue
            if len(fields) != width:
                raise DataFormatError(
                    f"{path}, line {line}: expected {width} fields, got {len(fields)}"
                )
            try:
                rows.append([float(f) for f in fields])
            except ValueError:
                col = next(i for i, f in enumerate(fields) if not _is_number(f))
                column = f"column {col + 1}" + (f" ({names[col]!r})" if names else "")
                raise DataFormatError(
                    f"{path}, line {line}, {column}: cannot read {fields[col]!r} as a number"
                ) from None
    if not rows:
        raise DataFormatError(f"{path}: no data rows")
    target = _column_index(path, target_column, names, width)
    table = np.asarray(rows, dtype=np.float64)
    x = np.delete(table, target, axis=1)
    y = table[:, target]
    if np.all(np.isfinite(y)) and np.array_equal(y, np.round(y)):
        return Dataset(x, y.astype(np.int64))
    return Dataset(x, y)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _column_index(path: PathLike, column: str | int, names: list[str] | None, width: int) -> int:
    if isinstance(column, str):
        if names is None:
            raise DataFormatError(
                f"{path}: target_column={column!r} is a name but the file has no header; "
                f"pass a column index or header=True"
            )
        if column not in names:
            raise DataFormatError(f"{path}: no column {column!r}; columns are {names}")
        return names.index(column)
    if not -width <= column < width:
        raise DataFormatError(f"{path}: target_column={column} but rows have {width} columns")
    return column % width


def save_dataset(dataset: Dataset, folder: PathLike) -> Path:
    """Write ``dataset`` as a dataset folder (``x.npy`` and ``y.npy``); return the folder."""
    if dataset.x.dtype.hasobject or dataset.y.dtype.hasobject:
        raise TypeError("cannot save object arrays: dataset folders never hold pickles")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "x.npy", dataset.x, allow_pickle=False)
    np.save(out / "y.npy", dataset.y, allow_pickle=False)
    return out


def load_dataset(path: PathLike) -> Dataset:
    """Load a dataset by the kind of ``path``: a dataset folder, a ``.npz`` or a ``.csv``.

    For other layouts, call :func:`load_npz`, :func:`load_npy` or :func:`load_csv` with
    explicit arguments.
    """
    p = Path(path)
    if p.is_dir():
        missing = [f for f in ("x.npy", "y.npy") if not (p / f).is_file()]
        if missing:
            raise DataFormatError(
                f"{p} is not a dataset folder: missing {', '.join(missing)} "
                f"(dataset folders hold x.npy and y.npy, as written by save_dataset)"
            )
        return load_npy(p / "x.npy", p / "y.npy")
    if not p.exists():
        raise FileNotFoundError(f"no dataset at {p}")
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return load_npz(p)
    if suffix == ".csv":
        return load_csv(p)
    raise DataFormatError(
        f"{p}: cannot tell the format from suffix {suffix!r}; expected a dataset folder, "
        f".npz or .csv (for a pair of .npy files use load_npy(x_path, y_path))"
    )


def load_source(name: str) -> Dataset:
    """A built-in dataset name, or a path to a dataset file or folder."""
    path = Path(name)
    return load_dataset(path) if path.exists() else load_builtin(name)
