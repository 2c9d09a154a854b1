"""Reply headers checked against what their task expects, before anything is allocated."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedpipe.common.framing import FrameReceiver
from fedpipe.common.payload import CHUNK_FIELD, chunk_frame, encode_payload
from fedpipe.common.records import settings_value
from fedpipe.common.reply_limits import (
    RejectedReply,
    check_reply_header,
    eval_reply_limits,
    train_reply_limits,
)
from fedpipe.common.vector import Vector
from fedpipe.proto.fedpipe.v1 import federation_pb2 as pb

WEIGHTS = Vector({"kernel": np.zeros((4, 3), np.float32), "bias": np.zeros(3, np.float32)})
TRAIN = train_reply_limits(WEIGHTS.specs())


def header(state: dict[str, Any]) -> Any:
    return encode_payload(state).header


def partial(vector: Any) -> dict[str, Any]:
    return {"partial": {"weighted_sum": vector, "total_weight": 1.0}, "aux_vars": {}}


def test_an_honest_train_reply_passes() -> None:
    state = partial(WEIGHTS) | {"aux_vars": {"scaffold": {"delta": WEIGHTS}}}
    check_reply_header(header(state), TRAIN)


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        (partial(np.zeros(15, np.float32)), r"partial\.weighted_sum: tensor 0 .* not part of a"),
        (
            partial(Vector({"kernel": np.zeros((4, 3), np.float32), "bias": np.zeros(3)})),
            r"weighted_sum does not have the model's specs: array 'bias' has dtype float64",
        ),
        (
            partial(Vector({"kernel": np.zeros((5, 3), np.float32)})),
            r"names differ: missing \['bias'\]",
        ),
        (
            partial(WEIGHTS) | {"aux_vars": {f"a{i}": {"v": WEIGHTS} for i in range(8)}},
            r"payload holds 9 Vectors \(.*\), expected at most 8",
        ),
    ],
    ids=["plain-array", "dtype", "missing-array", "too-many-vectors"],
)
def test_a_train_reply_the_task_does_not_expect_is_refused(state: Any, reason: str) -> None:
    with pytest.raises(RejectedReply, match=reason):
        check_reply_header(header(state), TRAIN)


def test_an_eval_reply_is_bounded_by_the_metric_states() -> None:
    limits = eval_reply_limits(["loss", "accuracy"])  # scalars only: no Vector, no byte
    honest = {"metrics": {"loss": {"loss_sum": 5.0, "n": 10}, "accuracy": {"correct": 5, "n": 10}}}
    check_reply_header(header(honest), limits)
    bloated = {"metrics": {"loss": {"loss_sum": 5.0, "n": Vector({"x": np.zeros(1 << 20)})}}}
    with pytest.raises(RejectedReply, match=r"1 Vectors \(payload.metrics.loss.n\)"):
        check_reply_header(header(bloated), limits)


def test_a_refused_payload_is_skipped_and_the_stream_stays_in_sync() -> None:
    receiver = FrameReceiver(pb.ClientMessage, 1 << 20)
    payload = encode_payload(partial(np.zeros(15, np.float32)), chunk_size=16)
    message = pb.ClientMessage(reply=pb.Reply(task_id=1, payload=payload.header))
    receiver.skip(message)
    for tensor, offset, data in payload.chunks():
        assert receiver.feed(chunk_frame(CHUNK_FIELD, tensor, offset, data)) is None
    assert not receiver.busy and receiver.received_bytes == payload.total_bytes
    info = pb.Reply(task_id=2, info=settings_value({"n_samples": 1}))
    got = receiver.feed(pb.ClientMessage(reply=info).SerializeToString())
    assert got is not None and got.message.reply.task_id == 2


def test_a_payload_dropped_half_way_frees_its_arrays_and_skips_the_rest() -> None:
    receiver = FrameReceiver(pb.ClientMessage, 1 << 20)
    payload = encode_payload(partial(WEIGHTS), chunk_size=16)
    message = pb.ClientMessage(reply=pb.Reply(task_id=1, payload=payload.header))
    chunks = list(payload.chunks())
    receiver.feed(message.SerializeToString())
    receiver.feed(chunk_frame(CHUNK_FIELD, *chunks[0]))
    assert receiver.pending is not None
    assert receiver.skip_rest() == payload.total_bytes - 16
    assert receiver.pending is None and not receiver.assembling
    for chunk in chunks[1:]:
        assert receiver.feed(chunk_frame(CHUNK_FIELD, *chunk)) is None
    assert not receiver.busy
