"""GPU clients as users run them: real ``fedpipe client --device cuda:0`` processes against a
real server, next to a CPU client in the same federation; and the GPU simulation modes
against each other. Skipped without a CUDA device."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from fedpipe.server.simulation import simulate
from tests.integration.conftest import finish, running_server, server_config, spawn_client
from tests.server.test_inprocess import sim_config

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MODEL = "tests.common.torch_models:build"


async def test_gpu_and_cpu_clients_train_digits_together(
    tmp_path: Path, client_data: list[Path], processes: list[subprocess.Popen[str]]
) -> None:
    config = server_config(
        tmp_path,
        rounds=4,
        model={"name": MODEL, "config": {"hidden": 32}},
        client_optimizer={"lrate": 0.1, "modules": [["momentum", {"beta": 0.9}]]},
        metrics=["accuracy", "loss"],
    )
    trusted = ["--set", f'trusted_models=["{MODEL}"]', "--threads", "1"]
    devices = ["cuda:0", "cuda:0", "cpu"]
    async with running_server(config) as server:
        processes += [
            spawn_client(config.port, f"c{i}", client_data[i], *trusted, "--device", device)
            for i, device in enumerate(devices)
        ]
        summary = await asyncio.wait_for(server, 240)
        outcomes = await asyncio.gather(*(asyncio.to_thread(finish, p, 60) for p in processes))
    assert [code for code, _ in outcomes] == [0, 0, 0], outcomes
    assert summary.rounds_completed == 4
    assert summary.history[-1]["replied"] == 3
    assert summary.history[-1]["accuracy"] >= 0.9, summary.history[-1]
    for (_, out), device in zip(outcomes, devices, strict=True):
        assert f"2410 trainable parameters (9640 bytes) on {device}" in out, out[-2000:]


def test_a_bfloat16_model_trains_on_the_gpu_as_well_as_float32(tmp_path: Path) -> None:
    runs = {
        dtype: simulate(
            sim_config(
                tmp_path / dtype,
                "cuda",
                rounds=6,
                model={"name": MODEL, "config": {"hidden": 16, "dtype": dtype}},
            )
        )
        for dtype in ("float32", "bfloat16")
    }
    assert {r.status for r in runs.values()} == {"completed"}
    accuracy = {d: r.history[-1]["accuracy"] for d, r in runs.items()}
    assert accuracy["float32"] > 0.6, accuracy
    assert accuracy["bfloat16"] == pytest.approx(accuracy["float32"], abs=0.05), accuracy


@pytest.mark.parametrize("optimizer", ["momentum", "scaffold-clipped"])
def test_vectorized_and_sequential_modes_agree_on_the_gpu(tmp_path: Path, optimizer: str) -> None:
    modules = {
        "momentum": {"lrate": 0.2, "modules": [["momentum", {"beta": 0.9}]]},
        "scaffold-clipped": {
            "lrate": 0.2,
            "modules": [["l2-clipping", {"max_norm": 0.5}], "scaffold-client"],
        },
    }[optimizer]
    server = {"client_optimizer": modules}
    if optimizer == "scaffold-clipped":
        server["server_optimizer"] = {"lrate": 1.0, "modules": ["scaffold-server"]}
    runs = {}
    for mode in ("sequential", "vectorized"):
        sim = sim_config(tmp_path / mode, "cuda", **server)
        runs[mode] = simulate(sim.model_copy(update={"mode": mode}))
    assert {r.status for r in runs.values()} == {"completed"}
    # the same maths in other kernels: float32 rounding apart, the same run
    assert runs["vectorized"].weights.allclose(runs["sequential"].weights, rtol=0, atol=1e-4)
    for v, s in zip(runs["vectorized"].history, runs["sequential"].history, strict=True):
        assert v["replied"] == s["replied"]
        assert v["accuracy"] == pytest.approx(s["accuracy"], abs=0.01)
