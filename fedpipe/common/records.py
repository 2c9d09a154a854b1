"""The protocol's records and their messages: tasks and replies as plain data (``info``)
and states (``payload``), settings as plain data, Summables read from untrusted states.

Every ``*_from`` treats its input as the peer's: a missing, mistyped or negative field
raises :class:`~fedpipe.common.protocol.ProtocolError` saying which. Framing the messages
is :mod:`fedpipe.common.framing`'s, carrying the frames the transport's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedpipe.common.codec import decode_state, encode_state
from fedpipe.common.protocol import ProtocolError
from fedpipe.common.state import State, StateValue
from fedpipe.common.summable import Summable
from fedpipe.common.training import EvalResult, TrainResult
from fedpipe.common.vector import Vector

__all__ = [
    "CHUNK_BYTES_KEY",
    "eval_reply_parts",
    "eval_result_from",
    "settings_data",
    "settings_value",
    "setup_chunk_bytes",
    "summables_from",
    "task_state",
    "train_reply_parts",
    "train_result_from",
    "weights_from",
]


#: The setup task's key for the chunk size of the payloads a client sends (the gRPC
#: transport's setting, sent beside the run setup's fields, where clients have always read it).
CHUNK_BYTES_KEY = "chunk_bytes"


def settings_value(data: Mapping[str, Any]) -> Any:
    """Encode plain data (configs, counts) as a protobuf ``Value``."""
    return encode_state(dict(data))


def settings_data(value: Any) -> dict[str, Any]:
    """Decode a ``Value`` of plain data; tensors are not allowed there."""
    state = decode_state(value)
    if not isinstance(state, dict):
        raise ProtocolError(f"settings must be a map, got {type(state).__name__}")
    _check_plain(state, "settings")
    return state


def _check_plain(value: StateValue, path: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain(item, f"{path}[{i}]")
    elif not (value is None or isinstance(value, bool | int | float | str)):
        raise ProtocolError(f"{path} holds a {type(value).__name__}; only plain data is allowed")


def summable_state(summable: Summable) -> dict[str, StateValue]:
    return dict(summable.fields)


def summable_from(value: StateValue, path: str) -> Summable:
    """A :class:`Summable` from an untrusted state node (a map of Vectors and numbers)."""
    if not isinstance(value, dict):
        raise ProtocolError(f"{path} must be a map of Vectors and numbers")
    fields: dict[str, Vector | float | int] = {}
    for key, item in value.items():
        if isinstance(item, bool) or not isinstance(item, Vector | int | float):
            raise ProtocolError(f"{path}.{key} must be a Vector or a number")
        fields[key] = item
    return Summable(fields)


def summables_from(value: StateValue, path: str) -> dict[str, Summable]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{path} must be a map")
    return {key: summable_from(item, f"{path}.{key}") for key, item in value.items()}


def number(info: Mapping[str, Any], key: str, *, integer: bool = False) -> Any:
    value = info.get(key)
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < 0:
        raise ProtocolError(f"reply info {key!r} is {value!r}, expected a non-negative number")
    return value


def train_reply_parts(result: TrainResult) -> tuple[dict[str, Any], State]:
    info = {
        "n_samples": result.n_samples,
        "n_steps": result.n_steps,
        "loss_sum": result.loss_sum,
        "n_samples_seen": result.n_samples_seen,
        "seconds": result.seconds,
    }
    if result.sample_epsilon is not None:
        info["sample_epsilon"] = result.sample_epsilon
    payload: State = {
        "partial": summable_state(result.partial),
        "aux_vars": {k: summable_state(v) for k, v in result.aux_vars.items()},
    }
    if result.masked is not None:  # secure aggregation: the update masked, partial empty
        payload["masked"] = result.masked.masked
    return info, payload


def train_result_from(info: Mapping[str, Any], payload: State) -> TrainResult:
    return TrainResult(
        partial=summable_from(payload.get("partial"), "partial"),
        aux_vars=summables_from(payload.get("aux_vars", {}), "aux_vars"),
        n_samples=number(info, "n_samples", integer=True),
        n_steps=number(info, "n_steps", integer=True),
        loss_sum=float(number(info, "loss_sum")),
        n_samples_seen=number(info, "n_samples_seen", integer=True),
        seconds=float(number(info, "seconds")),
        sample_epsilon=(
            float(number(info, "sample_epsilon")) if "sample_epsilon" in info else None
        ),
    )


def eval_reply_parts(result: EvalResult) -> tuple[dict[str, Any], State]:
    info = {"n_samples": result.n_samples, "seconds": result.seconds}
    return info, {"metrics": {k: summable_state(v) for k, v in result.metrics.items()}}


def eval_result_from(info: Mapping[str, Any], payload: State) -> EvalResult:
    return EvalResult(
        metrics=summables_from(payload.get("metrics", {}), "metrics"),
        n_samples=number(info, "n_samples", integer=True),
        seconds=float(number(info, "seconds")),
    )


def task_state(weights: Vector, aux_vars: Mapping[str, Summable]) -> State:
    return {"weights": weights, "aux_vars": {k: summable_state(v) for k, v in aux_vars.items()}}


def weights_from(payload: State) -> Vector:
    weights = payload.get("weights")
    if not isinstance(weights, Vector):
        raise ProtocolError("task payload has no 'weights' Vector")
    return weights


def setup_chunk_bytes(settings: Mapping[str, Any], default: int) -> int:
    """The chunk size a setup task's ``settings`` give (:data:`CHUNK_BYTES_KEY`: the
    transport's setting, not the run setup's), ``default`` without one.

    Raises
    ------
    ValueError
        Not a whole number of bytes from 1 to 64 MiB.
    """
    value = settings.get(CHUNK_BYTES_KEY, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise ValueError(f"chunk_bytes={value!r}; expected a whole number of bytes")
    if not 1 <= int(value) <= 64 << 20:
        raise ValueError(f"chunk_bytes={int(value)}; expected 1 byte to 64 MiB")
    return int(value)
