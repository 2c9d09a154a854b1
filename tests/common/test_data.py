"""Datasets: batching, splitting, file loaders, partitioners, built-in and synthetic data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpipe.common.data import (
    BUILTIN_DATASETS,
    DataFormatError,
    Dataset,
    load_builtin,
    load_csv,
    load_dataset,
    load_npy,
    load_npz,
    make_classification,
    make_regression,
    partition,
    partition_indices,
    save_dataset,
    save_partitions,
)


def toy(n: int = 10) -> Dataset:
    return Dataset(np.arange(2 * n, dtype=np.float32).reshape(n, 2), np.arange(n) % 3)


# ---- Dataset ------------------------------------------------------------------------------


def test_dataset_rejects_misaligned_arrays() -> None:
    with pytest.raises(ValueError, match="x has 3 samples but y has 2"):
        Dataset(np.zeros((3, 2)), np.zeros(2))


def test_batches_cover_every_sample_once_in_a_seeded_order() -> None:
    ds = toy(10)
    batches = list(ds.batches(4, seed=1))
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    seen = np.concatenate([y for _, y in batches])
    xs = np.concatenate([x for x, _ in batches])
    np.testing.assert_array_equal(np.sort(xs[:, 0]), ds.x[:, 0])
    np.testing.assert_array_equal(xs[:, 0] / 2 % 3, seen)  # rows stay paired
    again = np.concatenate([y for _, y in ds.batches(4, seed=1)])
    np.testing.assert_array_equal(seen, again)
    assert not np.array_equal(xs[:, 0], ds.x[:, 0])  # shuffled


def test_batches_without_shuffle_keep_order_and_can_drop_the_remainder() -> None:
    ds = toy(10)
    batches = list(ds.batches(4, shuffle=False, drop_remainder=True))
    assert [len(x) for x, _ in batches] == [4, 4]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in batches]), ds.x[:8])


def test_a_generator_seed_gives_a_new_order_each_epoch_but_a_reproducible_run() -> None:
    def run(seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        return [np.concatenate([x[:, 0] for x, _ in toy(20).batches(5, seed=rng)]) for _ in "ab"]

    first, second = run(0)
    assert not np.array_equal(first, second)
    for left, right in zip(run(0), (first, second), strict=True):
        np.testing.assert_array_equal(left, right)


def test_subset_and_split() -> None:
    ds = toy(10)
    sub = ds.subset([3, 1])
    np.testing.assert_array_equal(sub.y, [0, 1])
    train, test = ds.split(0.8, seed=0)
    assert (len(train), len(test)) == (8, 2)
    rows = np.concatenate([train.x[:, 0], test.x[:, 0]])
    np.testing.assert_array_equal(np.sort(rows), ds.x[:, 0])
    with pytest.raises(ValueError, match=r"fraction=1.5"):
        ds.split(1.5)


# ---- loaders ------------------------------------------------------------------------------


def test_npz_round_trip_and_missing_key(tmp_path: Path) -> None:
    ds = toy()
    np.savez(tmp_path / "d.npz", features=ds.x, labels=ds.y)
    loaded = load_npz(tmp_path / "d.npz", x_key="features", y_key="labels")
    np.testing.assert_array_equal(loaded.x, ds.x)
    np.testing.assert_array_equal(loaded.y, ds.y)
    with pytest.raises(DataFormatError, match=r"no array named 'x'.*\['features', 'labels'\]"):
        load_npz(tmp_path / "d.npz")


def test_npz_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "evil.npz", x=np.array([{"a": 1}], dtype=object), y=np.zeros(1))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_npz(tmp_path / "evil.npz")


def test_npy_and_dataset_folder_round_trip(tmp_path: Path) -> None:
    ds = toy()
    folder = save_dataset(ds, tmp_path / "ds")
    assert sorted(p.name for p in folder.iterdir()) == ["x.npy", "y.npy"]
    for loaded in (load_npy(folder / "x.npy", folder / "y.npy"), load_dataset(folder)):
        np.testing.assert_array_equal(loaded.x, ds.x)
        np.testing.assert_array_equal(loaded.y, ds.y)
        assert loaded.x.dtype == ds.x.dtype


def test_csv_with_header_and_target_by_name(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("label,a,b\n1,0.5,2\n\n0,1.5,-3e-2\n")
    ds = load_csv(path, target_column="label")
    np.testing.assert_array_equal(ds.x, [[0.5, 2.0], [1.5, -0.03]])
    np.testing.assert_array_equal(ds.y, [1, 0])
    assert ds.y.dtype == np.int64
    assert load_dataset(path).y.dtype == np.float64  # last column by default: not integral


def test_csv_without_header_detects_it_and_keeps_float_targets(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("1;2;0.25\n3;4;0.5\n")
    ds = load_csv(path, delimiter=";")
    np.testing.assert_array_equal(ds.x, [[1, 2], [3, 4]])
    np.testing.assert_array_equal(ds.y, [0.25, 0.5])
    assert load_csv(path, target_column=0, delimiter=";").y.tolist() == [1, 3]
    with pytest.raises(
        DataFormatError, match=r"line 1, column 1: cannot read '1;2;0\.25' as a number"
    ):
        load_csv(path, header=False, delimiter=",")
    assert len(load_csv(path, header=True, delimiter=";")) == 1


def test_bad_csv_errors_name_the_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("a,b,y\n1,2,0\n3,x,1\n")
    with pytest.raises(DataFormatError, match=r"line 3, column 2 \('b'\): cannot read 'x'"):
        load_csv(path)
    path.write_text("1,2,0\n3,4\n")
    with pytest.raises(DataFormatError, match="line 2: expected 3 fields, got 2"):
        load_csv(path)
    path.write_text("1,2,0\n")
    with pytest.raises(DataFormatError, match="no header"):
        load_csv(path, target_column="y")
    with pytest.raises(DataFormatError, match="target_column=5 but rows have 3 columns"):
        load_csv(path, target_column=5)
    path.write_text("a,b\n")
    with pytest.raises(DataFormatError, match="no data rows"):
        load_csv(path)


def test_load_dataset_explains_what_it_accepts(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match=r"missing x\.npy, y\.npy"):
        load_dataset(tmp_path / "empty")
    (tmp_path / "d.parquet").write_bytes(b"")
    with pytest.raises(DataFormatError, match=r"suffix '\.parquet'"):
        load_dataset(tmp_path / "d.parquet")
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "nothing.npz")


# ---- partitioning -------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(20, 300),
    n_clients=st.integers(1, 10),
    scheme=st.sampled_from(["iid", "dirichlet", "quantity-skew"]),
    alpha=st.sampled_from([0.05, 0.5, 10.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_partitions_use_every_sample_once_with_a_minimum_size(
    n: int, n_clients: int, scheme: str, alpha: float, seed: int
) -> None:
    y = np.random.default_rng(seed).integers(0, 4, n)
    min_size = min(2, n // n_clients)
    parts = partition_indices(y, n_clients, scheme, seed=seed, alpha=alpha, min_size=min_size)
    assert len(parts) == n_clients
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))
    assert min(len(p) for p in parts) >= min_size
    again = partition_indices(y, n_clients, scheme, seed=seed, alpha=alpha, min_size=min_size)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_partition_returns_datasets_and_differs_across_seeds() -> None:
    ds = make_classification(200, 3, 4, seed=0)
    parts = partition(ds, 5, "dirichlet", seed=1)
    assert sum(len(p) for p in parts) == 200
    first = parts[0]
    rows = {tuple(r) for r in ds.x[partition_indices(ds.y, 5, "dirichlet", seed=1)[0]]}
    assert rows == {tuple(r) for r in first.x}
    other = partition_indices(ds.y, 5, "dirichlet", seed=2)
    assert not np.array_equal(other[0], partition_indices(ds.y, 5, "dirichlet", seed=1)[0])


def test_iid_sizes_are_balanced() -> None:
    parts = partition_indices(np.zeros(103), 10, "iid", seed=0)
    assert {len(p) for p in parts} == {10, 11}


def label_skew(parts: list[np.ndarray], y: np.ndarray) -> float:
    """Mean total-variation distance between each client's label mix and the global one."""
    k = int(y.max()) + 1
    overall = np.bincount(y, minlength=k) / len(y)
    return float(
        np.mean(
            [0.5 * np.abs(np.bincount(y[p], minlength=k) / len(p) - overall).sum() for p in parts]
        )
    )


def test_small_alpha_dirichlet_skews_labels_and_large_alpha_does_not() -> None:
    y = load_builtin("digits").y
    skewed = partition_indices(y, 10, "dirichlet", seed=0, alpha=0.1)
    mild = partition_indices(y, 10, "dirichlet", seed=0, alpha=100.0)
    iid = partition_indices(y, 10, "iid", seed=0)
    assert label_skew(skewed, y) > 0.5
    assert label_skew(mild, y) < 0.1 and label_skew(iid, y) < 0.1
    classes_per_client = [len(np.unique(y[p])) for p in skewed]
    assert np.mean(classes_per_client) < 6


def test_quantity_skew_skews_sizes_not_labels() -> None:
    y = load_builtin("digits").y
    parts = partition_indices(y, 10, "quantity-skew", seed=0, alpha=0.3, min_size=20)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 20
    assert sizes.max() > 3 * sizes.min()
    big = [p for p in parts if len(p) > 200]
    assert big and label_skew(big, y) < 0.15


def test_partition_errors_are_explicit() -> None:
    y = np.arange(10) % 2
    with pytest.raises(ValueError, match=r"unknown partition scheme 'pathological'.*iid"):
        partition_indices(y, 2, "pathological")
    with pytest.raises(ValueError, match="cannot give 4 clients at least 3 samples"):
        partition_indices(y, 4, min_size=3)
    with pytest.raises(ValueError, match="needs class labels"):
        partition_indices(np.linspace(0, 1, 10), 2, "dirichlet")


def test_dirichlet_forces_the_minimum_when_draws_keep_failing() -> None:
    # 30 samples, 10 clients, min 3 each: every sample is needed and draws almost never fit
    y = np.repeat([0, 1, 2], 10)
    parts = partition_indices(y, 10, "dirichlet", seed=0, alpha=0.01, min_size=3)
    assert [len(p) for p in parts] == [3] * 10
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(30))


def test_save_partitions_writes_client_folders(tmp_path: Path) -> None:
    ds = toy(9)
    folders = save_partitions(partition(ds, 3, seed=0), tmp_path / "out")
    assert [f.name for f in folders] == ["client_0", "client_1", "client_2"]
    loaded = [load_dataset(f) for f in folders]
    np.testing.assert_array_equal(np.sort(np.concatenate([d.x[:, 0] for d in loaded])), ds.x[:, 0])


# ---- built-in and synthetic data ----------------------------------------------------------


def test_builtin_digits() -> None:
    ds = load_builtin("digits")
    assert ds.x.shape == (1797, 64) and ds.x.dtype == np.float32
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    np.testing.assert_array_equal(np.unique(ds.y), np.arange(10))
    raw = load_builtin("digits", standardize=False)
    np.testing.assert_array_equal(raw.x, ds.x * 16)


def test_builtin_breast_cancer() -> None:
    ds = load_builtin("breast-cancer")
    assert ds.x.shape == (569, 30)
    assert np.bincount(ds.y).tolist() == [212, 357]
    np.testing.assert_allclose(ds.x.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(ds.x.std(axis=0), 1.0, atol=1e-5)


def test_builtin_matches_scikit_learn() -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    np.testing.assert_array_equal(
        load_builtin("digits", standardize=False).x, datasets.load_digits().data
    )
    cancer = datasets.load_breast_cancer()
    raw = load_builtin("breast-cancer", standardize=False)
    np.testing.assert_allclose(raw.x, cancer.data, rtol=1e-6)
    np.testing.assert_array_equal(raw.y, cancer.target)


def test_unknown_builtin_lists_known_names() -> None:
    assert set(BUILTIN_DATASETS) == {"digits", "breast-cancer"}
    with pytest.raises(
        ValueError, match=r"unknown built-in dataset 'mnist'.*digits, breast-cancer"
    ):
        load_builtin("mnist")


def test_make_classification_is_seeded_balanced_and_learnable() -> None:
    ds = make_classification(600, 10, 3, seed=4)
    again = make_classification(600, 10, 3, seed=4)
    np.testing.assert_array_equal(ds.x, again.x)
    assert np.bincount(ds.y).tolist() == [200, 200, 200]
    train, test = ds.split(0.5, seed=0)
    centres = np.stack([train.x[train.y == c].mean(axis=0) for c in range(3)])
    nearest = np.argmin(((test.x[:, None, :] - centres) ** 2).sum(axis=2), axis=1)
    assert np.mean(nearest == test.y) > 0.85


def test_make_regression_is_a_noisy_linear_relation() -> None:
    ds = make_regression(500, 5, seed=0, noise=0.1)
    assert ds.x.shape == (500, 5) and ds.y.shape == (500,)
    design = np.hstack([ds.x, np.ones((500, 1))]).astype(np.float64)
    coef, *_ = np.linalg.lstsq(design, ds.y, rcond=None)
    assert np.std(ds.y - design @ coef) == pytest.approx(0.1, rel=0.15)
    assert make_regression(10, 2, n_outputs=3, seed=0).y.shape == (10, 3)
