"""Real servers on free loopback ports, real client processes, and a raw protocol client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from fedpipe.common.config import ServerConfig
from fedpipe.common.data import load_builtin, partition, save_partitions
from fedpipe.common.protocol import PROTOCOL_VERSION
from fedpipe.grpc_channel import SESSION_METHOD
from fedpipe.proto.fedpipe.v1 import federation_pb2 as pb
from fedpipe.server.rounds import RunSummary
from fedpipe.server.simulation import free_port
from fedpipe.server.transports.grpc.server import serve


@pytest.fixture(scope="session")
def client_data(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Digits split IID into 4 client folders (x.npy, y.npy)."""
    out = tmp_path_factory.mktemp("clients")
    parts = partition(load_builtin("digits"), 4, "iid", seed=0)
    return save_partitions(parts, out)


def server_config(tmp_path: Path, **overrides: Any) -> ServerConfig:
    data: dict[str, Any] = {
        "port": free_port(),
        "rounds": 4,
        "min_clients": 3,
        "round_timeout": 30.0,
        "wait_timeout": 60.0,
        "model": {"name": "softmax-regression", "config": {"n_features": 64, "n_classes": 10}},
        "client_optimizer": {"lrate": 0.5},
        "training": {"epochs": 1, "batch_size": 16},
        "output_dir": str(tmp_path / "run"),
    }
    data.update(overrides)
    return ServerConfig.model_validate(data)


def spawn_client(
    port: int,
    name: str,
    data: Path,
    *extra: str,
    eval_fraction: float = 0.2,
    module: str = "fedpipe",
) -> subprocess.Popen[str]:
    """A real ``fedpipe client`` process (``python -m module``: fedpipe's command line)."""
    args = [
        sys.executable,
        "-m",
        module,
        "-v",
        "client",
        "--server",
        f"127.0.0.1:{port}",
        "--name",
        name,
        "--data",
        str(data),
        "--eval-fraction",
        str(eval_fraction),
        *extra,
    ]
    return subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return proc.returncode, out


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; killed at the end whatever happened."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@asynccontextmanager
async def running_server(config: ServerConfig) -> AsyncIterator[asyncio.Task[RunSummary]]:
    """``serve(config)`` as a task of the test's loop; cancelled if the test leaves early."""
    listening = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(config, on_listening=listening.set_result))
    done, _ = await asyncio.wait({task, listening}, timeout=30, return_when="FIRST_COMPLETED")
    if task in done:
        task.result()  # re-raise the start-up error
    try:
        yield task
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class RawClient:
    """Speaks the wire protocol by hand, to misbehave on purpose."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.call: Any = self.channel.stream_stream(SESSION_METHOD)()

    async def hello(self, name: str, token: str = "", n: int = 100) -> pb.ServerMessage:
        hello = pb.Hello(
            protocol_version=PROTOCOL_VERSION,
            client_name=name,
            token=token,
            data=pb.DataSummary(n_train_samples=n, n_eval_samples=0),
        )
        await self.send(pb.ClientMessage(hello=hello).SerializeToString())
        return await self.receive()

    async def send(self, frame: bytes) -> None:
        await self.call.write(frame)

    async def receive(self) -> pb.ServerMessage:
        frame = await self.call.read()
        assert frame is not grpc.aio.EOF, "server closed the stream"
        message = pb.ServerMessage()
        message.ParseFromString(frame)
        return message

    async def next_task(self) -> pb.Task:
        """Skip chunk frames until the next task envelope."""
        while True:
            message = await self.receive()
            if message.WhichOneof("kind") == "task":
                return message.task

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()
