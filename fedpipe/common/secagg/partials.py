"""Between an aggregator's partials and secure aggregation's inputs.

A client masks its update and its integer weight (:class:`~fedpipe.common.secagg.quantization.
FixedPoint` multiplies them in the ring); the server turns the unmasked weighted sum back into
the partial the aggregator's ``finalize`` expects, as if it were the plain running sum.
Only the streaming aggregators whose partial is a (weighted) sum take part: ``averaging``
(FedAvg, McMahan et al., 2017) and ``sum``. A buffered or robust aggregator (median, Krum...)
needs each client's plain update, which secure aggregation exists to hide.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from fedpipe.common.aggregators import Aggregator, AveragingAggregator, SumAggregator
from fedpipe.common.secagg.quantization import WEIGHT
from fedpipe.common.summable import Summable
from fedpipe.common.training import TrainResult
from fedpipe.common.vector import ArraySpec, Vector

if TYPE_CHECKING:
    from fedpipe.common.secagg.client import SecAggClient
    from fedpipe.common.secagg.messages import ForwardedShares

__all__ = ["check_aggregator", "masked_result", "masked_specs", "secure_input", "secure_partial"]


def check_aggregator(aggregator: Aggregator) -> None:
    """Raise ValueError unless ``aggregator``'s partials are sums secure aggregation can add."""
    if type(aggregator) not in (AveragingAggregator, SumAggregator):
        raise ValueError(
            f"secure_aggregation with aggregator={aggregator.name!r}: expected 'averaging' or "
            "'sum' (a streaming sum); buffered and robust aggregators need each client's "
            "plain update, which secure aggregation hides from the server"
        )


def secure_input(aggregator: Aggregator, partial: Summable) -> tuple[Vector, int, bool]:
    """What a client masks for ``partial``: a vector (numpy), its integer weight, and whether
    the vector is the update already times the weight (FedAvg's weighted sum; the encoding
    divides it back, in float64)."""
    check_aggregator(aggregator)
    if not isinstance(aggregator, AveragingAggregator):
        return partial.vector("sum").to_numpy(), 1, False
    weight = partial.number("total_weight")
    if weight < 1 or weight != int(weight):
        raise ValueError(
            f"client weight {weight} (weighting={aggregator.weights.weighting!r}): "
            "secure aggregation needs an integer weight >= 1"
        )
    return partial.vector("weighted_sum").to_numpy(), int(weight), True


def masked_result(
    client: SecAggClient, aggregator: Aggregator, result: TrainResult, shares: ForwardedShares
) -> TrainResult:
    """``result`` with its update masked by ``client`` (stage 2) in place of its partial.

    Raises
    ------
    ValueError
        The update cannot be encoded (a weight above ``max_weight``, a value not finite).
    """
    update, weight, weighted = secure_input(aggregator, result.partial)
    try:
        masked = client.masked_input(shares, update, weight, weighted=weighted)
    except ValueError as exc:  # the encoding's bounds: say which setting to change
        raise ValueError(
            f"cannot encode its update: {exc} (see secure_aggregation.max_weight and bits)"
        ) from None
    return replace(result, partial=Summable({}), masked=masked)


def masked_specs(specs: Mapping[str, ArraySpec], dtype: str) -> dict[str, ArraySpec]:
    """What a masked input holds: the model's arrays and the weight, as ring elements of
    ``dtype`` (the encoding's)."""
    ring = {k: ArraySpec(s.shape, dtype) for k, s in specs.items()}
    return {WEIGHT: ArraySpec((1,), dtype), **ring}


def secure_partial(
    aggregator: Aggregator, total: Vector, total_weight: int, specs: Mapping[str, ArraySpec]
) -> Summable:
    """The partial whose ``finalize`` gives the global update, from the unmasked weighted
    sum (in the model's dtypes, float32 at least: like the plain running sum)."""
    check_aggregator(aggregator)
    total.check_specs({k: ArraySpec(s.shape, "float64") for k, s in specs.items()}, "unmasked sum")
    summed = Vector(
        {
            k: np.asarray(a).astype(np.promote_types(specs[k].dtype, np.float32))
            for k, a in total.coefs.items()
        }
    )
    if isinstance(aggregator, SumAggregator):
        return Summable({"sum": summed})
    return Summable({"weighted_sum": summed, "total_weight": float(total_weight)})
