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
