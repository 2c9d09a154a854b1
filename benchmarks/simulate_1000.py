"""Seconds per round and peak RSS: 1000 simulated clients in one process (in-process
transport), ``softmax-regression`` 100 -> 10 (Linear(100, 10)), one local step per client.

Each client holds ``--samples`` synthetic samples (``make_classification``, class-balanced
blobs split IID); ``training.max_steps = 1`` with a batch of that size; no evaluation
(``eval_every = 0``). Seconds per round come from the round loop's records; the first round
(warm-up: every client is initialized there) is left out and reported on its own. Peak RSS is
this process's ``VmHWM``.

Floor printed next to it: the bare numpy work of a round (per client: one forward/backward of
the batch, the update, a weighted add into the running sum), in a Python loop over clients.

Target (docs/architecture.md, "Performance targets"): <= 0.15 s/round and <= 1 GB (declearn
2.9.1: 1.62 s, 525 MB; Flower 1.42 with Ray: 7.1 s).

Usage: ``python benchmarks/simulate_1000.py [--clients 1000] [--rounds 10] [--samples 32]
[--profile out.prof]``
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import fmt_bytes, self_peak_rss, summarize, verdict

from fedpipe.common.config import SimulationConfig
from fedpipe.common.data import Dataset, make_classification
from fedpipe.server.simulation import simulate_inprocess

TARGET_S, TARGET_RSS = 0.15, 1_000_000_000
DECLEARN_S, DECLEARN_RSS, FLOWER_S = 1.62, 525e6, 7.1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--samples", type=int, default=32, help="samples per client")
    parser.add_argument("--features", type=int, default=100)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--profile", type=Path, help="cProfile the run into this .prof file")
    return parser.parse_args(argv)


def numpy_floor(clients: list[Dataset], n_features: int, n_classes: int) -> float:
    """One round of the bare numpy work, best of 3."""
    rng = np.random.default_rng(0)
    kernel = (rng.standard_normal((n_features, n_classes)) * 0.01).astype(np.float32)
    bias = np.zeros(n_classes, np.float32)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        total_k, total_b = np.zeros_like(kernel), np.zeros_like(bias)
        for data in clients:
            z = data.x @ kernel + bias
            z -= z.max(axis=1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)
            p[np.arange(len(data.y)), data.y] -= 1.0
            p /= len(data.y)
            gk, gb = data.x.T @ p, p.sum(axis=0)
            total_k += len(data.y) * (0.1 * gk)
            total_b += len(data.y) * (0.1 * gb)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    print(
        f"simulate_1000: {args.clients} in-process clients, softmax-regression "
        f"{args.features}->{args.classes}, {args.samples} samples/client, max_steps=1, "
        f"{args.rounds} rounds",
        flush=True,
    )
    full = make_classification(args.clients * args.samples, args.features, args.classes, seed=0)
    clients = [
        Dataset(full.x[i * args.samples : (i + 1) * args.samples].copy(),
                full.y[i * args.samples : (i + 1) * args.samples].copy())
        for i in range(args.clients)
    ]  # fmt: skip
    del full
    width = len(str(args.clients - 1))
    named = [(f"client-{i:0{width}d}", d, None) for i, d in enumerate(clients)]
    with tempfile.TemporaryDirectory(prefix="fedpipe-bench-") as tmp:
        sim = SimulationConfig.model_validate(
            {
                "n_clients": args.clients,
                "transport": "inprocess",
                "server": {
                    "rounds": args.rounds,
                    "min_clients": args.clients,
                    "eval_every": 0,
                    "model": {
                        "name": "softmax-regression",
                        "config": {"n_features": args.features, "n_classes": args.classes},
                    },
                    "client_optimizer": {"lrate": 0.1},
                    "training": {"epochs": 1, "max_steps": 1, "batch_size": args.samples},
                    "metrics": ["loss"],
                    "output_dir": str(Path(tmp) / "run"),
                },
            }
        )
        start = time.perf_counter()
        profiler = cProfile.Profile() if args.profile else None
        if profiler is not None:
            profiler.enable()
        summary = asyncio.run(simulate_inprocess(sim, named))
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(str(args.profile))
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
        wall = time.perf_counter() - start
    seconds = [float(r["seconds"]) for r in summary.history]
    stats = summarize(seconds[1:])
    rss = self_peak_rss()
    floor = numpy_floor(clients, args.features, args.classes)
    print(f"  round 1 (warm-up, initializes every client): {seconds[0]:.3f}s")
    print(
        f"  rounds 2..{len(seconds)} s/round: median {stats['median']:.4f}  "
        f"mean {stats['mean']:.4f}  min {stats['min']:.4f}   {verdict(stats['median'], TARGET_S)}"
    )
    print(
        f"  floor: bare numpy round (python loop over {args.clients} clients) {floor:.4f} s   "
        f"round/floor x{stats['median'] / floor:.1f}"
    )
    print(
        f"  peak RSS {fmt_bytes(rss)}   {verdict(rss / 1e9, TARGET_RSS / 1e9)} [GB]; "
        f"total wall {wall:.1f}s"
    )
    print(
        f"  vs declearn {DECLEARN_S} s ({DECLEARN_RSS / 1e6:.0f} MB): "
        f"x{DECLEARN_S / stats['median']:.1f} faster; vs Flower (Ray) {FLOWER_S} s: "
        f"x{FLOWER_S / stats['median']:.1f} faster"
    )
    return {
        "benchmark": "simulate_1000",
        "s_per_round_median": stats["median"],
        "s_per_round_mean": stats["mean"],
        "round1_seconds": seconds[0],
        "floor_numpy": floor,
        "peak_rss": rss,
        "target": TARGET_S,
    }


if __name__ == "__main__":
    main()
