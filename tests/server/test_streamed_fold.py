"""The round's running sum takes replies received to disk (``TrainResult.spilled``), chunk by
chunk, to the same bits as whole replies in memory."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from fedpipe.common.aggregators import Aggregator
from fedpipe.common.aggregators.averaging import AveragingAggregator, SumAggregator
from fedpipe.common.aggregators.gradient_masked import GradientMaskedAveraging
from fedpipe.common.config import ValidationConfig
from fedpipe.common.optim import Optimizer
from fedpipe.common.payload import PayloadAssembler, encode_payload
from fedpipe.common.spilled_vector import SpilledVector
from fedpipe.common.summable import Summable
from fedpipe.common.training import TrainResult
from fedpipe.common.vector import Vector
from fedpipe.server.clients import ClientError
from fedpipe.server.rounds import _Fold
from fedpipe.server.update_validation import UpdateValidation

SPECS = {"w": ((37, 5), "float32"), "b": ((5,), "float32")}


class Named:
    """A client as ``_Fold`` sees it: a name."""

    def __init__(self, name: str) -> None:
        self.name = name


def update(seed: int, dtype: str = "float32") -> Vector:
    rng = np.random.default_rng(seed)
    return Vector({n: rng.standard_normal(shape).astype(dtype) for n, (shape, _) in SPECS.items()})


def reply(aggregator: Aggregator, seed: int, samples: int, spilled: bool) -> TrainResult:
    partial = aggregator.prepare(update(seed), samples, 1)
    return spill(partial, samples) if spilled else TrainResult(partial, {}, samples, 1, 1.0)


def spill(partial: Summable, samples: int = 4, chunk_bytes: int = 1001) -> TrainResult:
    """``partial`` as the server receives it, its Vectors on disk (1001-byte chunks by
    default: floats cut in two across chunk boundaries)."""
    payload = encode_payload({"partial": dict(partial.fields), "aux_vars": {}}, chunk_bytes)
    assembler = PayloadAssembler(payload.header, max_bytes=1 << 20, spill="partial")
    for tensor, offset, data in payload.chunks():
        assembler.add_chunk(tensor, offset, data)
    numbers: Any = assembler.finish()["partial"]
    return TrainResult(Summable(numbers), {}, samples, 1, 1.0, spilled=assembler.spilled)


def fold(aggregator: Aggregator, replies: list[TrainResult]) -> tuple[_Fold, list[str]]:
    folded = _Fold(aggregator, Optimizer(lrate=1.0), update(0).specs())
    rejected = []

    async def add_all() -> None:
        for i, result in enumerate(replies):
            try:
                await folded.add(Named(f"c{i}"), result)  # type: ignore[arg-type]
            except (ClientError, ValueError) as exc:
                rejected.append(str(exc))

    asyncio.run(add_all())
    return folded, rejected


@pytest.mark.parametrize(
    "aggregator",
    [
        AveragingAggregator(),
        AveragingAggregator(weighting="uniform"),  # a factor other than 1 per reply
        GradientMaskedAveraging(threshold=0.6),
        SumAggregator(),
    ],
    ids=["samples", "uniform", "gradient-masked", "sum"],
)
def test_replies_folded_from_disk_give_the_bits_of_whole_replies(aggregator: Aggregator) -> None:
    def total(spilled: bool) -> Vector:
        replies = [reply(aggregator, s, n, spilled) for s, n in [(1, 3), (2, 11), (3, 7)]]
        folded, rejected = fold(aggregator, replies)
        assert not rejected and folded.count == 3 and folded.total is not None
        return aggregator.finalize(folded.total)

    from_disk, in_memory = total(True), total(False)
    for name in SPECS:
        np.testing.assert_array_equal(from_disk.coefs[name], in_memory.coefs[name])
        assert from_disk.coefs[name].dtype == np.float32


def test_a_norm_bound_reads_the_spill_back_for_the_norm() -> None:
    aggregator = AveragingAggregator(weighting="uniform", max_norm=1.0)
    folded, rejected = fold(aggregator, [reply(aggregator, 1, 3, True)])
    assert not rejected and folded.total is not None
    bounded = aggregator.finalize(folded.total)
    assert bounded.norm() == pytest.approx(1.0, rel=1e-6)  # the update's norm is ~14
    np.testing.assert_allclose(bounded.coefs["w"], update(1).coefs["w"] / update(1).norm(), 1e-6)


def test_a_non_finite_reply_is_rejected_alone_and_the_sum_is_the_others() -> None:
    aggregator = AveragingAggregator()
    bad = aggregator.prepare(update(5), 4, 1)
    bad.vector("weighted_sum").coefs["w"][20, 3] = np.nan  # in the reply's third chunk
    poisoned = spill(bad, chunk_bytes=256)

    good = [reply(aggregator, 1, 3, True), reply(aggregator, 2, 11, True)]
    folded, rejected = fold(aggregator, [good[0], poisoned, good[1]])
    assert rejected == [
        "field 'weighted_sum' holds NaN or infinite values (array 'w': element 103 is nan)"
    ]
    assert folded.names == ["c0", "c2"] and folded.total is not None
    clean, _ = fold(aggregator, [reply(aggregator, 1, 3, True), reply(aggregator, 2, 11, True)])
    assert clean.total is not None
    got, want = aggregator.finalize(folded.total), aggregator.finalize(clean.total)
    for name in SPECS:
        np.testing.assert_array_equal(got.coefs[name], want.coefs[name])


def test_the_first_reply_is_kept_exactly_even_its_negative_zeros() -> None:
    aggregator = SumAggregator()
    zeros = Vector({n: np.full(shape, -0.0, np.float32) for n, (shape, _) in SPECS.items()})
    zeros.coefs["b"][1] = 0.0
    result = spill(aggregator.prepare(zeros, 1, 1), 1, chunk_bytes=64)
    folded, rejected = fold(aggregator, [result])
    assert not rejected and folded.total is not None
    total = folded.total.vector("sum")
    assert np.signbit(total.coefs["w"]).all()
    assert list(np.signbit(total.coefs["b"])) == [True, False, True, True, True]


def test_the_outlier_hook_judges_a_spilled_reply_by_its_norm_from_disk() -> None:
    aggregator = AveragingAggregator()
    config = ValidationConfig(max_norm_ratio=2.0, action="downweight", min_norms=2)

    def total(spilled: bool) -> Vector:
        replies = [reply(aggregator, s, 4, spilled) for s in (1, 2)]
        outlier = aggregator.prepare(update(3) * 50.0, 4, 1)
        replies.append(spill(outlier) if spilled else TrainResult(outlier, {}, 4, 1, 1.0))
        folded = _Fold(
            aggregator,
            Optimizer(lrate=1.0),
            update(0).specs(),
            validation=UpdateValidation(config),
        )
        for i, result in enumerate(replies):
            asyncio.run(folded.add(Named(f"c{i}"), result))  # type: ignore[arg-type]
        assert folded.count == 3 and folded.total is not None
        return aggregator.finalize(folded.total)

    from_disk, in_memory = total(True), total(False)
    # scaled down to twice the median norm: far from the 50x update, equal up to the norm's
    # rounding (summed per chunk from disk, per array in memory)
    assert from_disk.norm() < 2.0 * update(1).norm()
    for name in SPECS:
        np.testing.assert_allclose(from_disk.coefs[name], in_memory.coefs[name], rtol=1e-6)


def test_a_reply_that_fails_to_read_back_halfway_fails_the_round_sum(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Half of it is in the running sum and cannot come out: the round's sum is unusable
    # (the round fails, the global model stays), never silently half a reply.
    aggregator = SumAggregator()
    good, broken = reply(aggregator, 1, 3, True), reply(aggregator, 2, 3, True)
    real = SpilledVector.chunks

    def failing(self: SpilledVector) -> Iterator[tuple[str, int, np.ndarray]]:
        for i, chunk in enumerate(real(self)):
            if i == 1:
                raise OSError(5, "Input/output error")
            yield chunk

    monkeypatch.setattr(broken.spilled["sum"], "chunks", failing.__get__(broken.spilled["sum"]))
    folded, _ = fold(aggregator, [good])
    assert not folded.failure

    async def add_broken() -> None:
        with pytest.raises(OSError):
            await folded.add(Named("c1"), broken)  # type: ignore[arg-type]

    asyncio.run(add_broken())
    assert folded.names == ["c0"]
    assert folded.failure == "a staged reply failed halfway into the sum (OSError)"
