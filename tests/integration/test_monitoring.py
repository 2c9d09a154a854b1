"""What the transport and the round loop count, as /metrics shows it: replies refused by
reason, failed authentications; and the endpoints close with the server."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from fedpipe.common.framing import Received
from fedpipe.common.records import weights_from
from fedpipe.common.vector import Vector
from fedpipe.proto.fedpipe.v1 import federation_pb2 as pb
from fedpipe.server.simulation import free_port
from tests.faults.monitored_federation import Samples
from tests.faults.monitored_federation import fedpipe_samples as scrape
from tests.integration.conftest import RawClient, running_server, server_config
from tests.integration.test_adversarial import (  # noqa: F401 (peers_of: a fixture)
    Behaviour,
    Peer,
    Peers,
    honest_eval,
    honest_train,
    metric_state,
    peers_of,
    train_info,
    train_state,
)
from tests.integration.test_tls import pki  # noqa: F401 (a fixture)

pytest.importorskip("prometheus_client.parser", reason="fedpipe[prometheus]")


async def wait_scraped(port: int, ready: Callable[[Samples], bool], timeout: float = 20) -> Samples:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        samples = await asyncio.to_thread(scrape, port)
        if ready(samples):
            return samples
        assert asyncio.get_running_loop().time() < deadline, samples
        await asyncio.sleep(0.1)


def rejected(samples: Samples) -> dict[str, float]:
    return {
        dict(labels)["reason"]: value
        for (name, labels), value in samples.items()
        if name == "fedpipe_rejected_replies_total"
    }


async def test_refused_replies_are_counted_by_reason(
    tmp_path: Path,
    peers_of: Callable[[int], Peers],  # noqa: F811
) -> None:
    config = server_config(
        tmp_path, rounds=2, min_clients=4, round_timeout=10.0, metrics_port=free_port()
    )
    gate = asyncio.Event()  # round 2 waits for it: the counters are read in between

    def round_one_only(behaviour: Behaviour) -> Behaviour:
        async def act(peer: Peer, got: Received[pb.ServerMessage]) -> None:
            if got.message.task.round == 2:
                await gate.wait()
                return await (
                    honest_train if got.message.task.kind == pb.TASK_KIND_TRAIN else honest_eval
                )(peer, got)
            await behaviour(peer, got)

        return act

    async def nan_update(peer: Peer, got: Received[pb.ServerMessage]) -> None:
        state = train_state(weights_from(got.payload))
        state["partial"]["weighted_sum"] = weights_from(got.payload).full_like(float("nan"))
        await peer.reply(got.message.task.task_id, train_info(), state)

    async def vector_count(peer: Peer, got: Received[pb.ServerMessage]) -> None:
        state = metric_state(correct=5, n=Vector({"a": [1.0, 1.0, 1.0]}))
        await peer.reply(got.message.task.task_id, {"n_samples": 10, "seconds": 0.1}, state)

    async def no_kind(peer: Peer, got: Received[pb.ServerMessage]) -> None:
        await peer.send(b"")

    async with running_server(config) as server:
        peers = peers_of(config.port)
        peers.start("honest", round_one_only(honest_train), round_one_only(honest_eval), n_eval=10)
        peers.start("nan", round_one_only(nan_update))
        peers.start("limits", round_one_only(honest_train), round_one_only(vector_count), n_eval=10)
        peers.start("broken", round_one_only(no_kind))
        samples = await wait_scraped(
            config.metrics_port,  # type: ignore[arg-type]
            lambda s: (
                s[("fedpipe_round", ())] == 2 and s[("fedpipe_rounds_completed_total", ())] == 1
            ),
        )
        gate.set()
        summary = await asyncio.wait_for(server, 30)
    assert rejected(samples) == {"invalid": 1, "limits": 1, "protocol": 1}
    assert samples[("fedpipe_clients_connected", ())] == 3  # the protocol breaker is gone
    assert summary.history[0]["clients"] == ["honest", "limits"]
    assert summary.status == "completed", summary.history


async def test_failed_authentications_are_counted_and_the_endpoint_closes_with_the_server(
    tmp_path: Path,
) -> None:
    config = server_config(
        tmp_path,
        rounds=1,
        min_clients=1,
        tokens={"hospital-a": "right-token"},
        metrics_port=free_port(),
    )
    port: int = config.metrics_port  # type: ignore[assignment]
    async with running_server(config):
        for name, token in (("hospital-a", "wrong"), ("stranger", "right-token")):
            client = RawClient(config.port)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.hello(name, token=token)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            await client.close()
        samples = await wait_scraped(
            port, lambda s: s[("fedpipe_failed_authentications_total", (("service", "grpc"),))] == 2
        )
        assert samples[("fedpipe_clients_connected", ())] == 0
        assert samples[("fedpipe_round", ())] == 0
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass  # the server is gone, and its /metrics with it


async def test_with_tls_files_the_page_and_metrics_are_served_over_https(
    tmp_path: Path,
    pki: Path,  # noqa: F811
) -> None:
    config = server_config(
        tmp_path,
        rounds=1,
        min_clients=1,
        tls_cert=str(pki / "server.crt"),
        tls_key=str(pki / "server.key"),
        metrics_port=free_port(),
        status_port=free_port(),
        status_token="tls-page-token",
        hello_timeout=2.0,  # the status page's TLS handshake must end within it too
    )
    trusted = ssl.create_default_context(cafile=str(pki / "ca.crt"))

    def fetch(url: str, *headers: tuple[str, str]) -> tuple[int, str, str]:
        request = urllib.request.Request(url, headers=dict(headers))
        opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=trusted), NoRedirect
        )
        try:
            with opener.open(request, timeout=10) as reply:
                return reply.status, reply.headers.get("Set-Cookie", ""), reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Set-Cookie", ""), ""

    async with running_server(config):
        page = f"https://127.0.0.1:{config.status_port}/"
        bearer = ("Authorization", "Bearer tls-page-token")
        status, _, body = await asyncio.to_thread(fetch, page + "api/status", bearer)
        assert status == 200 and '"status": "running"' in body
        status, cookie, _ = await asyncio.to_thread(fetch, page + "?token=tls-page-token")
        assert status == 303 and cookie.endswith("; Secure")  # never sent back in clear
        metrics = f"https://127.0.0.1:{config.metrics_port}/metrics"
        status, _, body = await asyncio.to_thread(fetch, metrics)
        assert status == 200 and "fedpipe_clients_connected 0.0" in body
        # Plain HTTP on the HTTPS port: no page, the connection ends with the handshake timeout.
        plain = page.replace("https", "http")
        with pytest.raises(OSError):
            await asyncio.to_thread(lambda: urllib.request.urlopen(plain, timeout=10).read())


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


@pytest.mark.parametrize("field", ["metrics_port", "status_port"])
def test_a_taken_port_is_one_line_and_exit_1(tmp_path: Path, field: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["server", "--port", str(free_port()), "--output-dir", str(tmp_path / "run")]
        argv += ["--set", "model.config.n_features=64", "--set", "model.config.n_classes=10"]
        argv += ["--set", f"{field}={port}", "--set", 'status_token="t"']
        result = subprocess.run(
            [sys.executable, "-m", "fedpipe", *argv],
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("fedpipe server: cannot serve ") and f":{port}: " in last, last
    assert "already in use" in last.lower() and "Traceback" not in result.stderr
    assert "listening on" not in result.stderr
