"""Model buffers (batch-norm running statistics) that travel between server and clients.

``model.buffers`` in the run config says what becomes of a torch model's floating-point
buffers (``running_mean``, ``running_var``):

- ``"local"`` (default): they never leave the client; each client keeps its own across
  rounds and evaluates with them (as in FedBN, Li et al., 2021). The server never sees them.
- ``"average"``: they are part of the global model. The server sends the global buffers with
  every task; each client trains from them and returns its own; the server's new buffers are
  the weighted mean of the clients', ``sum(w_k * b_k) / sum(w_k)``, summed in float64, where
  ``w_k`` is the client's sample count under the aggregator's ``weighting`` (``"uniform"``,
  ``"capped"``...; 1 for every client under an aggregator without one, such as median).

Travelling buffers take a pass-through channel, not the update: the reserved auxiliary
variable :data:`BUFFERS_AUX`, which no optimizer module ever receives. Client and server
modules (clipping, momentum, noise, Adam) and the aggregator act on the trainable
parameters' update only: statistics are never clipped, noised or given momentum. Integer
buffers (``num_batches_tracked``) never travel: each client counts its own batches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from fedpipe.common.aggregators.weighting import ClientWeighting
from fedpipe.common.summable import Summable
from fedpipe.common.vector import ArraySpec, Vector

__all__ = [
    "BUFFERS_AUX",
    "BufferMode",
    "admit_share",
    "buffer_mode",
    "buffers_share",
    "check_share",
    "global_buffers",
    "mean_buffers",
    "split_buffers",
]

#: What becomes of a model's floating-point buffers (see the module docstring).
BufferMode = Literal["local", "average"]

#: The aux-var name of the buffers' channel (no module's ``aux_name`` starts with ``@``).
BUFFERS_AUX = "@buffers"


def buffer_mode(model: Mapping[str, object]) -> BufferMode:
    """The buffer mode of a run setup's ``model`` entry (``"local"`` when unset)."""
    mode = model.get("buffers", "local")
    if mode not in ("local", "average"):
        raise ValueError(f"model.buffers={mode!r}; expected 'local' or 'average'")
    return mode  # type: ignore[return-value]


def global_buffers(buffers: Vector) -> dict[str, Summable]:
    """The server's buffers as the aux var a task carries them in."""
    return {BUFFERS_AUX: Summable({"buffers": buffers})}


def split_buffers(
    aux_vars: Mapping[str, Summable],
) -> tuple[Summable | None, dict[str, Summable]]:
    """The buffers' record (None when absent) and the modules' own aux vars."""
    rest = {k: v for k, v in aux_vars.items() if k != BUFFERS_AUX}
    return aux_vars.get(BUFFERS_AUX), rest


def buffers_share(buffers: Vector, n_samples: int) -> Summable:
    """A client's share of the mean: ``n * buffers`` in float32 (a half-precision product
    could overflow) and its weight ``n``."""
    specs = {n: ArraySpec(s.shape, "float32") for n, s in buffers.specs().items()}
    return Summable({"weighted_sum": buffers.astype(specs) * float(n_samples), "weight": n_samples})


def check_share(share: Summable, specs: Mapping[str, ArraySpec]) -> None:
    """Raise unless ``share`` is a client's share of buffers of ``specs`` (float32 sums, a
    positive finite weight).

    Raises
    ------
    ValueError
        Other fields, names, shapes, a non-float32 sum, or a bad weight.
    """
    if set(share.fields) != {"weighted_sum", "weight"}:
        raise ValueError(
            f"buffers have fields {sorted(share.fields)}; expected weighted_sum, weight"
        )
    expected = {n: ArraySpec(s.shape, "float32") for n, s in specs.items()}
    share.vector("weighted_sum").check_specs(expected, "buffers.weighted_sum")
    weight = share.number("weight")
    if not weight >= 1 or not share.is_finite():
        raise ValueError(
            f"buffers: weight {weight} (a sample count) must be at least 1, the sums finite"
        )


def admit_share(share: Summable, weighting: ClientWeighting | None) -> Summable:
    """The server's part of a client's (checked) share: its self-reported sample count
    re-weighted by the aggregator's ``weighting`` (uniform without one: under a robust
    aggregator no client gets more say over the statistics than another), summed in float64
    so that finite float32 shares cannot overflow the sum."""
    reported = share.number("weight")
    counted = weighting.weight(reported) if weighting is not None else 1.0
    summed = share.vector("weighted_sum")
    wide = summed.astype({n: ArraySpec(s.shape, "float64") for n, s in summed.specs().items()})
    return Summable({"weighted_sum": wide.mul_(counted / reported), "weight": counted})


def mean_buffers(total: Summable, specs: Mapping[str, ArraySpec]) -> Vector:
    """The sample-weighted mean of the summed shares, in the buffers' own dtypes."""
    mean = total.vector("weighted_sum") / total.number("weight")
    return mean.astype(specs)
