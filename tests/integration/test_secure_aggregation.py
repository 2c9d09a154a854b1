"""Secure aggregation over gRPC: real client processes train digits under masks to plain
averaging's accuracy and weights (within the encoding's bound), a client process killed after
sending its masked input leaves the sum recovered, and a hostile peer's malformed stage
messages are refused with a logged reason while the run completes."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedpipe.common.codec import spec_from_wire
from fedpipe.common.secagg import FixedPoint, SecAggClient
from fedpipe.common.secagg.wire import (
    forwarded_record,
    keys_message,
    roster_record,
    share_keys_message,
    unmask_request_record,
    unmask_shares_message,
)
from fedpipe.common.vector import Vector
from fedpipe.proto.fedpipe.v1 import federation_pb2 as pb
from fedpipe.server.rounds import RunSummary
from tests.integration.conftest import finish, running_server, server_config, spawn_client
from tests.integration.test_adversarial import Peer, Peers, logged, peers_of, train_info

__all__ = ["peers_of"]  # the fixture, imported

SECURE = {"threshold": 3, "clip": 4.0, "max_weight": 400}
#: Each round adds at most the encoding's bound to the weights' distance from plain's: the
#: clients' training does not amplify a distance that small (2.3e-6 after 3 rounds, bound 1.5e-6
#: per round, when written).
ROUNDS = 2


async def federate(
    out: Path, client_data: list[Path], secure: bool, modules: dict[int, str] | None = None
) -> tuple[RunSummary, list[tuple[int, str]]]:
    """A run of 4 client processes (``modules``: the command line of some of them)."""
    extra = {"secure_aggregation": SECURE} if secure else {}
    config = server_config(out, rounds=ROUNDS, min_clients=4, **extra)
    procs: list[subprocess.Popen[str]] = []
    try:
        async with running_server(config) as server:
            for i in range(4):
                module = (modules or {}).get(i, "fedpipe")
                procs.append(spawn_client(config.port, f"site-{i}", client_data[i], module=module))
            summary = await asyncio.wait_for(server, 120)
            outcomes = await asyncio.gather(*(asyncio.to_thread(finish, p, 60) for p in procs))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return summary, list(outcomes)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, client_data: list[Path]) -> RunSummary:
    """The same run with plain averaging."""
    summary, outcomes = asyncio.run(federate(tmp_path_factory.mktemp("plain"), client_data, False))
    assert [code for code, _ in outcomes] == [0] * 4, outcomes
    return summary


def max_error(plain: RunSummary, masked: RunSummary, rounds: int = ROUNDS) -> float:
    """The largest difference of a weight beyond ``rounds`` times the encoding's bound on an
    averaged update (0.0: all within it), allowing one float32 rounding of each run's weights."""
    encoding = FixedPoint(32, SECURE["clip"], 4, SECURE["max_weight"])
    bound = rounds * encoding.error_bound(1)  # per element of the average, whatever the weight
    worst = 0.0
    for key, weights in plain.weights.coefs.items():
        weights = np.asarray(weights)
        ulp = np.spacing(np.abs(weights).astype(np.float32))
        excess = np.abs(weights - masked.weights[key]) - (bound + 2 * ulp)
        worst = max(worst, float(np.max(excess)))
    return worst


async def test_client_processes_train_digits_under_masks_as_plain_averaging(
    tmp_path: Path, client_data: list[Path], plain: RunSummary
) -> None:
    masked, outcomes = await federate(tmp_path, client_data, True)
    assert [code for code, _ in outcomes] == [0] * 4, outcomes
    assert masked.status == "completed" and masked.rounds_completed == ROUNDS
    assert masked.history[-1]["replied"] == 4
    accuracy = masked.history[-1]["accuracy"]
    assert accuracy >= 0.9  # 0.917 when written, as plain's
    assert abs(accuracy - plain.history[-1]["accuracy"]) <= 0.02
    assert max_error(plain, masked) == 0.0
    difference = max(
        float(np.max(np.abs(plain.weights[k] - masked.weights[k]))) for k in plain.weights.coefs
    )
    assert difference > 0  # 1.7e-6 when written: quantized, the masked path ran


async def test_a_client_killed_after_masking_leaves_the_sum_recovered(
    tmp_path: Path,
    client_data: list[Path],
    plain: RunSummary,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SECAGG_KILL_ROUND", str(ROUNDS))  # the last: both runs train as many
    dropout = "tests.integration.secagg_dropout_client"
    masked, outcomes = await federate(tmp_path, client_data, True, {2: dropout})
    assert [code for code, _ in outcomes] == [0, 0, -9, 0], outcomes
    assert f"round {ROUNDS}: killed at the unmask stage" in outcomes[2][1]
    assert masked.status == "completed" and masked.rounds_completed == ROUNDS
    # Its masked input is in the sum, which three revealers (the threshold) unmask.
    assert masked.history[-1]["replied"] == 4
    assert max_error(plain, masked) == 0.0


async def mallory(peer: Peer) -> None:
    """Takes part in every stage, and in round r sends the r-th stage's message malformed: an
    oversized key, 10000 shares too many, a float32 masked input, a 5-byte unmasking share."""
    await peer.join()
    got = await peer.task()
    specs = {s.name: spec_from_wire(s, s.name) for s in got.message.task.weight_specs}
    await peer.reply(got.message.task.task_id)
    session, roster = SecAggClient(peer.name), None
    while True:
        task = (await peer.task()).message.task
        reply, r = pb.Reply(task_id=task.task_id), task.round
        if task.kind == pb.TASK_KIND_STOP:
            return
        if task.kind == pb.TASK_KIND_SECAGG_ADVERTISE:
            session = SecAggClient(peer.name)
            reply.keys.CopyFrom(keys_message(session.advertise()))
            if r == 1:
                reply.keys.cipher_key = bytes(1000)
        elif task.kind == pb.TASK_KIND_SECAGG_SHARE:
            roster = roster_record(task.roster, peer.name)
            reply.share_keys.CopyFrom(share_keys_message(session.share_keys(roster)))
            if r == 2:
                reply.share_keys.shares.extend([reply.share_keys.shares[0]] * 10_000)
        elif task.kind == pb.TASK_KIND_TRAIN_MASKED and roster is not None:
            shares = forwarded_record(task.forwarded_shares, peer.name, roster)
            zero = Vector({k: np.zeros(s.shape) for k, s in specs.items()})
            masked = session.masked_input(shares, zero).masked
            if r == 3:
                masked = masked.apply(lambda a: a.astype(np.float32))
            state = {"partial": {}, "aux_vars": {}, "masked": masked}
            await peer.reply(task.task_id, train_info(n_samples=1), state)
            continue
        elif task.kind == pb.TASK_KIND_SECAGG_UNMASK and roster is not None:
            request = unmask_request_record(task.unmask_request, roster)
            reply.unmask_shares.CopyFrom(unmask_shares_message(session.unmask(request)))
            if r == 4:
                reply.unmask_shares.self_mask_shares[0].share = bytes(5)
        else:
            reply.error = "mallory does not do that"
        await peer.send(pb.ClientMessage(reply=reply).SerializeToString())


async def test_a_hostile_peers_malformed_stage_messages_are_refused(
    tmp_path: Path,
    client_data: list[Path],
    peers_of: Callable[[int], Peers],
    processes: list[subprocess.Popen[str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = server_config(tmp_path, rounds=4, min_clients=4, secure_aggregation=SECURE)
    async with running_server(config) as server:
        hostile = asyncio.create_task(mallory(peers_of(config.port).new("mallory")))
        processes += [spawn_client(config.port, f"site-{i}", client_data[i]) for i in range(3)]
        summary = await asyncio.wait_for(server, 120)
        await asyncio.wait_for(hostile, 10)  # it was told the run is over
    assert summary.status == "completed" and summary.rounds_completed == 4
    # Refused at stages 0, 1 and 2 (left out), at stage 3 (its input in the sum, unmasked).
    assert [r["replied"] for r in summary.history] == [3, 3, 3, 4]
    assert summary.history[-1]["accuracy"] >= 0.9  # 0.93 when written
    assert logged(caplog, "mallory", "advertised cipher_key: 1000 bytes, expected 32")
    assert logged(caplog, "mallory", "10004 shares, expected at most 4")
    assert logged(caplog, "mallory", "refused: Vector at payload.masked", "dtype float32, exp")
    assert logged(caplog, "mallory", "self_mask_shares of", "5 bytes, expected 66")
