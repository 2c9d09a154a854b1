"""What crosses between the server and Dask workers: numpy arrays in plain containers.

Dask serializes numpy arrays itself (their buffers travel out of band, not through a pickled
byte string); around them there are only dicts, lists, strings and numbers. No fedpipe object,
model or user class is pickled: each side rebuilds Vectors, Summables and Datasets from these,
and the server checks what comes back as it checks any reply.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedpipe.common.data import Dataset
from fedpipe.common.summable import Summable
from fedpipe.common.training import EvalResult, TrainResult
from fedpipe.common.vector import Vector
from fedpipe.server.clients import ClientError

__all__ = [
    "PackedInits",
    "PlainData",
    "PlainSummable",
    "PlainVector",
    "dataset_from",
    "eval_from_plain",
    "inits_from",
    "packed_inits",
    "plain_dataset",
    "plain_eval",
    "plain_summable",
    "plain_train",
    "plain_vector",
    "summable_from",
    "train_from_plain",
    "vector_from",
]

PlainVector = dict[str, np.ndarray]
PlainSummable = dict[str, PlainVector | float | int]
#: A dataset's ``(x, y)`` arrays.
PlainData = tuple[np.ndarray, np.ndarray]
#: The data of the clients a worker builds (:func:`packed_inits`).
PackedInits = dict[str, Any]


def plain_vector(vector: Vector) -> PlainVector:
    return dict(vector.to_numpy().coefs)


def vector_from(data: Any, what: str) -> Vector:
    """A numpy Vector from ``{name: array}``; arrays Dask handed over read-only are copied
    (the round loop adds into the first reply it folds)."""
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in data.items()
    ):
        raise ClientError(f"{what} is a {type(data).__name__}, expected a map of names to arrays")
    return Vector({k: v if v.flags.writeable else v.copy() for k, v in data.items()})


def plain_summable(summable: Summable) -> PlainSummable:
    return {k: plain_vector(v) if isinstance(v, Vector) else v for k, v in summable.fields.items()}


def summable_from(data: Any, what: str) -> Summable:
    if not isinstance(data, dict):
        raise ClientError(f"{what} is a {type(data).__name__}, expected a map of fields")
    fields: dict[str, Vector | float | int] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            fields[key] = vector_from(value, f"{what}.{key}")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            fields[key] = value
        else:
            raise ClientError(
                f"{what}.{key} is a {type(value).__name__}, expected arrays or a number"
            )
    return Summable(fields)


def plain_train(result: TrainResult) -> dict[str, Any]:
    return {
        "partial": plain_summable(result.partial),
        "aux_vars": {k: plain_summable(v) for k, v in result.aux_vars.items()},
        "n_samples": result.n_samples,
        "n_steps": result.n_steps,
        "loss_sum": result.loss_sum,
        "n_samples_seen": result.n_samples_seen,
        "seconds": result.seconds,
        "sample_epsilon": result.sample_epsilon,
    }


def train_from_plain(data: dict[str, Any]) -> TrainResult:
    aux = data["aux_vars"]
    if not isinstance(aux, dict):
        raise ClientError(f"aux vars are a {type(aux).__name__}, expected a map")
    return TrainResult(
        partial=summable_from(data["partial"], "partial"),
        aux_vars={k: summable_from(v, f"aux var {k!r}") for k, v in aux.items()},
        n_samples=int(data["n_samples"]),
        n_steps=int(data["n_steps"]),
        loss_sum=float(data["loss_sum"]),
        n_samples_seen=int(data["n_samples_seen"]),
        seconds=float(data["seconds"]),
        sample_epsilon=_optional_float(data.get("sample_epsilon")),
    )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def plain_eval(result: EvalResult) -> dict[str, Any]:
    metrics = {k: plain_summable(v) for k, v in result.metrics.items()}
    return {"metrics": metrics, "n_samples": result.n_samples, "seconds": result.seconds}


def eval_from_plain(data: dict[str, Any]) -> EvalResult:
    metrics = data["metrics"]
    if not isinstance(metrics, dict):
        raise ClientError(f"metric states are a {type(metrics).__name__}, expected a map")
    return EvalResult(
        metrics={k: summable_from(v, f"metric {k!r}") for k, v in metrics.items()},
        n_samples=int(data["n_samples"]),
        seconds=float(data["seconds"]),
    )


def plain_dataset(data: Dataset | None) -> PlainData | None:
    return None if data is None else (data.x, data.y)


def dataset_from(data: PlainData | None) -> Dataset | None:
    return None if data is None else Dataset(*data)


def packed_inits(inits: dict[str, dict[str, Any]]) -> PackedInits:
    """The data of the clients ``inits`` names (each ``{"train": PlainData, "eval":
    PlainData | None, ...}``: its other keys plain data) as a few arrays: the arrays of one
    dtype and trailing shape joined along their first axis, so that the thousands of clients
    of a worker travel as one buffer each, not as thousands of small ones (Dask frames each
    array on its own)."""
    names = list(inits)
    slots = [(name, part) for name in names for part in ("train", "eval")]
    arrays = [a for name, part in slots for a in (inits[name][part] or ())]
    groups: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    for k, array in enumerate(arrays):
        groups.setdefault((array.dtype.str, array.shape[1:]), []).append(k)
    where = np.zeros((len(arrays), 3), np.int64)  # group, first row, end row
    joined = []
    for g, members in enumerate(groups.values()):
        sizes = np.array([len(arrays[k]) for k in members], np.int64)
        where[members, 0], where[members, 2] = g, np.cumsum(sizes)
        where[members, 1] = where[members, 2] - sizes
        joined.append(np.concatenate([arrays[k] for k in members]))
    return {
        "names": np.array(names, dtype=str),
        "has_eval": np.array([inits[n]["eval"] is not None for n in names], bool),
        "arrays": joined,
        "where": where,
        "extra": {
            n: {k: v for k, v in inits[n].items() if k not in ("train", "eval")} for n in names
        },
    }


def inits_from(packed: PackedInits) -> dict[str, dict[str, Any]]:
    """:func:`packed_inits`' clients back, each array a view of the joined ones."""
    where, arrays = packed["where"].tolist(), packed["arrays"]
    views = iter([arrays[g][begin:end] for g, begin, end in where])
    inits = {}
    for name, has_eval in zip(packed["names"].tolist(), packed["has_eval"].tolist(), strict=True):
        train = (next(views), next(views))
        evaluation = (next(views), next(views)) if has_eval else None
        inits[name] = {"train": train, "eval": evaluation, **packed["extra"][name]}
    return inits
