"""A malicious or buggy peer speaking the wire protocol by hand.

The rule under test (docs/security.md, "Untrusted network input"): every network input is
untrusted; a bad one is rejected with a logged reason, the round goes on with the honest
clients, and the server never crashes, hangs or grows without bound because of a client.

The same goes for a client facing a hostile server: it never runs code the server names.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedpipe.common.framing import FrameReceiver, Received, envelope_frames
from fedpipe.common.outcome import ExitCode
from fedpipe.common.payload import CHUNK_FIELD, chunk_frame, encode_payload
from fedpipe.common.protocol import PROTOCOL_VERSION, ProtocolError
from fedpipe.common.records import settings_value, weights_from
from fedpipe.common.training import RunSetup
from fedpipe.common.vector import Vector
from fedpipe.proto.fedpipe.v1 import federation_pb2 as pb
from fedpipe.proto.fedpipe.v1 import tensor_pb2
from tests.integration.conftest import (
    RawClient,
    finish,
    running_server,
    server_config,
    spawn_client,
)

#: A 40 MB model: large enough that a client which stops reading fills gRPC's windows.
BIG_MODEL = {"name": "softmax-regression", "config": {"n_features": 1_000_000, "n_classes": 10}}


# ---- a hand-written client ----------------------------------------------------------------


class Peer(RawClient):
    """A raw client that also assembles the server's payloads."""

    def __init__(self, port: int, name: str) -> None:
        super().__init__(port)
        self.name = name
        self.receiver = FrameReceiver(pb.ServerMessage, 1 << 31)

    async def join(self, *, token: str = "", n_eval: int = 0) -> None:
        hello = pb.Hello(
            protocol_version=PROTOCOL_VERSION,
            client_name=self.name,
            token=token,
            data=pb.DataSummary(n_train_samples=100, n_eval_samples=n_eval),
        )
        await self.send(pb.ClientMessage(hello=hello).SerializeToString())
        welcome = await self.receive()
        assert welcome.WhichOneof("kind") == "welcome", welcome

    async def task(self) -> Received[pb.ServerMessage]:
        """The next task with its assembled payload."""
        while True:
            frame = await self.call.read()
            assert frame is not grpc.aio.EOF, f"{self.name}: server closed the stream"
            got = self.receiver.feed(frame)
            if got is not None and got.message.WhichOneof("kind") == "task":
                return got

    async def initialize(self) -> None:
        got = await self.task()
        assert got.message.task.kind == pb.TASK_KIND_INITIALIZE
        await self.reply(got.message.task.task_id)

    async def reply(
        self, task_id: int, info: dict[str, Any] | None = None, state: Any = None
    ) -> None:
        message = pb.ClientMessage(reply=pb.Reply(task_id=task_id))
        if info is not None:
            message.reply.info.CopyFrom(settings_value(info))
        payload = None if state is None else encode_payload(state, 1 << 16)
        if payload is not None:
            message.reply.payload.CopyFrom(payload.header)
        for frame in envelope_frames(message, payload):
            await self.send(frame)

    async def stream_ended(self, timeout: float) -> bool:
        """True if the server ends this stream within ``timeout`` seconds."""
        try:
            while True:
                frame = await asyncio.wait_for(self.call.read(), timeout)
                if frame is grpc.aio.EOF:
                    return True
        except grpc.aio.AioRpcError:
            return True
        except TimeoutError:
            return False


def train_info(**changes: Any) -> dict[str, Any]:
    info = {"n_samples": 100, "n_steps": 1, "loss_sum": 1.0, "n_samples_seen": 100, "seconds": 0.1}
    info.update(changes)
    return info


def train_state(weights: Vector, *, value: float = 0.0, weight: float = 1.0) -> dict[str, Any]:
    """An averaging partial whose weighted update is ``value`` everywhere."""
    return {
        "partial": {"weighted_sum": weights.full_like(value * weight), "total_weight": weight},
        "aux_vars": {},
    }


def metric_state(correct: Any = 5, n: Any = 10) -> dict[str, Any]:
    return {
        "metrics": {"loss": {"loss_sum": 5.0, "n": 10}, "accuracy": {"correct": correct, "n": n}}
    }


Behaviour = Callable[[Peer, Received[pb.ServerMessage]], Awaitable[None]]


async def honest_train(peer: Peer, got: Received[pb.ServerMessage]) -> None:
    await peer.reply(got.message.task.task_id, train_info(), train_state(weights_from(got.payload)))


async def honest_eval(peer: Peer, got: Received[pb.ServerMessage]) -> None:
    await peer.reply(got.message.task.task_id, {"n_samples": 10, "seconds": 0.1}, metric_state())


async def play(
    peer: Peer,
    train: Behaviour = honest_train,
    evaluate: Behaviour = honest_eval,
    *,
    delay: float = 0.0,
    n_eval: int = 0,
) -> None:
    """Join, then answer every task with ``train`` / ``evaluate`` after ``delay`` seconds."""
    await peer.join(n_eval=n_eval)
    await peer.initialize()
    while True:
        got = await peer.task()
        kind = got.message.task.kind
        if kind == pb.TASK_KIND_STOP:
            return
        await asyncio.sleep(delay)
        await (train if kind == pb.TASK_KIND_TRAIN else evaluate)(peer, got)


class Peers:
    """Raw clients and their background tasks, all closed when the test ends."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.peers: list[Peer] = []
        self.tasks: list[asyncio.Task[None]] = []

    def new(self, name: str) -> Peer:
        peer = Peer(self.port, name)
        self.peers.append(peer)
        return peer

    def start(self, name: str, *args: Any, **kwargs: Any) -> Peer:
        peer = self.new(name)
        self.tasks.append(asyncio.create_task(play(peer, *args, **kwargs)))
        return peer

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for peer in self.peers:
            await peer.close()


@pytest.fixture
async def peers_of() -> AsyncIterator[Callable[[int], Peers]]:
    made: list[Peers] = []

    def make(port: int) -> Peers:
        made.append(Peers(port))
        return made[-1]

    yield make
    for peers in made:
        await peers.close()


def logged(caplog: pytest.LogCaptureFixture, *parts: str) -> bool:
    return any(all(p in r.getMessage() for p in parts) for r in caplog.records)


# ---- the round loop must survive any reply -----------------------------------------------


async def test_unknown_aux_var_in_the_first_reply_does_not_crash_the_run(
    tmp_path: Path, peers_of: Callable[[int], Peers], caplog: pytest.LogCaptureFixture
) -> None:
    config = server_config(tmp_path, rounds=1, min_clients=2, round_timeout=5.0, eval_every=0)

    async def evil_aux(peer: Peer, got: Received[pb.ServerMessage]) -> None:
        state = train_state(weights_from(got.payload))
        state["aux_vars"] = {"evil": {"x": 1.0}}
        await peer.reply(got.message.task.task_id, train_info(), state)

    async with running_server(config) as server:
        peers = peers_of(config.port)
        peers.start("mallory", evil_aux)
        peers.start("honest", delay=0.5)  # replies after mallory
        summary = await asyncio.wait_for(server, 15)
    assert summary.history[0]["clients"] == ["honest"]
    assert logged(caplog, "mallory", "evil")


async def test_zero_total_weight_does_not_crash_the_run(
    tmp_path: Path, peers_of: Callable[[int], Peers], caplog: pytest.LogCaptureFixture
) -> None:
    config = server_config(tmp_path, rounds=2, min_clients=1, round_timeout=5.0, eval_every=0)

    async def weightless(peer: Peer, got: Received[pb.ServerMessage]) -> None:
        state = train_state(weights_from(got.payload), weight=0.0)
        await peer.reply(got.message.task.task_id, train_info(n_samples=0), state)

    async with running_server(config) as server:
        peers_of(config.port).start("empty", weightless)
        summary = await asyncio.wait_for(server, 15)
    assert summary.status == "failed" and "round 1: aggregation failed" in summary.reason
    assert summary.rounds_completed == 0
    assert [r["failed"] for r in summary.history] == ["aggregation failed"]


async def test_metric_state_with_a_vector_for_a_count_does_not_crash_the_run(
    tmp_path: Path, peers_of: Callable[[int], Peers], caplog: pytest.LogCaptureFixture
) -> None:
    config = server_config(tmp_path, rounds=1, min_clients=1, round_timeout=5.0)

    async def vector_count(peer: Peer, got: Received[pb.ServerMessage]) -> None:
        state = metric_state(correct=Vector({"a": np.ones(3)}))
        await peer.reply(got.message.task.task_id, {"n_samples": 10, "seconds": 0.1}, state)

    async with running_server(config) as server:
        peers_of(config.port).start("mallory", honest_train, vector_count, n_eval=10)
        summary = await asyncio.wait_for(server, 15)
    assert summary.rounds_completed == 1
    assert "accuracy" not in summary.history[0]
    assert logged(caplog, "mallory", "correct")


async def test_a_rejected_eval_reply_leaves_the_merged_metrics_unchanged(
    tmp_path: Path, peers_of: Callable[[int], Peers], caplog: pytest.LogCaptureFixture
) -> None:
    config = server_config(tmp_path, rounds=1, min_clients=2, round_timeout=5.0)

    async def half_valid(peer: Peer, got: Received[pb.ServerMessage]) -> None:
        state = metric_state(correct=5, n=Vector({"a": np.ones(3)}))
        await peer.reply(got.message.task.task_id, {"n_samples": 10, "seconds": 0.1}, state)

    async with running_server(config) as server:
        peers = peers_of(config.port)
        peers.start("honest", n_eval=10)  # 5 of 10 correct
        peers.start("mallory", honest_train, half_valid, delay=0.5, n_eval=10)
        summary = await asyncio.wait_for(server, 15)
    assert logged(caplog, "mallory", "refused", "metrics.accuracy.n")  # before reception
    assert summary.history[0]["accuracy"] == 0.5


async def test_a_rejected_train_reply_does_not_reach_the_aggregate(
    tmp_path: Path, peers_of: Callable[[int], Peers], caplog: pytest.LogCaptureFixture
) -> None:
    config = server_config(
        tmp_path,
        rounds=1,
        min_clients=2,
        round_timeout=5.0,
        eval_every=0,
        server_optimizer={"lrate": 1.0, "modules": ["scaffold-server"]},
    )
    before: list[Vector] = []

    def scaffold(delta: Any) -> dict[str, Any]:
        return {"scaffold": {"delta": delta}}

    async def first(peer: Peer, got: Received[pb.ServerMessage]) -> None:
        weights = weights_from(got.payload)
        before.append(weights.copy())
        state = train_state(weights)  # a zero update
        state["aux_vars"] = scaffold(weights.zeros_like())
        await peer.reply(got.message.task.task_id, train_info(), state)

    async def swapped(peer: Peer, got: Received[pb.ServerMessage]) -> None:
        weights = weights_from(got.payload)
        state = train_state(weights, value=100.0)  # rejected: must not move the model
        state["aux_vars"] = scaffold(1.0)
        await peer.reply(got.message.task.task_id, train_info(), state)

    async with running_server(config) as server:
        peers = peers_of(config.port)
        peers.start("honest", first)
        peers.start("mallory", swapped, delay=0.5)
        summary = await asyncio.wait_for(server, 15)
    assert logged(caplog, "mallory", "rejected reply")
    assert summary.history[0]["clients"] == ["honest"]
    assert summary.weights.allclose(before[0], atol=1e-6)


async def test_a_scaffold_record_claiming_a_client_count_is_rejected(
    tmp_path: Path, peers_of: Callable[[int], Peers], caplog: pytest.LogCaptureFixture
) -> None:
    config = server_config(
        tmp_path,
        rounds=1,
        min_clients=2,
        round_timeout=5.0,
        eval_every=0,
        server_optimizer={"lrate": 1.0, "modules": ["scaffold-server"]},
    )

    def with_scaffold(extra: dict[str, Any]) -> Behaviour:
        async def reply(peer: Peer, got: Received[pb.ServerMessage]) -> None:
            weights = weights_from(got.payload)
            state = train_state(weights)
            state["aux_vars"] = {"scaffold": {"delta": weights.zeros_like(), **extra}}
            await peer.reply(got.message.task.task_id, train_info(), state)

        return reply

    async with running_server(config) as server:
        peers = peers_of(config.port)
        peers.start("honest", with_scaffold({}))
        peers.start("mallory", with_scaffold({"new_clients": 1e300}), delay=0.3)
        summary = await asyncio.wait_for(server, 15)
    assert summary.history[0]["clients"] == ["honest"]  # the server counts names
    assert logged(caplog, "mallory", "fields ['delta'], got ['delta', 'new_clients']")


# ---- the transport must survive any peer ---------------------------------------------------


async def test_a_client_that_stops_reading_does_not_hang_the_end_of_the_run(
    tmp_path: Path, peers_of: Callable[[int], Peers]
) -> None:
    config = server_config(
        tmp_path,
        rounds=1,
        min_clients=1,
        round_timeout=1.0,
        eval_every=0,
        model=BIG_MODEL,
        chunk_mib=0.25,
        checkpoint=False,
    )
    async with running_server(config) as server:
        sloth = peers_of(config.port).new("sloth")
        await sloth.join()
        await sloth.initialize()  # then never reads again: the 40 MB train payload backs up
        started = time.monotonic()
        done, _ = await asyncio.wait({server}, timeout=6)
    assert done, f"the run had not ended {time.monotonic() - started:.0f}s after the round began"
    assert server.result().history[0]["failed"]


async def test_the_round_deadline_never_cuts_a_payload_in_two(
    tmp_path: Path, peers_of: Callable[[int], Peers]
) -> None:
    config = server_config(
        tmp_path,
        rounds=2,
        min_clients=1,
        round_timeout=1.0,
        eval_every=0,
        model=BIG_MODEL,
        chunk_mib=0.25,
        checkpoint=False,
    )
    async with running_server(config) as server:
        slow = peers_of(config.port).new("slow")
        await slow.join()
        await slow.initialize()
        await asyncio.sleep(2.5)  # busy past round 1's deadline, then reads everything
        kinds = []
        try:
            while True:
                got = await asyncio.wait_for(slow.task(), 10)
                kinds.append(got.message.task.kind)
                if got.message.task.kind == pb.TASK_KIND_STOP:
                    break
        except AssertionError:
            pass  # the server ended the stream: acceptable, a cut payload is not
        except ProtocolError as exc:
            pytest.fail(f"after {kinds}: {exc}")
        await asyncio.wait_for(server, 10)


async def test_an_unsolicited_payload_is_refused_before_allocation(
    tmp_path: Path, peers_of: Callable[[int], Peers], caplog: pytest.LogCaptureFixture
) -> None:
    config = server_config(tmp_path, rounds=1, min_clients=2, round_timeout=5.0)
    async with running_server(config):
        mallory = peers_of(config.port).new("mallory")
        await mallory.join()
        header = tensor_pb2.PayloadHeader(
            tensors=[
                tensor_pb2.TensorSpec(name="x", dtype=tensor_pb2.DTYPE_UINT8, shape=[1 << 30])
            ],
            total_bytes=1 << 30,
        )
        header.structure.map_value.entries.add(key="x").value.tensor_ref.index = 0
        reply = pb.Reply(task_id=12345, payload=header)  # no such task
        await mallory.send(pb.ClientMessage(reply=reply).SerializeToString())
        await mallory.send(chunk_frame(CHUNK_FIELD, 0, 0, b"\x00" * (1 << 20)))
        assert await mallory.stream_ended(3.0)
    assert logged(caplog, "mallory", "broke the protocol")


async def test_a_payload_the_server_cannot_allocate_ends_the_session(
    tmp_path: Path, peers_of: Callable[[int], Peers], caplog: pytest.LogCaptureFixture
) -> None:
    # 64 TiB allowed: stands for the default 16 GiB on a host with less memory than that.
    config = server_config(tmp_path, rounds=1, min_clients=2, max_payload_mib=float(1 << 26))
    async with running_server(config):
        mallory = peers_of(config.port).new("mallory")
        await mallory.join()
        size = 1 << 45  # 32 TiB
        header = tensor_pb2.PayloadHeader(
            tensors=[tensor_pb2.TensorSpec(name="x", dtype=tensor_pb2.DTYPE_UINT8, shape=[size])],
            total_bytes=size,
        )
        header.structure.map_value.entries.add(key="x").value.tensor_ref.index = 0
        await mallory.send(
            pb.ClientMessage(reply=pb.Reply(task_id=1, payload=header)).SerializeToString()
        )
        assert await mallory.stream_ended(3.0)
    assert logged(caplog, "mallory")


async def test_a_header_of_many_tiny_tensors_does_not_block_the_server(
    tmp_path: Path, peers_of: Callable[[int], Peers]
) -> None:
    config = server_config(tmp_path, rounds=1, min_clients=2)
    n = 1 << 17
    header = tensor_pb2.PayloadHeader(total_bytes=n)
    header.tensors.extend([tensor_pb2.TensorSpec(dtype=tensor_pb2.DTYPE_UINT8, shape=[1])] * n)
    refs = header.structure.map_value.entries.add(key="partial").value.list_value
    for i in range(n):
        refs.values.add().tensor_ref.index = i
    frame = pb.ClientMessage(reply=pb.Reply(task_id=1, payload=header)).SerializeToString()

    async with running_server(config):
        mallory = peers_of(config.port).new("mallory")
        await mallory.join()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{config.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="fedpipe.v1.Federation")
            await health.Check(request)
            await mallory.send(frame)
            worst = 0.0
            until = time.monotonic() + 3.0
            while time.monotonic() < until:
                start = time.monotonic()
                await health.Check(request, timeout=10)
                await asyncio.sleep(0.02)
                worst = max(worst, time.monotonic() - start)
    assert worst < 0.5, f"the event loop was blocked for {worst:.2f}s"


async def test_a_session_that_never_says_hello_is_closed(
    tmp_path: Path, peers_of: Callable[[int], Peers]
) -> None:
    config = server_config(tmp_path, rounds=1, min_clients=1, hello_timeout=0.5)
    async with running_server(config):
        peers = peers_of(config.port)
        mute = [peers.new(f"mute-{i}") for i in range(20)]
        for peer in mute:
            # beyond PENDING_PER_PEER waiting at once the server refuses the stream
            # (RESOURCE_EXHAUSTED), which a loaded machine can show before it is awaited here
            with contextlib.suppress(grpc.aio.AioRpcError):
                await peer.call.wait_for_connection()
        ended = await asyncio.gather(*(peer.stream_ended(3.0) for peer in mute))
    assert all(ended), f"{ended.count(False)} of {len(mute)} silent sessions still open"


async def test_a_valid_token_cannot_take_over_another_clients_session(
    tmp_path: Path, peers_of: Callable[[int], Peers]
) -> None:
    tokens = {"alice": "tok-alice", "mallory": "tok-mallory"}
    config = server_config(tmp_path, rounds=1, min_clients=3, tokens=tokens)
    async with running_server(config):
        peers = peers_of(config.port)
        alice = peers.new("alice")
        await alice.join(token="tok-alice")
        mallory = peers.new("alice")
        try:
            await mallory.join(token="tok-mallory")
        except grpc.aio.AioRpcError:
            pass  # refused: fine
        assert not await alice.stream_ended(1.0), "alice was disconnected by mallory's hello"


# ---- attacks that are handled: each is logged, the round goes on with the honest client -----


def _header_then(*chunks: tuple[int, int, bytes]) -> Behaviour:
    """Announce an honest payload, then send ``chunks`` (tensor, offset, data) instead."""

    async def reply(peer: Peer, got: Received[pb.ServerMessage]) -> None:
        payload = encode_payload(train_state(weights_from(got.payload)), 1 << 16)
        message = pb.ClientMessage(reply=pb.Reply(task_id=got.message.task.task_id))
        message.reply.info.CopyFrom(settings_value(train_info()))
        message.reply.payload.CopyFrom(payload.header)
        await peer.send(message.SerializeToString())
        for tensor, offset, data in chunks:
            await peer.send(chunk_frame(CHUNK_FIELD, tensor, offset, data))

    return reply


def _send(frame: bytes) -> Behaviour:
    async def reply(peer: Peer, got: Received[pb.ServerMessage]) -> None:
        await peer.send(frame)

    return reply


def _state(make: Callable[[Vector], Any], **info: Any) -> Behaviour:
    async def reply(peer: Peer, got: Received[pb.ServerMessage]) -> None:
        state = make(weights_from(got.payload))
        await peer.reply(got.message.task.task_id, train_info(**info), state)

    return reply


def _deep_info(depth: int) -> Behaviour:
    """Info nested ``depth`` maps deep (built by hand: the encoder refuses it)."""

    async def reply(peer: Peer, got: Received[pb.ServerMessage]) -> None:
        message = pb.ClientMessage(reply=pb.Reply(task_id=got.message.task.task_id))
        message.reply.info.CopyFrom(settings_value(train_info()))
        value = message.reply.info
        for _ in range(depth):
            value = value.map_value.entries.add(key="x").value
        value.int_value = 1
        await peer.send(message.SerializeToString())

    return reply


def _nan_update(weights: Vector) -> dict[str, Any]:
    state = train_state(weights)
    state["partial"]["weighted_sum"] = weights.full_like(float("nan"))
    return state


HELLO = pb.ClientMessage(hello=pb.Hello(protocol_version=PROTOCOL_VERSION, client_name="x"))

#: name -> (behaviour on the train task, what the server's log must say about it)
ATTACKS: dict[str, tuple[Behaviour, str]] = {
    "reorder": (_header_then((0, 4, b"\x00" * 4)), "expected offset 0"),
    "overlap": (_header_then((0, 0, b"\x00" * 8), (0, 0, b"\x00" * 8)), "expected offset 8"),
    "beyond": (_header_then((99, 0, b"\x00")), "chunk for tensor 99"),
    "interleave": (_header_then(), "before the previous payload was complete"),
    "hello-again": (_send(HELLO.SerializeToString()), "got a hello in the middle"),
    "no-kind": (_send(b""), "message has no kind"),
    "no-partial": (_state(lambda w: {"aux_vars": {}}), "partial must be a map"),
    "partial-list": (_state(lambda w: {"partial": [w], "aux_vars": {}}), "partial must be a map"),
    "aux-specs": (
        _state(lambda w: train_state(w) | {"aux_vars": {"a": {"v": Vector({"z": np.ones(2)})}}}),
        "aux_vars.a.v does not have the model's specs",
    ),
    "nan-update": (_state(_nan_update), "NaN"),
    "nan-loss": (_state(train_state, loss_sum=float("nan")), "not finite"),
    "bool-count": (_state(train_state, n_samples=True), "'n_samples' is True"),
    "negative": (_state(train_state, n_samples=-1), "'n_samples' is -1"),
    "deep-info": (_deep_info(30), "nested deeper"),
}


async def test_malformed_replies_are_each_logged_and_the_round_keeps_the_honest_one(
    tmp_path: Path, peers_of: Callable[[int], Peers], caplog: pytest.LogCaptureFixture
) -> None:
    config = server_config(
        tmp_path, rounds=1, min_clients=len(ATTACKS) + 1, round_timeout=10.0, eval_every=0
    )
    # "interleave" announces a payload then sends a second header: its next frame is this one.
    interleave, _ = ATTACKS["interleave"]

    async def twice(peer: Peer, got: Received[pb.ServerMessage]) -> None:
        await interleave(peer, got)
        await interleave(peer, got)

    async with running_server(config) as server:
        peers = peers_of(config.port)
        for name, (attack, _) in ATTACKS.items():
            peers.start(name, twice if name == "interleave" else attack)
        peers.start("honest", delay=0.5)
        summary = await asyncio.wait_for(server, 20)
    assert summary.history[0]["clients"] == ["honest"]
    missing = [n for n, (_, why) in ATTACKS.items() if not logged(caplog, f"client {n}", why)]
    assert not missing, [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    "name",
    ["", "x" * (10 << 20), "line\nbreak", "x" * 129, "c1\x00"],
    ids=["empty", "10MB", "nl", "129", "nul"],
)
async def test_bad_client_names_are_refused(tmp_path: Path, name: str) -> None:
    config = server_config(tmp_path, rounds=1, min_clients=1)
    async with running_server(config):
        peer = Peer(config.port, name)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await peer.join()
        finally:
            await peer.close()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must be 1-128 printable characters" in (refused.value.details() or "")


# ---- a client facing a malicious or misconfigured server ----------------------------------


class FakeServer:
    """Answers one client session: welcome, an INITIALIZE with ``model``, then STOP."""

    def __init__(self, model: dict[str, Any]) -> None:
        config = server_config(Path("."))
        self.setup = RunSetup(
            model=model,
            client_optimizer=config.client_optimizer.model_dump(),
            aggregator=config.aggregator,
            metrics=list(config.metrics),
            training=config.training.model_dump(),
            seed=0,
        )
        self.replies: asyncio.Queue[pb.Reply | None] = asyncio.Queue()  # None: no reply

    async def session(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await context.read()  # the hello
        welcome = pb.Welcome(protocol_version=PROTOCOL_VERSION, run_id="fake", session_id="1")
        await context.write(pb.ServerMessage(welcome=welcome).SerializeToString())
        task = pb.Task(
            task_id=1,
            kind=pb.TASK_KIND_INITIALIZE,
            settings=settings_value({**self.setup.to_data(), "chunk_bytes": 1 << 20}),
        )
        await context.write(pb.ServerMessage(task=task).SerializeToString())
        frame = await context.read()
        reply = None if frame is grpc.aio.EOF else pb.ClientMessage.FromString(frame).reply
        await self.replies.put(reply)
        stop = pb.Task(task_id=2, kind=pb.TASK_KIND_STOP)
        await context.write(pb.ServerMessage(task=stop).SerializeToString())

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[int]:
        server = grpc.aio.server()
        method = grpc.stream_stream_rpc_method_handler(self.session)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("fedpipe.v1.Federation", {"Session": method}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            yield port
        finally:
            await server.stop(grace=None)


async def test_a_server_cannot_make_the_client_run_a_command(
    tmp_path: Path, client_data: list[Path], processes: list[subprocess.Popen[str]]
) -> None:
    marker = tmp_path / "pwned"
    command = [sys.executable, "-c", f"open({str(marker)!r}, 'w').write('pwned')"]
    fake = FakeServer({"name": "subprocess:run", "config": {"args": command}})
    async with fake.serving() as port:
        victim = spawn_client(port, "victim", client_data[0])
        processes.append(victim)
        reply = await asyncio.wait_for(fake.replies.get(), 30)
        await asyncio.to_thread(finish, victim, 30)
    assert reply is not None and reply.error  # the client refused the setup...
    assert not marker.exists(), "...after running the server's command"


async def test_a_model_the_client_cannot_import_becomes_an_error_reply(
    tmp_path: Path, client_data: list[Path], processes: list[subprocess.Popen[str]]
) -> None:
    fake = FakeServer({"name": "no_such_package.models:build", "config": {}})
    async with fake.serving() as port:
        victim = spawn_client(port, "victim", client_data[0])
        processes.append(victim)
        reply = await asyncio.wait_for(fake.replies.get(), 30)
        code, out = await asyncio.to_thread(finish, victim, 30)
    assert reply is not None, out
    assert "no_such_package" in reply.error
    # It could not take part: a non-zero exit that a service manager does not retry.
    assert code == ExitCode.REJECTED and "Traceback" not in out, out
    assert "failed the setup" in out


async def test_a_client_stalling_mid_payload_cannot_hold_the_receive_budget(
    tmp_path: Path, peers_of: Callable[[int], Peers], caplog: pytest.LogCaptureFixture
) -> None:
    # A budget of one reply: replies are assembled one at a time, so a stalled one blocks all.
    config = server_config(
        tmp_path,
        rounds=1,
        min_clients=3,
        round_timeout=8.0,
        eval_every=0,
        receive_budget_mib=1e-6,
        chunk_mib=0.0625,
        min_transfer_rate_kib=1024.0,
        transfer_grace=0.5,
    )

    async def stall(peer: Peer, got: Received[pb.ServerMessage]) -> None:
        payload = encode_payload(train_state(weights_from(got.payload)), 1 << 16)
        message = pb.ClientMessage(reply=pb.Reply(task_id=got.message.task.task_id))
        message.reply.info.CopyFrom(settings_value(train_info()))
        message.reply.payload.CopyFrom(payload.header)
        await peer.send(message.SerializeToString())  # then never a chunk

    async with running_server(config) as server:
        peers = peers_of(config.port)
        peers.start("staller", stall)
        peers.start("honest-1", delay=0.2)
        peers.start("honest-2", delay=0.2)
        summary = await asyncio.wait_for(server, 30)
    assert summary.history[0]["clients"] == ["honest-1", "honest-2"]
    assert logged(caplog, "staller", "min_transfer_rate_kib")
