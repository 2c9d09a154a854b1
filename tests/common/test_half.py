"""Half precision (float16, bfloat16): bit-exact wire, float32 running sums, float32 master
weights on the server, and half-precision partials still checked against the model's dtype."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from fedpipe.common import codec, half
from fedpipe.common.aggregators import AveragingAggregator, GradientMaskedAveraging
from fedpipe.common.aggregators.base import InvalidPartialError
from fedpipe.common.codec import NonFiniteError, SpecError, decode_vector, encode_vector
from fedpipe.common.optim import BareWeights, Optimizer
from fedpipe.common.payload import PayloadAssembler, encode_payload
from fedpipe.common.summable import Summable
from fedpipe.common.vector import SpecMismatchError, Vector
from fedpipe.proto.fedpipe.v1 import tensor_pb2 as pb

BF16 = np.dtype(ml_dtypes.bfloat16)
#: Every bfloat16 bit pattern class: zeros, subnormals, the extremes, infinities, a NaN.
SPECIAL = np.array(
    [0x0000, 0x8000, 0x0001, 0x807F, 0x3F80, 0x7F7F, 0xFF7F, 0x7F80, 0xFF80, 0x7FC1, 0x3EAB],
    np.uint16,
)


def _bits(vector: Vector) -> dict[str, bytes]:
    return {n: np.ascontiguousarray(a).tobytes() for n, a in vector.to_numpy().coefs.items()}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_codec_round_trip_is_bit_exact(dtype: str) -> None:
    words = np.concatenate([SPECIAL, np.random.default_rng(0).integers(0, 1 << 16, 500)])
    vector = Vector({"w": words.astype(np.uint16).view(np.dtype(dtype)).reshape(-1, 1)})
    msg = pb.VectorProto.FromString(encode_vector(vector).SerializeToString())
    assert msg.tensors[0].spec.dtype == codec.dtype_to_enum(dtype)
    out = decode_vector(msg, vector.specs())
    assert out.specs() == vector.specs()
    assert _bits(out) == _bits(vector)


def test_torch_bfloat16_tensors_cross_to_numpy_and_back_bit_for_bit() -> None:
    torch = pytest.importorskip("torch")
    tensor = torch.from_numpy(SPECIAL.view(np.int16).copy()).view(torch.bfloat16)
    vector = Vector({"w": tensor})
    host = vector.to_numpy()
    assert host["w"].dtype == BF16
    assert host["w"].view(np.uint16).tolist() == SPECIAL.tolist()
    back = host.like(vector)  # numpy -> torch, on the tensor's device
    assert back["w"].dtype == torch.bfloat16
    assert torch.equal(back["w"].view(torch.int16), tensor.view(torch.int16))
    decoded = decode_vector(encode_vector(vector))
    assert decoded["w"].view(np.uint16).tolist() == SPECIAL.tolist()


def test_bfloat16_payload_streams_in_chunks_and_rejects_nonfinite_values() -> None:
    weights = np.random.default_rng(1).normal(size=(300, 7)).astype(BF16)
    payload = encode_payload({"w": Vector({"w": weights})}, chunk_size=64)
    assert payload.header.tensors[0].dtype == pb.DTYPE_BFLOAT16
    assembler = PayloadAssembler(payload.header, max_bytes=1 << 20, allow_nonfinite=False)
    for index, offset, chunk in payload.chunks():
        assembler.add_chunk(index, offset, bytes(chunk))
    got = assembler.finish()["w"]
    assert isinstance(got, Vector) and got["w"].dtype == BF16
    assert got["w"].tobytes() == weights.tobytes()

    weights[200, 3] = np.inf  # bfloat16's numpy kind is "V": still a float to the checks
    payload = encode_payload({"w": Vector({"w": weights})}, chunk_size=64)
    assembler = PayloadAssembler(payload.header, max_bytes=1 << 20, allow_nonfinite=False)
    with pytest.raises(NonFiniteError, match="element 1403 is inf"):
        for index, offset, chunk in payload.chunks():
            assembler.add_chunk(index, offset, bytes(chunk))
    assert not Vector({"w": weights}).is_finite()


def test_without_ml_dtypes_bfloat16_is_refused_saying_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    msg = encode_vector(Vector({"w": np.ones(2, BF16)}))
    monkeypatch.delitem(codec._DTYPES, pb.DTYPE_BFLOAT16)
    monkeypatch.setattr(half, "BFLOAT16", None)
    with pytest.raises(SpecError, match=r"tensor 'w': dtype code 13: bfloat16 .*ml-dtypes"):
        decode_vector(msg)


def test_a_thousand_tiny_fp16_updates_average_in_float32() -> None:
    update = np.float16(3e-4)  # 2.9993057e-4 in fp16
    aggregator = AveragingAggregator(weighting="uniform")
    partials = [
        aggregator.prepare(Vector({"w": np.full(4, update)}), n_samples=1, n_steps=1)
        for _ in range(1000)
    ]
    mean = aggregator.aggregate(partials)["w"]
    assert mean.dtype == np.float32
    np.testing.assert_allclose(mean, 2.9993057e-4, rtol=1e-6)  # the float32 mean
    fp16_sum = np.float16(0)
    for _ in range(1000):  # what an fp16 running sum gives: 10% short
        fp16_sum = np.float16(fp16_sum + update)
    assert float(fp16_sum) == 0.268798828125
    assert float(fp16_sum) / 1000 / float(mean[0]) == pytest.approx(0.8962, abs=1e-4)


def test_running_sums_take_half_partials_and_validation_still_wants_the_model_dtype() -> None:
    specs = Vector({"w": np.zeros(3, BF16)}).specs()
    aggregator = GradientMaskedAveraging(threshold=0.5)
    partial = aggregator.prepare(Vector({"w": np.array([1, -2, 3], BF16)}), 2, 1)
    aggregator.validate(partial, specs)
    total = partial.accumulator()
    assert total.vector("weighted_sum")["w"].dtype == np.float32
    partial.check_like(total, "partial")  # a bfloat16 record adds into the float32 sum
    total.add_(partial)
    assert total.vector("weighted_sum")["w"].tolist() == [4.0, -8.0, 12.0]

    mixed = Summable({"s": Vector({"h": np.ones(2, np.float16), "f": np.ones(2, np.float32)})})
    total = mixed.accumulator()
    total.add_(mixed)
    assert total.vector("s")["h"].dtype == np.float32
    assert total.vector("s")["h"].tolist() == total.vector("s")["f"].tolist() == [2.0, 2.0]
    assert mixed.vector("s")["f"].tolist() == [1.0, 1.0]  # copied, not summed into

    wrong = aggregator.prepare(Vector({"w": np.array([1, -2, 3], np.float32)}), 2, 1)
    with pytest.raises(InvalidPartialError, match="'w' has dtype float32, expected bfloat16"):
        aggregator.validate(wrong, specs)
    fp16 = Summable({"w": Vector({"w": np.ones(3, np.float16)})})
    with pytest.raises(SpecMismatchError, match="'w' has dtype float16, expected bfloat16"):
        Vector({"w": np.ones(3, BF16)}).check_accumulates(fp16.vector("w"))
    with pytest.raises(SpecMismatchError, match="'w' has dtype float64, expected float32"):
        Vector({"w": np.ones(3, np.float32)}).add_(Vector({"w": np.ones(3)}))


def test_server_steps_below_a_bfloat16_ulp_add_up_in_the_float32_master() -> None:
    model = BareWeights(Vector({"w": np.ones(2, BF16)}))
    optimizer = Optimizer(lrate=1.0)
    for _ in range(100):  # 1 + 1e-3 is 1 in bfloat16 (ulp 2^-7): a half model never moves
        optimizer.apply(model, Vector({"w": np.full(2, -1e-3, np.float32)}))
    assert model.get_weights()["w"].dtype == np.float32
    np.testing.assert_allclose(model.master["w"], 1.1, rtol=1e-5)
    assert model.weights["w"].dtype == BF16
    assert model.weights["w"].tolist() == [1.1015625, 1.1015625]  # bfloat16(1.1)
    model.master = Vector({"w": np.full(2, 2.0, np.float32)})  # a resumed checkpoint
    assert model.weights["w"].tolist() == [2.0, 2.0]


def test_server_adam_moments_are_float32_for_a_bfloat16_model() -> None:
    model = BareWeights(Vector({"w": np.zeros(3, BF16)}))
    optimizer = Optimizer(lrate=0.01, modules=["adam"])
    aggregate = AveragingAggregator().aggregate(
        [Summable({"weighted_sum": Vector({"w": np.ones(3, BF16)}), "total_weight": 1.0})]
    )
    optimizer.apply(model, aggregate)
    moments = [v for v in optimizer.get_state()["modules"][0]["state"].values()]
    dtypes = {v["w"].dtype for v in moments if isinstance(v, Vector)}
    assert dtypes == {np.dtype(np.float32)}
    np.testing.assert_allclose(model.master["w"], -0.01, rtol=1e-5)
