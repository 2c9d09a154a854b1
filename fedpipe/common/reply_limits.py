"""What an awaited reply's payload may hold, checked on its header alone.

A receiver calls :func:`check_reply_header` before it reserves memory for a payload or
allocates any array: a reply that does not fit what its task expects is refused at once
(:class:`RejectedReply`), whatever its sender announces. Replies carry Summables (Vectors and
numbers) only, so a plain array in a reply is refused too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedpipe.common.codec import MAX_DEPTH, DecodeError, spec_from_wire
from fedpipe.common.metrics import MetricSet
from fedpipe.common.protocol import ProtocolError
from fedpipe.common.vector import ArraySpec, Vector, describe_spec_mismatch

__all__ = [
    "REPLY_MODEL_COPIES",
    "RejectedReply",
    "ReplyLimits",
    "check_reply_header",
    "eval_reply_limits",
    "train_reply_limits",
]

#: Most model-sized Vectors in a train reply: a partial's vector fields plus the aux vars of
#: the server's modules (the built-in ones need at most three).
REPLY_MODEL_COPIES = 8


class RejectedReply(ProtocolError):
    """A reply's payload header is not what its task expects: the reply is refused before
    anything is reserved or allocated, its chunks are skipped and the session goes on."""


@dataclass(frozen=True)
class ReplyLimits:
    """One reply's worth.

    Attributes
    ----------
    max_bytes:
        Most tensor bytes of the payload.
    max_vectors:
        Most Vectors in the payload.
    vector_specs:
        Specs every Vector must have exactly (a train reply: the model's), or None.
    """

    max_bytes: int
    max_vectors: int
    vector_specs: Mapping[str, ArraySpec] | None = None


def train_reply_limits(specs: Mapping[str, ArraySpec]) -> ReplyLimits:
    """A train reply: at most :data:`REPLY_MODEL_COPIES` Vectors, each of the model's specs."""
    model_bytes = sum(spec.nbytes for spec in specs.values())
    return ReplyLimits(REPLY_MODEL_COPIES * model_bytes, REPLY_MODEL_COPIES, dict(specs))


def eval_reply_limits(metrics: list[Any]) -> ReplyLimits:
    """An evaluation reply: the Vectors of the metric states of ``metrics`` (specs as in the
    config), whose sizes do not depend on the data."""
    vectors = [
        value
        for state in MetricSet(metrics).state().values()
        for value in state.fields.values()
        if isinstance(value, Vector)
    ]
    return ReplyLimits(sum(v.nbytes for v in vectors), len(vectors))


def check_reply_header(header: Any, limits: ReplyLimits) -> None:
    """Check a ``PayloadHeader`` against ``limits`` without allocating anything.

    Raises
    ------
    RejectedReply
        Too many bytes or Vectors; a tensor outside any Vector; an invalid tensor
        spec; a Vector whose specs are not ``limits.vector_specs``.
    """
    vectors = _vector_refs(header)
    if len(vectors) > limits.max_vectors:
        paths = ", ".join(path for path, _ in vectors[:5])
        raise RejectedReply(
            f"payload holds {len(vectors)} Vectors ({paths}), expected at most {limits.max_vectors}"
        )
    if header.total_bytes > limits.max_bytes:
        raise RejectedReply(
            f"payload announces {header.total_bytes} bytes, expected at most "
            f"{limits.max_bytes} (one reply's worth)"
        )
    for path, indices in vectors:
        try:
            specs = {
                header.tensors[i].name: spec_from_wire(header.tensors[i], f"tensor {i}")
                for i in indices
            }
        except DecodeError as exc:
            raise RejectedReply(f"Vector at {path}: {exc}") from None
        if len(specs) != len(indices):
            raise RejectedReply(f"Vector at {path}: an array name appears twice")
        if limits.vector_specs is not None:
            problem = describe_spec_mismatch(specs, limits.vector_specs)
            if problem:
                raise RejectedReply(f"Vector at {path} does not have the model's specs: {problem}")


def _vector_refs(header: Any) -> list[tuple[str, list[int]]]:
    """``(path, tensor indices)`` of every Vector of the header's structure."""
    n_tensors = len(header.tensors)
    found: list[tuple[str, list[int]]] = []
    stack: list[tuple[Any, str, int]] = [(header.structure, "payload", 0)]
    while stack:
        value, path, depth = stack.pop()
        kind = value.WhichOneof("kind")
        if kind == "vector_ref":
            indices = list(value.vector_ref.indices)
            if any(i >= n_tensors for i in indices):
                raise RejectedReply(f"{path}: tensor reference beyond the {n_tensors} announced")
            found.append((path, indices))
        elif kind == "tensor_ref":
            index = value.tensor_ref.index
            name = header.tensors[index].name if index < n_tensors else "?"
            raise RejectedReply(
                f"{path}: tensor {index} ({name!r}) is not part of a Vector; a reply carries "
                "Vectors and numbers only"
            )
        elif kind in ("tensor_value", "vector_value"):
            raise RejectedReply(f"{path}: an inline {kind} in a payload header")
        elif kind in ("map_value", "list_value"):
            if depth >= MAX_DEPTH:
                raise RejectedReply(f"{path}: containers nested deeper than {MAX_DEPTH} levels")
            if kind == "map_value":
                children = [(e.value, f"{path}.{e.key}") for e in value.map_value.entries]
            else:
                children = [(v, f"{path}[{i}]") for i, v in enumerate(value.list_value.values)]
            stack.extend((child, p, depth + 1) for child, p in children)
    return found
