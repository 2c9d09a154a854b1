"""The client's handling of the run setup, without a network."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedpipe.client.daemon import ClientDaemon
from fedpipe.common.aggregators.averaging import SumAggregator
from fedpipe.common.codec import wire_dtype
from fedpipe.common.config import ClientConfig
from fedpipe.common.data import Dataset
from fedpipe.common.framing import FrameReceiver, envelope_frames
from fedpipe.common.payload import encode_payload
from fedpipe.common.records import settings_data, settings_value, task_state
from fedpipe.common.staged_start import StagedStart
from fedpipe.common.training import RunSetup
from fedpipe.common.vector import Vector
from fedpipe.proto.fedpipe.v1 import federation_pb2 as pb
from fedpipe.proto.fedpipe.v1 import tensor_pb2

IMPORT_PATH = "fedpipe.common.models.linear:SoftmaxRegression"


def setup_task(model: dict[str, Any], **changes: Any) -> pb.Task:
    chunk = {"chunk_bytes": changes.pop("chunk_bytes")} if "chunk_bytes" in changes else {}
    setup = RunSetup(
        model=model,
        client_optimizer=changes.pop("client_optimizer", {"lrate": 0.1}),
        aggregator=changes.pop("aggregator", "averaging"),
        metrics=["loss"],
        training={"batch_size": 4},
        **changes,
    )
    task = pb.Task(
        task_id=1,
        kind=pb.TASK_KIND_INITIALIZE,
        settings=settings_value({**setup.to_data(), **chunk}),
    )
    for name, shape in (("kernel", [4, 3]), ("bias", [3])):
        code = wire_dtype(np.dtype("float32"), name)[0]
        task.weight_specs.append(tensor_pb2.TensorSpec(name=name, dtype=code, shape=shape))
    return task


def daemon(**config: Any) -> ClientDaemon:
    data = Dataset(np.zeros((8, 4), np.float32), np.zeros(8, np.int64))
    return ClientDaemon(ClientConfig(dataset="digits", name="c", **config), data, None)


async def test_a_model_import_path_from_the_server_is_refused_unless_trusted() -> None:
    task = setup_task({"name": IMPORT_PATH, "config": {"n_features": 4, "n_classes": 3}})
    client = daemon()
    reply, payload = await client._handle(task, {})
    assert payload is None and client.trainer is None
    assert "an import path this client does not trust" in reply.error
    assert "trusted_models" in reply.error

    trusting = daemon(trusted_models=[IMPORT_PATH])
    reply, _ = await trusting._handle(task, {})
    assert reply.error == "" and trusting.trainer is not None
    assert trusting.trainer.model.weight_specs()["kernel"].shape == (4, 3)


async def test_a_setup_whose_model_differs_from_the_servers_specs_is_an_error_reply() -> None:
    task = setup_task({"name": "softmax-regression", "config": {"n_features": 5, "n_classes": 3}})
    reply, _ = await daemon()._handle(task, {})
    assert "the model built from the setup does not match the server's" in reply.error
    assert "'kernel' has shape (5, 3), expected (4, 3)" in reply.error


def test_client_config_needs_one_data_source() -> None:
    with pytest.raises(ValueError, match="no training data: set 'data'"):
        ClientConfig()
    with pytest.raises(ValueError, match="'data' and 'dataset' are two sources"):
        ClientConfig(data="x.npz", dataset="digits")
    with pytest.raises(ValueError, match=r"train_fn='mypkg\.train:train' trains on a torch"):
        ClientConfig(dataset="digits", train_fn="mypkg.train:train")
    with pytest.raises(ValueError, match=r"'mypkg/data\.py' is not an import path"):
        ClientConfig(loaders="mypkg/data.py")
    assert ClientConfig(loaders="mypkg.data:loaders").loaders == "mypkg.data:loaders"


async def test_a_numpy_model_on_a_gpu_client_fails_the_setup_with_a_clear_error() -> None:
    task = setup_task({"name": "softmax-regression", "config": {"n_features": 4, "n_classes": 3}})
    client = daemon(device="cuda:0")
    reply, payload = await client._handle(task, {})
    assert payload is None and client.trainer is None
    assert reply.error == (
        "DeviceError: device='cuda:0', but model 'softmax-regression' is a numpy model that "
        "runs on the CPU only; set device = 'cpu' or use a torch model (TorchModel)"
    )
    assert client.setup_error == reply.error


async def train_round(
    client: ClientDaemon, weights: Vector, into: bool, settings: dict[str, Any] | None = None
) -> list[bytes]:
    """A train task through the client's frame receiver (receiving into its model or not);
    the reply's frames, its header and chunks byte for byte, its info without the clock."""
    task = pb.Task(
        task_id=2, kind=pb.TASK_KIND_TRAIN, round=1, settings=settings_value(settings or {})
    )
    payload = encode_payload(task_state(weights, {}), 16)
    task.payload.CopyFrom(payload.header)
    receiver = FrameReceiver(pb.ServerMessage, client.max_payload)
    receiver.into = client._landing() if into else None
    for frame in envelope_frames(pb.ServerMessage(task=task), payload):
        got = receiver.feed(frame)
    assert got is not None
    received = got.payload["weights"]
    assert client.trainer is not None
    model = client.trainer.model.host_weights()
    assert model is not None
    assert all(np.shares_memory(received.coefs[n], model[n]) == into for n in model)
    reply, out = await client._handle(got.message.task, got.payload)
    assert reply.error == ""
    info = settings_data(reply.info)
    assert info.pop("seconds") >= 0
    assert out is not None
    client.last_arrays = out.arrays  # type: ignore[attr-defined]  # which path made them
    frames = envelope_frames(pb.ClientMessage(reply=pb.Reply(payload=reply.payload)), out)
    return [repr(sorted(info.items())).encode(), *frames]


async def test_weights_received_into_the_model_give_the_same_reply_bytes() -> None:
    task = setup_task({"name": "softmax-regression", "config": {"n_features": 4, "n_classes": 3}})
    rng = np.random.default_rng(1)
    data = Dataset(rng.normal(size=(8, 4)).astype(np.float32), rng.integers(0, 3, 8))
    replies = []
    for into in (True, False):
        client = ClientDaemon(ClientConfig(dataset="digits", name="c"), data, None)
        assert (await client._handle(task, {}))[0].error == ""
        rounds = []
        for seed in (2, 3):  # the second round lands in the model the first one trained
            weights = {"kernel": (4, 3), "bias": (3,)}
            draw = np.random.default_rng(seed)
            global_weights = Vector(
                {n: draw.normal(size=s).astype(np.float32) for n, s in weights.items()}
            )
            rounds.append(await train_round(client, global_weights, into))
        replies.append(rounds)
    assert replies[0] == replies[1]
    assert len(replies[0][0]) > 3  # info, the reply's envelope and several chunk frames


async def staged_and_kept_replies(
    task: pb.Task, state_dir: Path, settings: dict[str, Any] | None = None
) -> tuple[list[list[bytes]], list[bool]]:
    """Two rounds' reply frames with the start weights on disk and in memory; for each,
    whether the reply was streamed from the model's arrays (no update array in memory)."""
    rng = np.random.default_rng(1)
    data = Dataset(rng.normal(size=(8, 4)).astype(np.float32), rng.integers(0, 3, 8))
    replies, streamed = [], []
    for stage in (True, False):
        config = ClientConfig(dataset="digits", name="c", state_dir=state_dir)
        client = ClientDaemon(config, data, None)
        client.stage_start = stage
        assert (await client._handle(task, {}))[0].error == ""
        rounds = []
        for seed in (2, 3):
            draw = np.random.default_rng(seed)
            global_weights = Vector(
                {n: draw.normal(size=s).astype(np.float32) for n, s in WEIGHTS.items()}
            )
            rounds.append(await train_round(client, global_weights, True, settings))
            arrays = client.last_arrays  # type: ignore[attr-defined]
            streamed.append(not any(isinstance(a, np.ndarray) and a.size > 1 for a in arrays))
        replies.append(rounds)
        # the client's state file only: the start file never had a name
        assert [n for n in os.listdir(state_dir) if not n.startswith("state-")] == []
    return replies, streamed


WEIGHTS = {"kernel": (4, 3), "bias": (3,)}
SOFTMAX = {"name": "softmax-regression", "config": {"n_features": 4, "n_classes": 3}}


@pytest.mark.parametrize("aggregator", ["averaging", "sum", "median", "gradient-masked-averaging"])
async def test_start_weights_on_disk_give_the_same_reply_bytes(
    aggregator: str, tmp_path: Path
) -> None:
    # chunks of 6 bytes cut float32 elements in two: each chunk is made from whole elements
    optimizer = {"lrate": 0.1, "regularizers": [["fedprox", {"mu": 0.5}]]}
    task = setup_task(SOFTMAX, aggregator=aggregator, chunk_bytes=6, client_optimizer=optimizer)
    replies, streamed = await staged_and_kept_replies(task, tmp_path)
    assert replies[0] == replies[1]
    assert streamed == [True, True, False, False]
    assert len(replies[0][0]) > 10  # info, the envelope and many chunk frames


async def test_client_level_dp_keeps_the_start_weights_in_memory_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    task = setup_task(SOFTMAX, aggregator="averaging")
    dp = {"dp": {"clip": 1.0, "noise_std": 0.5}}
    with caplog.at_level(logging.INFO, logger="fedpipe.common.training"):
        _, streamed = await staged_and_kept_replies(task, tmp_path, dp)
    assert streamed == [False] * 4
    said = [r.getMessage() for r in caplog.records if "start weights" in r.getMessage()]
    assert said == [
        "the round's start weights stay in memory: client-level DP clips the whole update"
    ]


def test_a_start_file_that_fails_to_write_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, data: Any, offset: int) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError, match="No space left"):
        StagedStart({"w": np.ones(10, np.float32)}, tmp_path)
    assert os.listdir(tmp_path) == []


async def test_a_start_file_that_cannot_be_written_keeps_the_start_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    expected, _ = await staged_and_kept_replies(setup_task(SOFTMAX), tmp_path)

    def full(fd: int, data: Any, offset: int) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with caplog.at_level(logging.WARNING, logger="fedpipe.common.training"):
        replies, streamed = await staged_and_kept_replies(setup_task(SOFTMAX), tmp_path)
    assert replies == expected and streamed == [False] * 4
    assert "start weights stay in memory: writing them failed: [Errno 28]" in caplog.text


def test_a_reply_cut_short_leaves_no_start_file(tmp_path: Path) -> None:
    staged = StagedStart({"w": np.arange(10, dtype=np.float32)}, tmp_path)
    end = {"w": np.zeros(10, np.float32)}
    partial, deferred = staged.prepared(end, SumAggregator(), n_samples=3, n_steps=1)
    payload = encode_payload({"partial": {**partial.fields, **deferred}}, 8)
    chunks = payload.chunks()
    _, _, first = next(chunks)
    assert np.frombuffer(first, np.float32).tolist() == [0.0, 1.0]  # start - end
    assert os.listdir(tmp_path) == []
    del chunks, payload, deferred, staged
    assert os.listdir(tmp_path) == []


def test_a_refusal_grpc_turned_into_internal_is_explained() -> None:
    import grpc
    from grpc.aio import AioRpcError, Metadata

    from fedpipe.client.daemon import _status_text

    core = AioRpcError(grpc.StatusCode.INTERNAL, Metadata(), Metadata(), "Internal error from Core")
    assert _status_text(core) == (
        "INTERNAL: Internal error from Core (the server ended the session before reading the "
        "hello; it may be busy)"
    )
    full = AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, Metadata(), Metadata(), "full")
    assert _status_text(full) == "RESOURCE_EXHAUSTED: full"
