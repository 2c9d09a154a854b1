"""benchmarks/privacy.py in its CI-sized form (``--quick``), as a user runs it (a subprocess)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_privacy_benchmark_quick_prints_its_three_tables() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "benchmarks/privacy.py", "--quick"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    # The calibrated run spends its target; the floor has no ε.
    assert re.search(r"target eps = 8 +[\d.]+ +8\.00 +[\d.]+ ", out), out
    assert re.search(r"client-level no DP \(floor\) +[\d.]+ +inf +- ", out), out
    # Plain: a 105,010-float32 update (420.0 kB); secure: the masked 32-bit update and more.
    assert re.search(r"10 plain +[\d.]+ +1\.00 +[\d.]+ +1\.00 +420\.0\n", out), out
    (secure,) = re.findall(r"10 secure +(?:[\d.]+ +){4}([\d.]+)\n", out)
    assert 420.0 < float(secure) < 430.0
    assert "10 secure, 30% gone at unmask" in out
    # The deployment: a server and 10 client processes, plain and secure, every round run.
    deployed = out.split("processes over loopback gRPC")[1]
    assert re.search(r"10 plain +[\d.]+ +1\.00 +[\d.]+ +[\d.]+\n", deployed), out
    assert re.search(r"10 secure +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+\n", deployed), out
