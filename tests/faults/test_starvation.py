"""One admitted client cannot starve the others (issue 7, item 4).

A real server process whose receive budget is about one model (replies are assembled one at
a time, as with the default budget and models of 256 MiB or more), two real honest client
processes, and one hostile peer on loopback that speaks the wire protocol by hand and
answers every train task first. The honest replies must be aggregated in every round, and
the server's log must name the hostile peer and what it did.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from fedpipe.common.config import ServerConfig
from fedpipe.common.payload import CHUNK_FIELD, chunk_frame, encode_payload
from fedpipe.common.records import settings_value, weights_from
from fedpipe.common.vector import Vector
from fedpipe.proto.fedpipe.v1 import federation_pb2 as pb
from tests.faults.conftest import server_config, spawn_client, spawn_server, wait_for_line
from tests.integration.test_adversarial import Peer, train_info, train_state

HONEST = ["honest-0", "honest-1"]
#: Seconds a trickling peer waits between two one-byte chunks.
TRICKLE_INTERVAL = 1.0

Attack = Callable[[Peer, Any, int], Awaitable[None]]


def budget_config(tmp_path: Path, rounds: int, **overrides: Any) -> ServerConfig:
    """Softmax regression on digits (2,600 bytes of weights) with a budget of one reply.

    ``receive_budget_mib`` is below one model, so the server raises it to exactly one model:
    one honest reply takes the whole budget. Chunks of 1 KiB make an honest reply several
    chunks long; the rate floor (4 KiB/s after 1 s) is far below loopback speeds.
    """
    settings: dict[str, Any] = {
        "rounds": rounds,
        "min_clients": 3,
        "round_timeout": 8.0,
        "eval_every": 0,
        "training": {"epochs": 20, "batch_size": 16},  # ~0.2 s: the hostile reply comes first
        "receive_budget_mib": 0.001,
        "chunk_mib": 0.001,
        "min_transfer_rate_kib": 4.0,
        "transfer_grace": 1.0,
        "checkpoint": False,
    }
    return server_config(tmp_path, **(settings | overrides))


async def run_under_attack(
    tmp_path: Path,
    client_data: list[Path],
    procs: list[subprocess.Popen[str]],
    attack: Attack,
    rounds: int,
    honest: list[str] = HONEST,
    **overrides: Any,
) -> tuple[list[dict[str, Any]], str]:
    """Run a server, the honest clients and a hostile peer that rejoins under a new name
    whenever its session ends; return the progress records and the server's log."""
    config = budget_config(tmp_path, rounds, min_clients=len(honest) + 1, **overrides)
    server = spawn_server(config)
    procs.append(server)
    attacker = asyncio.create_task(_hostile(config.port, attack))
    try:
        await asyncio.sleep(0.5)  # the hostile peer joins first: it is sampled from round 1
        for name, data in zip(honest, client_data, strict=False):
            procs.append(spawn_client(config.port, name, data, "--threads", "1"))
        records = await asyncio.to_thread(_records, server, rounds, 60.0 + 10 * rounds)
    finally:
        attacker.cancel()
        await asyncio.gather(attacker, return_exceptions=True)
    log = (Path(config.output_dir).parent / "server.log").read_text()
    return records, log


def _records(server: subprocess.Popen[str], rounds: int, timeout: float) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    while len(records) < rounds:
        record = wait_for_line(server, lambda r: "round" in r, timeout)
        if record is None:
            break
        records.append(record)
    return records


async def _hostile(port: int, attack: Attack) -> None:
    """Join as ``mallory-1`` and answer every train task with ``attack``; rejoin as
    ``mallory-2``... whenever the server ends the session (bounded in time and count)."""
    session, deadline = 0, time.monotonic() + 120
    while session < 20 and time.monotonic() < deadline:
        peer = Peer(port, f"mallory-{session + 1}")
        try:
            await peer.join()  # fails until the server listens: then retried, same name
            session += 1
            await peer.initialize()
            for round_number in itertools.count():
                got = await peer.task()
                if got.message.task.kind == pb.TASK_KIND_STOP:
                    return
                await attack(peer, got, round_number)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, AssertionError):
            pass  # the server closed this session, or does not listen yet
        finally:
            await peer.close()
        await asyncio.sleep(0.2)


def _assert_honest_every_round(
    records: list[dict[str, Any]], rounds: int, honest: list[str] = HONEST
) -> None:
    replied = [(r["round"], r["clients"], r["seconds"]) for r in records]
    assert len(records) == rounds, f"only {len(records)} of {rounds} rounds ended: {replied}"
    for record in records:
        assert record["clients"] == honest, f"round {record['round']}: {replied}"
        assert "failed" not in record, f"round {record['round']}: {record}"


# ---- a trickle: a reply announced, then one byte a second --------------------------------


async def trickle(peer: Peer, got: Any, round_number: int) -> None:
    """An honest header (one model's worth), then one byte every second, until cut off."""
    payload = encode_payload(train_state(weights_from(got.payload)), 1 << 16)
    message = pb.ClientMessage(reply=pb.Reply(task_id=got.message.task.task_id))
    message.reply.info.CopyFrom(settings_value(train_info()))
    message.reply.payload.CopyFrom(payload.header)
    await peer.send(message.SerializeToString())
    for offset in range(payload.total_bytes):  # 2,600 s at this pace: cut off long before
        await peer.send(chunk_frame(CHUNK_FIELD, 0, offset, b"\x00"))
        await asyncio.sleep(TRICKLE_INTERVAL)


async def test_a_trickling_client_loses_its_session_and_the_honest_replies_get_through(
    tmp_path: Path, client_data: list[Path], procs: list[subprocess.Popen[str]]
) -> None:
    records, log = await run_under_attack(tmp_path, client_data, procs, trickle, rounds=3)
    _assert_honest_every_round(records, 3)
    # Refused first when the honest replies wait (it cannot arrive in time), then cut off:
    # its skipped rest must keep the rate floor too.
    assert re.search(
        r"client mallory-1 sent \d+ of 2600 bytes in [\d.]+s, below "
        r"min_transfer_rate_kib=4; closing its session",
        log,
    ), log


# ---- a crawl: above the rate floor, too slow for the round ---------------------------------


def crawl(delay: float) -> Attack:
    """After ``delay`` seconds, an honest header, then 100 bytes every half second (a model
    of 2,600 bytes in 13 s: above a floor of 0.1 KiB/s, past any round of these tests)."""

    async def reply(peer: Peer, got: Any, round_number: int) -> None:
        await asyncio.sleep(delay)
        payload = encode_payload(train_state(weights_from(got.payload)), 1 << 16)
        message = pb.ClientMessage(reply=pb.Reply(task_id=got.message.task.task_id))
        message.reply.info.CopyFrom(settings_value(train_info()))
        message.reply.payload.CopyFrom(payload.header)
        await peer.send(message.SerializeToString())
        for tensor, array in enumerate(payload.arrays):
            data = bytes(array.reshape(-1).view(np.uint8))
            for offset in range(0, len(data), 100):
                chunk = data[offset : offset + 100]
                await peer.send(chunk_frame(CHUNK_FIELD, tensor, offset, chunk))
                await asyncio.sleep(0.5)

    return reply


async def test_a_reply_too_slow_for_its_round_does_not_keep_the_others_waiting(
    tmp_path: Path, client_data: list[Path], procs: list[subprocess.Popen[str]]
) -> None:
    # The crawler answers first and keeps the floor: only its pace against the round's end
    # (13 s for 8 s) gives the budget back while the honest replies wait.
    records, log = await run_under_attack(
        tmp_path, client_data, procs, crawl(0.0), rounds=2, min_transfer_rate_kib=0.1
    )
    _assert_honest_every_round(records, 2)
    assert re.search(r"client mallory-1: .* would arrive after the round ends", log), log


async def test_a_reply_still_arriving_after_its_round_gives_its_budget_back(
    tmp_path: Path, client_data: list[Path], procs: list[subprocess.Popen[str]]
) -> None:
    # Round 1: the honest reply is in before the crawler starts; nobody waits, the crawler
    # keeps the budget past the deadline (5 s). Round 2: the honest reply must not wait for
    # the rest of a reply that no longer counts.
    honest = HONEST[:1]
    records, log = await run_under_attack(
        tmp_path,
        client_data,
        procs,
        crawl(3.0),
        rounds=2,
        honest=honest,
        round_timeout=5.0,
        min_transfer_rate_kib=0.1,
        transfer_grace=10.0,
    )
    _assert_honest_every_round(records, 2, honest)
    assert re.search(r"client mallory-1: reply to task \d+ is no longer awaited", log), log


# ---- full but invalid replies, each round another ------------------------------------------


def _extra_tensor(weights: Vector) -> dict[str, Any]:
    state = train_state(weights)
    state["partial"]["extra"] = np.zeros(weights.size)  # a plain array: never in a reply
    return state


def _wrong_shape(weights: Vector) -> dict[str, Any]:
    wrong = Vector({k: np.zeros((a.size + 1,)) for k, a in weights.coefs.items()})
    return train_state(weights) | {"partial": {"weighted_sum": wrong, "total_weight": 1.0}}


def _nan(weights: Vector) -> dict[str, Any]:
    return train_state(weights, value=float("nan"))


def _too_many(weights: Vector) -> dict[str, Any]:
    state = train_state(weights)
    state["aux_vars"] = {f"a{i}": {"v": weights.zeros_like()} for i in range(12)}
    return state


#: name -> (the invalid train reply, what the server's log says about it)
INVALID: dict[str, tuple[Callable[[Vector], dict[str, Any]], str]] = {
    "extra-tensor": (_extra_tensor, "not part of a Vector"),
    "wrong-shape": (_wrong_shape, "does not have the model's specs"),
    "nan": (_nan, "NaN"),
    "too-many-vectors": (_too_many, "expected at most"),
}


async def invalid(peer: Peer, got: Any, round_number: int) -> None:
    make, _ = list(INVALID.values())[round_number % len(INVALID)]
    state = make(weights_from(got.payload))
    await peer.reply(got.message.task.task_id, train_info(), state)


async def test_full_invalid_replies_are_rejected_and_the_honest_replies_get_through(
    tmp_path: Path, client_data: list[Path], procs: list[subprocess.Popen[str]]
) -> None:
    rounds = len(INVALID)
    records, log = await run_under_attack(tmp_path, client_data, procs, invalid, rounds)
    _assert_honest_every_round(records, rounds)
    missing = [
        n for n, (_, why) in INVALID.items() if not re.search(f"client mallory-1.*{why}", log)
    ]
    assert not missing, log
