"""Over gRPC the server folds each train reply from disk, chunk by chunk, once it is
complete: the weights are those of whole replies folded in memory, bit for bit."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedpipe.common.vector import Vector
from fedpipe.server import rounds
from fedpipe.server.transports.grpc.proxy import GrpcClient
from tests.integration.conftest import running_server, server_config, spawn_client


async def run(
    folder: Path, client_data: list[Path], processes: list[subprocess.Popen[str]]
) -> Vector:
    config = server_config(
        folder,
        rounds=3,
        min_clients=2,
        eval_every=0,
        client_optimizer={"lrate": 0.3, "modules": ["momentum"]},
        aggregator=["averaging", {"weighting": "capped", "max_samples": 300}],
        chunk_mib=0.0010004,  # 1049-byte chunks: floats cut across chunk boundaries
        stage_replies_from_bytes=0,  # this small model's replies are staged on disk too
    )
    async with running_server(config) as server:
        processes += [spawn_client(config.port, f"site-{i}", client_data[i]) for i in range(2)]
        summary = await asyncio.wait_for(server, 120)
    assert summary.status == "completed" and summary.history[-1]["replied"] == 2
    return summary.weights


async def test_two_clients_folded_from_disk_give_the_bits_of_whole_replies(
    tmp_path: Path,
    client_data: list[Path],
    processes: list[subprocess.Popen[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from_disk: list[str] = []
    fold_spilled = rounds._Fold._fold_spilled

    def counted(self: rounds._Fold, result: Any, factor: float) -> None:
        from_disk.extend(result.spilled)
        fold_spilled(self, result, factor)

    monkeypatch.setattr(rounds._Fold, "_fold_spilled", counted)
    streamed = await run(tmp_path / "streamed", client_data, processes)
    assert from_disk == ["weighted_sum"] * 6  # each reply of the 3 rounds, from disk

    monkeypatch.setattr(GrpcClient, "spills", lambda self, message: None)  # whole replies
    whole = await run(tmp_path / "whole", client_data, processes)
    assert len(from_disk) == 6
    for name, array in whole.coefs.items():
        np.testing.assert_array_equal(streamed.coefs[name], array)
        assert not np.array_equal(array, np.zeros_like(array))
