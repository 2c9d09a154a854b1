"""Secure aggregation's protocol core (fedpipe.common.secagg) at n clients x P parameters,
transport excluded, next to its floors.

For the complete graph (SecAgg) and the SecAgg+ graph of degree ~2 log2 n, with no dropouts
and with 30 % of the clients dropping before sending masked input (their pairwise masks are
reconstructed and removed, the costliest recovery), prints the seconds of each stage summed
over clients (in a deployment the clients run in parallel: the per-client figure is the
client's latency) and the server's, and the bytes each client sends. Floors: a plain float32
sum of the n updates (a FedAvg round's aggregation), and the AES-256-CTR keystream of one mask.

Usage: ``python benchmarks/secagg.py [--clients 50] [--params 100_000] [--threshold 0]``
(``--threshold 0``: a majority of each client's holders).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field

import numpy as np

from fedpipe.common.secagg import SecAggClient, SecAggServer, SecureAggregationError
from fedpipe.common.secagg.prg import expand_mask
from fedpipe.common.vector import Vector


@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, stage: str, started: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started
        self.calls[stage] = self.calls.get(stage, 0) + 1


def run(
    updates: dict[str, Vector], threshold: int, neighbours: int | None, drop: set[str]
) -> tuple[Timings, float]:
    """One aggregation; the timings and the mean bytes a client sends."""
    clock = Timings()
    server = SecAggServer(threshold=threshold, bits=32, clip=1.0, neighbours=neighbours)
    clients = [SecAggClient(name) for name in updates]
    sent = 0
    for client in clients:
        start = time.perf_counter()
        keys = client.advertise()
        clock.add("client: advertise", start)
        server.receive_keys(keys)
    roster = server.roster()
    for client in clients:
        start = time.perf_counter()
        shares = client.share_keys(roster)
        clock.add("client: share keys", start)
        sent += sum(map(len, shares.ciphertexts.values())) + 64 * len(shares.commitments)
        server.receive_shares(shares)
    forwarded = server.forward_shares()
    survivors = [c for c in clients if c.name not in drop]
    for client in survivors:
        start = time.perf_counter()
        masked = client.masked_input(forwarded[client.name], updates[client.name])
        clock.add("client: masked input", start)
        sent += masked.masked.nbytes
        start = time.perf_counter()
        server.receive_masked(masked)
        clock.add("server: streaming sum", start)
    request = server.unmask_request()
    for client in survivors:
        start = time.perf_counter()
        reveal = client.unmask(request)
        clock.add("client: unmask", start)
        sent += 66 * (len(reveal.self_mask_shares) + len(reveal.mask_key_shares))
        server.receive_unmask(reveal)
    start = time.perf_counter()
    server.result()
    clock.add("server: unmask", start)
    return clock, sent / len(clients)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--threshold", type=int, default=0)
    args = parser.parse_args()
    n, size = args.clients, args.params
    rng = np.random.default_rng(0)
    updates = {
        f"c{i}": Vector({"w": rng.uniform(-1, 1, size).astype(np.float32)}) for i in range(n)
    }
    start = time.perf_counter()
    total = updates["c0"].copy()
    for i in range(1, n):
        total.add_(updates[f"c{i}"])
    plain = time.perf_counter() - start
    start = time.perf_counter()
    expand_mask(bytes(32), size, np.dtype(np.uint32))
    prg = time.perf_counter() - start
    print(f"{n} clients x {size:,} parameters (float32 -> 32-bit ring)")
    print(f"floor: plain float32 sum of {n} updates {plain:.4f} s; one mask (PRG) {prg:.5f} s")
    degree = 2 * math.ceil(math.log2(n))
    dropped = {f"c{i}" for i in range(0, n, 3)} if n >= 4 else set()
    dropped = set(sorted(dropped)[: int(0.3 * n)])
    for label, k in (("SecAgg (complete graph)", None), (f"SecAgg+ (k={degree})", degree)):
        holders = n if k is None or k >= n - 1 else k + 1
        t = args.threshold or holders // 2 + 1
        for drop in (set(), dropped):
            print(f"\n{label}, threshold {t}, {len(drop)} dropped before masked input")
            try:
                clock, sent = run(updates, t, k, drop)
            except SecureAggregationError as exc:  # a sparse graph may leave too few holders
                print(f"  failed: {exc}")
                continue
            for stage, seconds in clock.seconds.items():
                calls = clock.calls[stage]
                per = f" ({seconds / calls * 1e3:.1f} ms per client)" if "client" in stage else ""
                print(f"  {stage:24s} {seconds:8.3f} s{per}")
            plain_kb = 4 * size / 1e3
            print(f"  bytes sent, client mean  {sent / 1e3:8.1f} kB (plain: {plain_kb:.1f} kB)")


if __name__ == "__main__":
    main()
