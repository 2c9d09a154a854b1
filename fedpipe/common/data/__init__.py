"""Datasets: in-memory arrays, file loaders, partitioners for simulation, built-in data."""

from fedpipe.common.data.builtin import (
    BUILTIN_DATASETS,
    load_builtin,
    make_classification,
    make_regression,
)
from fedpipe.common.data.dataset import Dataset, Seed
from fedpipe.common.data.loaders import (
    DataFormatError,
    load_csv,
    load_dataset,
    load_npy,
    load_npz,
    load_source,
    save_dataset,
)
from fedpipe.common.data.partition import SCHEMES, partition, partition_indices, save_partitions

__all__ = [
    "BUILTIN_DATASETS",
    "SCHEMES",
    "DataFormatError",
    "Dataset",
    "Seed",
    "load_builtin",
    "load_csv",
    "load_dataset",
    "load_npy",
    "load_npz",
    "load_source",
    "make_classification",
    "make_regression",
    "partition",
    "partition_indices",
    "save_dataset",
    "save_partitions",
]
