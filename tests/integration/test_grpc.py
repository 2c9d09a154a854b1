"""A real server and real client processes over loopback gRPC."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedpipe.common.config import SimulationConfig
from fedpipe.common.outcome import ExitCode
from fedpipe.common.payload import CHUNK_FIELD, chunk_frame
from fedpipe.proto.fedpipe.v1 import federation_pb2 as pb
from fedpipe.proto.fedpipe.v1 import tensor_pb2
from fedpipe.server.checkpoint import load_checkpoint
from fedpipe.server.simulation import simulate
from tests.integration.conftest import (
    RawClient,
    finish,
    running_server,
    server_config,
    spawn_client,
)


async def wait_processes(
    procs: list[subprocess.Popen[str]], timeout: float = 60
) -> list[tuple[int, str]]:
    return await asyncio.gather(*(asyncio.to_thread(finish, p, timeout) for p in procs))


async def test_client_processes_train_digits_to_accuracy(
    tmp_path: Path, client_data: list[Path], processes: list[subprocess.Popen[str]]
) -> None:
    config = server_config(tmp_path, rounds=5)
    async with running_server(config) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{config.port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="fedpipe.v1.Federation")
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        processes += [spawn_client(config.port, f"site-{i}", client_data[i]) for i in range(3)]
        summary = await asyncio.wait_for(server, 120)
        outcomes = await wait_processes(processes)
    assert [code for code, _ in outcomes] == [0, 0, 0], outcomes
    assert summary.rounds_completed == 5
    assert summary.history[-1]["replied"] == 3
    assert summary.history[-1]["accuracy"] >= 0.9
    assert (tmp_path / "run" / "model.npz").exists()
    assert "server ended the run" in outcomes[0][1]


def test_grpc_and_inprocess_transports_give_the_same_weights(tmp_path: Path) -> None:
    def run(transport: str) -> np.ndarray:
        sim = SimulationConfig.model_validate(
            {
                "n_clients": 3,
                "dataset": "digits",
                "transport": transport,
                "partition": {"scheme": "dirichlet", "alpha": 0.5},
                "server": {
                    "rounds": 3,
                    "min_clients": 3,
                    "client_optimizer": {"lrate": 0.3, "modules": ["momentum"]},
                    "server_optimizer": {"lrate": 1.0, "modules": ["adam"]},
                    "output_dir": str(tmp_path / transport),
                    "chunk_mib": 0.001,  # ~1 KiB chunks: the model travels in dozens of them
                },
            }
        )
        summary = simulate(sim)
        assert summary.history[-1]["replied"] == 3
        return summary.weights

    grpc_weights, local_weights = run("grpc"), run("inprocess")
    # Replies are summed in arrival order, so only float rounding may differ.
    assert grpc_weights.allclose(local_weights, rtol=1e-5, atol=1e-6)
    assert not grpc_weights.allclose(grpc_weights.zeros_like())


async def test_silent_client_does_not_stall_the_server(
    tmp_path: Path, client_data: list[Path], processes: list[subprocess.Popen[str]]
) -> None:
    config = server_config(tmp_path, rounds=2, min_clients=3, round_timeout=2.0, eval_every=0)
    async with running_server(config) as server:
        silent = RawClient(config.port)
        welcome = await silent.hello("silent")
        assert welcome.welcome.run_id == config.run_id
        processes += [spawn_client(config.port, f"site-{i}", client_data[i]) for i in range(2)]
        setup = await silent.next_task()
        assert setup.kind == pb.TASK_KIND_INITIALIZE
        ack = pb.ClientMessage(reply=pb.Reply(task_id=setup.task_id))
        await silent.send(ack.SerializeToString())  # joins the run, then never answers again
        started = time.monotonic()
        summary = await asyncio.wait_for(server, 60)
        await silent.close()
    assert time.monotonic() - started < 2 * 2.0 + 10  # process start-up + two deadlines
    assert [r["replied"] for r in summary.history] == [2, 2]
    assert all("silent" not in r["clients"] for r in summary.history)


async def test_malformed_input_is_refused_and_the_server_goes_on(
    tmp_path: Path,
    client_data: list[Path],
    processes: list[subprocess.Popen[str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = server_config(tmp_path, rounds=2, min_clients=3, round_timeout=10.0)
    async with running_server(config) as server:
        garbage = RawClient(config.port)
        await garbage.send(b"\xff\xfe not a protobuf message")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await garbage.receive()
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "undecodable hello" in (refused.value.details() or "")
        await garbage.close()

        old = RawClient(config.port)
        bad_version = pb.Hello(protocol_version=99, client_name="old")
        await old.send(pb.ClientMessage(hello=bad_version).SerializeToString())
        with pytest.raises(grpc.aio.AioRpcError) as too_old:
            await old.receive()
        assert too_old.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        await old.close()

        rogue = RawClient(config.port)
        await rogue.hello("rogue")
        processes += [spawn_client(config.port, f"site-{i}", client_data[i]) for i in range(2)]
        task = await rogue.next_task()
        assert task.kind == pb.TASK_KIND_INITIALIZE
        await rogue.send(pb.ClientMessage(reply=pb.Reply(task_id=task.task_id)).SerializeToString())
        task = await rogue.next_task()
        assert task.kind == pb.TASK_KIND_TRAIN
        huge = tensor_pb2.PayloadHeader(
            tensors=[
                tensor_pb2.TensorSpec(name="x", dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1 << 40])
            ],
            total_bytes=4 << 40,
        )
        reply = pb.Reply(task_id=task.task_id, payload=huge)
        await rogue.send(pb.ClientMessage(reply=reply).SerializeToString())
        await rogue.send(chunk_frame(CHUNK_FIELD, 0, 0, b"\x00" * 16))
        # The rogue's session is closed; min_clients applies before round 1 only, so round 2
        # goes on with the two honest clients instead of waiting for a third.
        summary = await asyncio.wait_for(server, 60)
        await rogue.close()
    assert [r["replied"] for r in summary.history] == [2, 2]
    assert summary.weights.is_finite()
    assert any("rogue broke the protocol" in r.message for r in caplog.records)


async def test_wrong_token_is_refused_and_the_client_exits_with_a_reason(
    tmp_path: Path, client_data: list[Path], processes: list[subprocess.Popen[str]]
) -> None:
    tokens = {"member": "s3cret", "intruder": "other"}
    config = server_config(tmp_path, rounds=1, min_clients=1, tokens=tokens)
    async with running_server(config) as server:
        intruder = spawn_client(config.port, "intruder", client_data[0], "--token", "guess")
        processes.append(intruder)
        code_in, out_in = await asyncio.to_thread(finish, intruder)
        member = spawn_client(config.port, "member", client_data[1], "--token", "s3cret")
        processes.append(member)
        summary = await asyncio.wait_for(server, 60)
        code_ok, _ = await asyncio.to_thread(finish, member)
    assert code_in == ExitCode.REFUSED and "invalid or missing client token" in out_in
    assert code_ok == 0
    assert summary.history[0]["clients"] == ["member"]


async def test_client_started_before_the_server_connects_with_backoff(
    tmp_path: Path, client_data: list[Path], processes: list[subprocess.Popen[str]]
) -> None:
    config = server_config(tmp_path, rounds=1, min_clients=1)
    early = spawn_client(config.port, "early", client_data[0])
    processes.append(early)
    assert early.stdout is not None
    before: list[str] = []  # what the client said while no server was there
    while not any("reconnecting in" in line for line in before[-1:]):
        line = await asyncio.wait_for(asyncio.to_thread(early.stdout.readline), 60)
        assert line, "".join(before)
        before.append(line)
    async with running_server(config) as server:
        summary = await asyncio.wait_for(server, 60)
    code, out = await asyncio.to_thread(finish, early)
    assert code == 0, out
    assert "UNAVAILABLE" in before[-1] and "joined run" in out
    assert summary.history[0]["clients"] == ["early"]


def test_sigterm_stops_with_a_checkpoint_and_resume_finishes_the_run(
    tmp_path: Path, client_data: list[Path], processes: list[subprocess.Popen[str]]
) -> None:
    config = server_config(tmp_path, rounds=30, min_clients=2)
    path = tmp_path / "server.json"
    path.write_text(config.model_dump_json())
    command = [sys.executable, "-m", "fedpipe", "server", "--config", str(path)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    processes.append(server)
    clients = [spawn_client(config.port, f"site-{i}", client_data[i]) for i in range(2)]
    processes += clients
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert time.monotonic() < deadline and server.poll() is None, server.stdout
        time.sleep(0.1)
    server.send_signal(signal.SIGTERM)
    code, out = finish(server)
    assert code == ExitCode.INTERRUPTED, out
    assert "run stopped: stopped by a signal after round" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    state = load_checkpoint(tmp_path / "run" / "checkpoint.fpk")
    assert summary["status"] == "stopped"
    assert 2 <= summary["rounds_completed"] == int(state["round"]) < 30  # type: ignore[arg-type]
    assert (tmp_path / "run" / "model.npz").exists()
    # A stopped run is not over: the clients wait for the server, which resumes and ends it.
    time.sleep(1.0)
    assert [c.poll() for c in clients] == [None, None]
    resumed = subprocess.Popen([*command, "--resume"], stdout=subprocess.PIPE, text=True)
    processes.append(resumed)
    code, out = finish(resumed, 120)
    assert code == 0, out
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"
    assert [finish(c)[0] for c in clients] == [0, 0]
