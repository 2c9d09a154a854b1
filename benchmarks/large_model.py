"""A large model over loopback gRPC: a ``fedpipe server`` process and 2 ``fedpipe client``
processes, ``linear-regression`` 10000 x 10000 (100M float32 parameters, 400 MB), a few samples
per client, one local step, no evaluation.

Reports seconds per round (round loop clock from ``metrics.jsonl``, round 1 left out when there
are more) and the peak RSS (``VmHWM``) of the server and of each client, next to the model size
and floors: memcpy of the model 4 times (2 down + 2 up) and a raw gRPC stream moving the same
bytes (2 concurrent streams, each receiving the model and sending it back).

Targets (docs/architecture.md, "Performance targets"): 100M params <= 4 s/round and server
peak RSS <= 1.2 GB (declearn 2.9.1: 16 s, 3.9 GB; Flower 1.42: 16-27 s, 5.6-6.3 GB).
``--params 600M`` (2.4 GB model): runs, with server peak RSS <= 3x the model (declearn and
Flower run out of memory). Clients: peak RSS <= 2.5x the model, next to their floor of 2x
(the weights and one step's gradient, model-sized here; the start weights wait on disk) plus
the interpreter.

Usage: ``python benchmarks/large_model.py [--params 100M|600M|<n>] [--rounds 3]
[--samples 4] [--no-floors]``
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from _common import MIB, fmt_bytes, grpc_floor, memcpy_floor, run_federation, summarize, verdict

from fedpipe.common.data import Dataset

TARGET_S = 4.0
TARGET_RSS_100M = 1.2e9
RSS_MODEL_RATIO_600M = 3.0
#: A client holds the weights and a step's gradient while it trains (the start on disk).
CLIENT_RSS_MODEL_RATIO = 2.5
CLIENT_FLOOR_RATIO = 2.0


def parse_count(text: str) -> int:
    text = text.strip().upper().replace("_", "")
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * scale)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=parse_count, default=100_000_000, help="e.g. 100M")
    parser.add_argument("--outputs", type=int, default=10_000, help="n_outputs of the model")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--samples", type=int, default=4, help="samples per client")
    parser.add_argument("--chunk-mib", type=float, default=4.0)
    parser.add_argument("--no-checkpoint", action="store_true", help="checkpoint=false")
    parser.add_argument("--no-floors", action="store_true")
    parser.add_argument(
        "--aggregator", default="averaging", help="e.g. median (buffered: replies kept)"
    )
    parser.add_argument(
        "--profile", type=Path, help="py-spy server and client-0 into this folder (raw stacks)"
    )
    parser.add_argument(
        "--rss-timeline", action="store_true", help="print server and client-0 RSS over time"
    )
    parser.add_argument("--verbose", action="store_true", help="server and clients log INFO")
    return parser.parse_args(argv)


def print_timeline(
    name: str, series: list[tuple[float, int]], stamps: list[float], nbytes: int
) -> None:
    """A process's RSS over time (about 200 samples), with the server's round lines."""
    marks = iter(stamps)
    mark = next(marks, None)
    for t, value in series[:: max(1, len(series) // 200)]:
        while mark is not None and t >= mark:
            print(f"    {mark:7.2f}s  --- round line ---")
            mark = next(marks, None)
        print(f"    {t:7.2f}s  {name} RSS {value / nbytes:5.2f}x model  {fmt_bytes(value)}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    n_outputs = args.outputs
    n_features = max(1, math.ceil(args.params / n_outputs))
    n_params = n_features * n_outputs + n_outputs
    nbytes = 4 * n_params
    print(
        f"large_model: server + {args.clients} client processes, loopback gRPC, "
        f"linear-regression {n_features}x{n_outputs} = {n_params:,} float32 params "
        f"({fmt_bytes(nbytes)}), {args.samples} samples/client, max_steps=1, "
        f"{args.rounds} rounds, checkpoint={'off' if args.no_checkpoint else 'on'}",
        flush=True,
    )
    rng = np.random.default_rng(0)
    datasets = [
        Dataset(
            rng.standard_normal((args.samples, n_features), dtype=np.float32),
            rng.standard_normal((args.samples, n_outputs), dtype=np.float32),
        )
        for _ in range(args.clients)
    ]
    config = {
        "rounds": args.rounds,
        "min_clients": args.clients,
        "eval_every": 0,
        "round_timeout": 3600.0,
        "wait_timeout": 600.0,
        "model": {
            "name": "linear-regression",
            "config": {"n_features": n_features, "n_outputs": n_outputs},
        },
        "client_optimizer": {"lrate": 0.001},
        "aggregator": args.aggregator,
        "training": {"epochs": 1, "max_steps": 1, "batch_size": args.samples},
        "metrics": ["loss"],
        "checkpoint": not args.no_checkpoint,
        "chunk_mib": args.chunk_mib,
    }
    with tempfile.TemporaryDirectory(prefix="fedpipe-bench-", dir=None) as tmp:
        run = run_federation(
            config, datasets, Path(tmp), profile_dir=args.profile, verbose=args.verbose
        )
    seconds = run.round_seconds(skip=1 if len(run.records) > 1 else 0)
    stats = summarize(seconds)
    wall = summarize(run.round_intervals(skip=0))
    print(
        "  per round (loop clock): "
        + ", ".join(f"{float(r['seconds']):.2f}s" for r in run.records)
        + f"; wall between rounds: {', '.join(f'{s:.2f}s' for s in run.round_intervals(0))}"
    )
    print(
        f"  s/round (rounds 2..): median {stats['median']:.3f}  mean {stats['mean']:.3f}   "
        f"{verdict(stats['median'], TARGET_S)}"
    )
    print(f"  wall s/round incl. checkpoint: median {wall['median']:.3f}")
    rss = run.server_peak_rss
    if n_params <= 150_000_000:
        rss_line = verdict(rss / 1e9, TARGET_RSS_100M / 1e9) + " [GB]"
    else:
        rss_line = verdict(rss / nbytes, RSS_MODEL_RATIO_600M) + " [x model]"
    if args.rss_timeline:
        print_timeline("server", run.server_rss, run.round_stamps, nbytes)
        print_timeline("client-0", run.client_rss, run.round_stamps, nbytes)
    print(f"  server peak RSS {fmt_bytes(rss)} = {rss / nbytes:.2f}x model   {rss_line}")
    client = max(run.client_peak_rss)
    print(
        "  client peak RSS "
        + ", ".join(f"{fmt_bytes(c)} ({c / nbytes:.2f}x)" for c in run.client_peak_rss)
        + f"   {verdict(client / nbytes, CLIENT_RSS_MODEL_RATIO)} [x model]"
    )
    print(
        f"  client floor {CLIENT_FLOOR_RATIO:g}x model + the interpreter: the weights and one "
        "step's gradient (the start weights wait on disk; the update streams from both)"
    )
    floors: dict[str, float] = {}
    if not args.no_floors:
        floors["memcpy"] = memcpy_floor(nbytes, 2 * args.clients, repeat=2)
        floors["grpc"] = grpc_floor(nbytes, args.clients, int(args.chunk_mib * MIB), repeat=1)
        for name, floor in floors.items():
            print(
                f"  floor {name:<7} {floor:.3f} s ({2 * args.clients} model transfers, "
                f"{nbytes * 2 * args.clients / floor / 1e9:.2f} GB/s)   "
                f"round/floor x{stats['median'] / floor:.1f}"
            )
    print(f"  total wall {run.wall_seconds:.1f}s")
    return {
        "benchmark": f"large_model_{n_params // 1_000_000}M",
        "s_per_round_median": stats["median"],
        "server_peak_rss": rss,
        "client_peak_rss": client,
        "model_bytes": nbytes,
        **{f"floor_{k}": v for k, v in floors.items()},
    }


if __name__ == "__main__":
    main()
