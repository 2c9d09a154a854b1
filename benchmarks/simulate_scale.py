"""Seconds per round and peak memory of simulations with many clients: the in-process transport
and the Dask transport (a local cluster, one worker process per core), at 100 and 1,000
clients (10,000 with ``--large``), ``softmax-regression`` 100 -> 10 (Linear(100, 10)), 5
rounds, one local step of 32 samples per client, no evaluation. Each transport in its default
mode (``mode = "auto"``): a numpy model's clients train stacked
(:mod:`fedpipe.common.stacked`), in-process in one cohort, on Dask one call per worker
(:mod:`fedpipe.server.transports.dask.cohort`).

Each point runs in its own process, so that its peak memory is its own: the sum of the RSS of
that process and of every process under it (the Dask workers and nannies), sampled every
20 ms with psutil. Seconds per round are the round loop's own (``seconds`` in the records),
median of rounds 2..5 (round 1 sets every client up). The floor, measured in this run: the
bare numpy work of a round (per client: forward, backward, the update, a weighted add into
the running sum) in a Python loop (``simulate_1000.numpy_floor``).

Targets (issue 12, on 2 cores): in-process <= 2x the floor at 1,000 and 10,000 clients and
<= 1 GB at 10,000; Dask within 1.5x of in-process at 1,000 clients (ahead of it with more
cores).

Each Dask point is also printed against in-process ("Dask vs in-process", with the worker and
core counts); ``--json`` writes every point (and the core count) as it is measured.

Usage: ``python benchmarks/simulate_scale.py [--large] [--clients 100,1000] [--rounds 5]
[--transports inprocess,dask] [--workers N[,M...]] [--json PATH]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from _common import fmt_bytes
from simulate_1000 import numpy_floor

from fedpipe.common.config import SimulationConfig
from fedpipe.common.data import Dataset, make_classification

FEATURES, CLASSES, SAMPLES = 100, 10, 32
FLOOR_RATIO, DASK_RATIO, LARGE_BYTES = 2.0, 1.5, 1e9


def client_data(n: int) -> list[tuple[str, Dataset, Dataset | None]]:
    full = make_classification(n * SAMPLES, FEATURES, CLASSES, seed=0)
    width = len(str(n - 1))
    parts = [slice(i * SAMPLES, (i + 1) * SAMPLES) for i in range(n)]
    return [
        (f"client-{i:0{width}d}", Dataset(full.x[part].copy(), full.y[part].copy()), None)
        for i, part in enumerate(parts)
    ]


class PeakMemory(threading.Thread):
    """The largest sum of RSS of this process and all under it, sampled every ``period`` s;
    the processes under it listed again every ``relist`` s (a listing reads every process of
    the machine: made at every sample, it took a core's tenth from the run it measures, and
    the interpreter lock from the in-process simulation's thread)."""

    def __init__(self, period: float = 0.02, relist: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.period, self.relist = period, relist
        self.peak, self.done = 0, threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        procs, listed = [me], 0.0
        while not self.done.wait(self.period):
            if time.monotonic() - listed >= self.relist:
                procs, listed = [me, *me.children(recursive=True)], time.monotonic()
            total = 0
            for proc in procs:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass  # a process that just ended
            self.peak = max(self.peak, total)


def run_point(transport: str, n: int, rounds: int, workers: int | None) -> dict[str, Any]:
    """One simulation in this process: s/round (median of rounds 2..) and peak memory."""
    from fedpipe.server.simulation import simulate_inprocess
    from fedpipe.server.transports.dask.run import simulate_dask

    clients = client_data(n)
    with tempfile.TemporaryDirectory(prefix="fedpipe-bench-") as tmp:
        sim = SimulationConfig.model_validate(
            {
                "n_clients": n,
                "transport": transport,
                "dask": {"workers": workers} if workers else {},
                "server": {
                    "rounds": rounds,
                    "min_clients": n,
                    "max_clients": n,
                    "eval_every": 0,
                    "model": {
                        "name": "softmax-regression",
                        "config": {"n_features": FEATURES, "n_classes": CLASSES},
                    },
                    "client_optimizer": {"lrate": 0.1},
                    "training": {"epochs": 1, "max_steps": 1, "batch_size": SAMPLES},
                    "metrics": ["loss"],
                    "output_dir": str(Path(tmp) / "run"),
                },
            }
        )
        run = simulate_dask if transport == "dask" else simulate_inprocess
        memory = PeakMemory()
        memory.start()
        summary = asyncio.run(run(sim, clients))
        memory.done.set()
        memory.join()
    seconds = [float(r["seconds"]) for r in summary.history]
    return {
        "status": summary.status,
        "round1": seconds[0],
        "s_per_round": statistics.median(seconds[1:]),
        "peak_bytes": memory.peak,
    }


def measure(
    transport: str, n: int, args: argparse.Namespace, workers: int | None
) -> dict[str, Any]:
    """:func:`run_point` in a fresh process."""
    cmd = [sys.executable, __file__, "--point", transport, str(n), "--rounds", str(args.rounds)]
    cmd += ["--workers", str(workers)] if workers else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=3600)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def report(n: int, floor: float, points: dict[str, dict[str, Any]], cores: int) -> None:
    """Each point's line; a Dask point's against in-process (``vs_inprocess`` added)."""
    print(f"  {n:>6} clients: numpy floor {floor:.4f} s/round", flush=True)
    inproc = points.get("inprocess")
    for label, p in points.items():
        ratio = p["s_per_round"] / floor
        line = (
            f"    {label:<13} {p['s_per_round']:.4f} s/round ({ratio:.1f}x floor) "
            f"round 1 {p['round1']:.2f} s, peak {fmt_bytes(p['peak_bytes'])} [{p['status']}]"
        )
        if label == "inprocess" and n >= 1000:
            line += f"  target <= {FLOOR_RATIO}x floor: {'ok' if ratio <= FLOOR_RATIO else 'MISS'}"
            if n >= 10_000:
                line += f"; <= 1 GB: {'ok' if p['peak_bytes'] <= LARGE_BYTES else 'MISS'}"
        print(line, flush=True)
    for p in points.values():
        if p["transport"] != "dask" or inproc is None:
            continue
        p["vs_inprocess"] = vs = p["s_per_round"] / inproc["s_per_round"]
        # Issue 12: within 1.5x on 2 cores; ahead of in-process with more cores.
        bound = DASK_RATIO if cores <= 2 else 1.0
        verdict = f"target <= {bound}x: {'ok' if vs <= bound else 'MISS'}" if n >= 1000 else ""
        print(
            f"    Dask vs in-process, {n} clients, {p['workers']} worker(s) on {cores} cores: "
            f"{vs:.2f}x ({'ahead' if vs < 1 else 'behind'}) {verdict}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="100,1000")
    parser.add_argument("--large", action="store_true", help="add 10,000 clients")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--transports", default="inprocess,dask")
    parser.add_argument(
        "--workers", help="Dask workers, a point each: N or N,M,... (default: one per core)"
    )
    parser.add_argument("--json", type=Path, help="write every point here (after each one)")
    parser.add_argument("--point", nargs=2, metavar=("TRANSPORT", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.point:
        workers = int(args.workers) if args.workers else None
        print(json.dumps(run_point(args.point[0], int(args.point[1]), args.rounds, workers)))
        return
    counts = [int(c) for c in args.clients.split(",")] + [10_000] * args.large
    cores = len(os.sched_getaffinity(0))
    pools = [int(w) for w in args.workers.split(",")] if args.workers else [cores]
    print(
        f"simulate_scale: softmax-regression {FEATURES}->{CLASSES}, {SAMPLES} samples and 1 "
        f"step per client, {args.rounds} rounds; {cores} cores, Dask workers: "
        f"{', '.join(map(str, pools))}",
        flush=True,
    )
    results: dict[str, Any] = {"cores": cores, "rounds": args.rounds, "points": []}
    for n in counts:
        floor = numpy_floor([data for _, data, _ in client_data(n)], FEATURES, CLASSES)
        points: dict[str, dict[str, Any]] = {}
        for transport in args.transports.split(","):
            for workers in pools if transport == "dask" else [None]:
                label = transport if workers is None else f"dask {workers}w"
                point = measure(transport, n, args, workers)
                point.update(transport=transport, workers=workers, clients=n, floor=floor)
                points[label] = point
                results["points"].append(point)
                if args.json:  # what a time limit cuts short still has the points so far
                    args.json.write_text(json.dumps(results, indent=1))
        report(n, floor, points, cores)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    if "--point" not in sys.argv:
        print(f"  total wall {time.perf_counter() - start:.0f} s")
