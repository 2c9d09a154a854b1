"""Bring your own training: real client processes that train from their own torch DataLoader
(with augmentation), and with their own torch.optim loop, against a real server."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import finish, running_server, server_config, spawn_client

pytest.importorskip("torch")

USER = "tests.common.torch_training"
MODEL = "tests.common.torch_models:build"


async def federated_run(
    tmp_path: Path,
    client_data: list[Path],
    processes: list[subprocess.Popen[str]],
    client_sets: list[str],
    client_optimizer: dict[str, object],
) -> tuple[dict[str, object], list[tuple[int, str]]]:
    """Four rounds of three client processes on digits; the last round's record."""
    config = server_config(
        tmp_path,
        rounds=4,
        model={"name": MODEL, "config": {"hidden": 32}},
        client_optimizer=client_optimizer,
        metrics=["accuracy", "loss"],
    )
    extra = [f'trusted_models=["{MODEL}"]', f"loaders={USER}:loaders", *client_sets]
    # one math thread per process: three torch processes on two cores must not oversubscribe
    args = ["--threads", "1", *(a for s in extra for a in ("--set", s))]
    async with running_server(config) as server:
        processes += [spawn_client(config.port, f"s{i}", client_data[i], *args) for i in range(3)]
        summary = await asyncio.wait_for(server, 240)
        outcomes = await asyncio.gather(*(asyncio.to_thread(finish, p, 60) for p in processes))
    assert [code for code, _ in outcomes] == [0, 0, 0], outcomes
    assert summary.rounds_completed == 4
    return summary.history[-1], outcomes


async def test_dataloader_clients_train_digits_with_fedpipes_loop(
    tmp_path: Path, client_data: list[Path], processes: list[subprocess.Popen[str]]
) -> None:
    last, _ = await federated_run(
        tmp_path, client_data, processes, [], {"lrate": 0.1, "modules": ["momentum"]}
    )
    assert last["replied"] == 3
    assert last["accuracy"] >= 0.9, last


async def test_train_fn_clients_train_digits_with_their_own_sgd(
    tmp_path: Path, client_data: list[Path], processes: list[subprocess.Popen[str]]
) -> None:
    # the client optimizer's lrate does not scale a train_fn's update; clipping acts on it
    optimizer = {"lrate": 0.001, "modules": [["l2-global-clipping", {"max_norm": 50.0}]]}
    last, outcomes = await federated_run(
        tmp_path, client_data, processes, [f"train_fn={USER}:sgd_train"], optimizer
    )
    assert last["replied"] == 3
    assert last["accuracy"] >= 0.9, last
    assert 0 < float(last["train_loss"]) < 0.5, last  # type: ignore[arg-type]
    assert "train_fn metrics {'loss':" in outcomes[0][1]
