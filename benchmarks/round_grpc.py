"""Seconds per round: a ``fedpipe server`` process and 8 ``fedpipe client`` processes over
loopback gRPC, a 1M-float32-parameter model, one local step per client, no evaluation.

The model is ``linear-regression`` 1000 -> 1000 (1,001,000 float32 parameters, 3.8 MiB); each
client holds a few synthetic samples and runs ``training.max_steps = 1``. The server is started
with ``fedpipe server --config <json>`` and the clients with ``fedpipe client``, exactly as a
deployment would; per-round ``seconds`` are read from the server's ``metrics.jsonl`` (the round
loop's own clock, checkpoint excluded) and the wall time between its progress lines (checkpoint
and metrics files included). Round 1 (warm-up) is left out of the statistics.

Floors printed next to it, over the same bytes:

* memcpy: ``np.copyto`` of the model 16 times (8 downloads + 8 uploads);
* raw gRPC: a minimal ``grpc.aio`` bytes stream, server in its own process, 8 concurrent
  streams each receiving the model and sending it back, in chunks of ``--chunk-mib``.

Target (docs/architecture.md, "Performance targets"): <= 0.08 s/round (declearn 2.9.1: 1.04 s,
Flower 1.42 legacy API: 0.24 s).

Usage: ``python benchmarks/round_grpc.py [--rounds 10] [--clients 8] [--features 1000]
[--outputs 1000] [--samples 8] [--no-checkpoint] [--profile server.speedscope.json]``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import (
    MIB,
    fmt_bytes,
    grpc_floor,
    memcpy_floor,
    run_federation,
    summarize,
    verdict,
)

from fedpipe.common.data import make_regression

TARGET = 0.08
DECLEARN, FLOWER_LEGACY = 1.04, 0.24


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--features", type=int, default=1000)
    parser.add_argument("--outputs", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=8, help="samples per client")
    parser.add_argument("--chunk-mib", type=float, default=4.0)
    parser.add_argument("--no-checkpoint", action="store_true", help="checkpoint=false")
    parser.add_argument(
        "--blas-threads",
        type=int,
        default=1,
        help="math threads per client process (default 1, as `fedpipe simulate` sets: "
        "8 clients share 2 cores; 0 keeps the environment's)",
    )
    parser.add_argument("--no-floors", action="store_true", help="skip the floor measurements")
    parser.add_argument(
        "--profile", type=Path, help="py-spy server and client-0 into this folder (raw stacks)"
    )
    parser.add_argument("--keep", type=Path, help="keep the run folder here")
    return parser.parse_args(argv)


def server_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "rounds": args.rounds,
        "min_clients": args.clients,
        "eval_every": 0,
        "round_timeout": 600.0,
        "wait_timeout": 120.0,
        "model": {
            "name": "linear-regression",
            "config": {"n_features": args.features, "n_outputs": args.outputs},
        },
        "client_optimizer": {"lrate": 0.01},
        "training": {"epochs": 1, "max_steps": 1, "batch_size": args.samples},
        "metrics": ["loss"],
        "checkpoint": not args.no_checkpoint,
        "chunk_mib": args.chunk_mib,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    n_params = args.features * args.outputs + args.outputs
    nbytes = 4 * n_params
    blas = args.blas_threads or os.environ.get("OPENBLAS_NUM_THREADS", "unset")
    print(
        f"round_grpc: server + {args.clients} client processes, loopback gRPC, "
        f"linear-regression {args.features}x{args.outputs} = {n_params:,} float32 params "
        f"({fmt_bytes(nbytes)}), {args.samples} samples/client, max_steps=1, "
        f"{args.rounds} rounds, checkpoint={'off' if args.no_checkpoint else 'on'}, "
        f"client OPENBLAS_NUM_THREADS={blas}",
        flush=True,
    )
    datasets = [
        make_regression(args.samples, args.features, args.outputs, seed=i)
        for i in range(args.clients)
    ]
    with tempfile.TemporaryDirectory(prefix="fedpipe-bench-") as tmp:
        work = args.keep or Path(tmp)
        client_env = {}
        if args.blas_threads:
            client_env["OPENBLAS_NUM_THREADS"] = str(args.blas_threads)
        run = run_federation(
            server_config(args), datasets, work, profile_dir=args.profile, client_env=client_env
        )
    if len(run.records) != args.rounds:
        print(f"warning: {len(run.records)} of {args.rounds} rounds recorded", file=sys.stderr)
    loop = summarize(run.round_seconds())
    wall = summarize(run.round_intervals())
    transfers = 2 * args.clients
    floors: dict[str, float] = {}
    if not args.no_floors:
        floors["memcpy"] = memcpy_floor(nbytes, transfers)
        floors["grpc"] = grpc_floor(nbytes, args.clients, int(args.chunk_mib * MIB))

    print(f"  rounds 2..{len(run.records)} (round 1 = warm-up: {run.records[0]['seconds']:.3f}s)")
    print(
        f"  round loop  s/round: median {loop['median']:.4f}  mean {loop['mean']:.4f}  "
        f"min {loop['min']:.4f}   {verdict(loop['median'], TARGET)}"
    )
    print(
        f"  wall        s/round: median {wall['median']:.4f}  mean {wall['mean']:.4f}  "
        "(between progress lines: + checkpoint + metrics files)"
    )
    for name, label in (("memcpy", f"memcpy x{transfers}"), ("grpc", "raw gRPC stream")):
        if name in floors:
            floor = floors[name]
            print(
                f"  floor {label:<18} {floor:.4f} s   round/floor x{loop['median'] / floor:.1f}"
                f"   ({nbytes * transfers / floor / 1e9:.2f} GB/s)"
            )
    print(
        f"  vs declearn {DECLEARN} s: x{DECLEARN / loop['median']:.1f} faster; "
        f"vs Flower legacy {FLOWER_LEGACY} s: x{FLOWER_LEGACY / loop['median']:.1f} faster"
    )
    cpu = run.cpu_per_round()
    if cpu:
        print(
            f"  CPU s/round: server {cpu['server']:.3f}, clients (sum) {cpu['clients']:.3f}, "
            f"total {cpu['server'] + cpu['clients']:.3f} on {os.cpu_count()} cores"
        )
    print(
        f"  peak RSS: server {fmt_bytes(run.server_peak_rss)}, clients max "
        f"{fmt_bytes(max(run.client_peak_rss))}; total wall {run.wall_seconds:.1f}s"
    )
    return {
        "benchmark": "round_grpc",
        "s_per_round_median": loop["median"],
        "s_per_round_mean": loop["mean"],
        "wall_s_per_round_median": wall["median"],
        "target": TARGET,
        **{f"floor_{k}": v for k, v in floors.items()},
        "server_peak_rss": run.server_peak_rss,
    }


if __name__ == "__main__":
    main()
