"""benchmarks/gpu_simulation.py in its CPU-sized form, as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_simulation_small_runs_every_mode_and_agrees(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_simulation.py", "--small", "--device", "cpu",
         "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["params"] == 545_098  # the CNN
    assert (result["clients"], result["samples"], result["rounds"]) == (3, 40, 2)
    assert list(result["seconds"]) == ["loop", "vmap", "vectorized", "sequential"]
    for mode, seconds in result["seconds"].items():
        assert len(seconds) == 2 and min(seconds) > 0
        assert result["updates_per_s"][mode] == pytest.approx(3 / result["s_per_round"][mode])
    assert set(result["ratios"]) == {
        "vectorized updates/s",
        "vectorized / vmap floor",
        "vectorized / per-client loop",
        "sequential / per-client loop",
    }
    # same seed, same batches: the engine 3 clients at once and 1 at a time agree
    assert result["max_abs_diff_vectorized_sequential"] < 1e-5
    assert "fedpipe vectorized" in proc.stdout and "target >= 450" in proc.stdout


def test_the_sequential_mode_frees_each_clients_turn_as_the_round_loop_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two inline turns for 3 clients: a benchmark that never releases a folded reply's turn
    # waits forever for the third client (as it did with more than 30 clients of the CNN).
    import asyncio

    from fedpipe.server.transports import inprocess

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_simulation

    monkeypatch.setattr(inprocess, "INLINE_REPLY_BYTES", 1)
    args = gpu_simulation.parse_args(["--small", "--device", "cpu"])
    x, y = (t.numpy() for t in gpu_simulation.synthetic(args))
    rounds = gpu_simulation._simulated_rounds(args, x, y, "sequential")
    seconds, weights = asyncio.run(asyncio.wait_for(rounds, timeout=60))
    assert len(seconds) == args.rounds and weights.is_finite()
