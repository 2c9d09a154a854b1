"""Run the benchmarks (fast variants by default) and print one summary table.

Usage: ``python benchmarks/run_all.py [--full]`` (``make bench`` runs the fast variants).

Fast: ``round_grpc`` 6 rounds, ``simulate_1000`` 6 rounds, ``large_model`` 100M params 2 rounds
without floors, ``gpu_simulation --small`` (3 clients on the CPU; the GPU figures come from
``python benchmarks/gpu_simulation.py`` on a GPU machine). ``--full``: the scripts' defaults
(10 / 10 / 3 rounds, floors included).
The 600M variant is not run here: ``python benchmarks/large_model.py --params 600M``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import gpu_simulation
import large_model
import round_grpc
import simulate_1000
from _common import fmt_bytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the scripts' default sizes")
    args = parser.parse_args()
    runs: list[tuple[str, Any, list[str]]] = [
        ("round_grpc", round_grpc.main, [] if args.full else ["--rounds", "6"]),
        ("simulate_1000", simulate_1000.main, [] if args.full else ["--rounds", "6"]),
        ("large_model", large_model.main, [] if args.full else ["--rounds", "2", "--no-floors"]),
        ("gpu_simulation", gpu_simulation.main, ["--small", "--device", "cpu"]),
    ]
    results = []
    for name, func, argv in runs:
        start = time.perf_counter()
        print(f"\n=== {name} {' '.join(argv)}", flush=True)
        results.append(func(argv))
        print(f"=== {name}: {time.perf_counter() - start:.0f}s", flush=True)
    print("\nbenchmark           s/round    target   peak RSS (server/process)")
    targets = {
        "round_grpc": "0.08",
        "simulate_1000": "0.15",
        "large_model_100M": "4",
        "gpu_simulation": "GPU",
    }
    for result in results:
        name = result["benchmark"]
        rss = result.get("server_peak_rss", result.get("peak_rss", 0))
        print(
            f"{name:<18} {result['s_per_round_median']:8.3f}  <= {targets.get(name, '?'):<5}  "
            f"{fmt_bytes(rss)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
