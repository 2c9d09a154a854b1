"""Silent streams from one address cannot lock the others out: streams awaiting admission are
capped per address, and an honest client from another address joins at once. A real server
process listening on both loopback addresses (127.0.0.1 and ::1)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from pathlib import Path

import grpc

from fedpipe.common.outcome import ExitCode
from fedpipe.grpc_channel import SESSION_METHOD
from fedpipe.server.transports.grpc import admission
from tests.faults.conftest import finish, server_config, spawn_client, spawn_server
from tests.faults.test_identity import server_log, wait_for_log

FLOOD = 80  # beyond gRPC's old global limit of max_clients + 64 RPCs


async def test_a_flood_of_silent_streams_leaves_room_for_an_honest_client(
    tmp_path: Path, procs: list[subprocess.Popen[str]], client_data: list[Path]
) -> None:
    config = server_config(
        tmp_path, host="localhost", rounds=1, min_clients=1, max_clients=4, hello_timeout=60.0
    )
    procs.append(spawn_server(config, verbose=False))
    log = server_log(config)
    await asyncio.to_thread(wait_for_log, log, "listening on", 30)
    channels = [grpc.aio.insecure_channel(f"[::1]:{config.port}") for _ in range(2)]
    try:
        calls = [channels[i % 2].stream_stream(SESSION_METHOD)() for i in range(FLOOD)]
        for call in calls:  # open each stream, then say nothing
            with contextlib.suppress(grpc.aio.AioRpcError):  # refused already
                await call.wait_for_connection()
        statuses = [asyncio.ensure_future(call.code()) for call in calls]
        deadline = time.monotonic() + 20  # the refusals come at once; the rest wait
        while sum(s.done() for s in statuses) < len(calls) - admission.PENDING_PER_PEER:
            assert time.monotonic() < deadline, "the extra streams were not refused at once"
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        refused = [call for call, code in zip(calls, statuses, strict=True) if code.done()]
        assert len(refused) == FLOOD - admission.PENDING_PER_PEER
        assert {await call.code() for call in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        details = {await call.details() for call in refused}
        assert details == {"too many connections awaiting admission from ::1"}, details

        started = time.monotonic()
        client = spawn_client(config.port, "honest", client_data[0])
        procs.append(client)
        await asyncio.to_thread(wait_for_log, log, "client honest joined", 30)
        joined = time.monotonic() - started  # a process start, an import and a hello
        rc, out = await asyncio.to_thread(finish, procs[0], 90)
        assert rc == ExitCode.OK, out
        summary = json.loads((Path(config.output_dir) / "summary.json").read_text())
        assert summary["status"] == "completed"
        text = log.read_text()
        assert text.count("too many connections awaiting admission from ::1") == 1  # no flood
        for status in statuses:
            status.cancel()
        print(f"honest client joined {joined:.1f}s after its start, under a flood of {FLOOD}")
    finally:
        for channel in channels:
            await channel.close()
