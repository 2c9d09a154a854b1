"""Encode + decode a large float32 Vector, next to its floors.

Paths measured (best of ``--repeat`` runs, each a full round trip):

* payload: ``encode_payload`` -> ``chunk_frame`` -> ``parse_chunk_frame`` ->
  ``PayloadAssembler.add_chunk`` -> ``finish`` (the gRPC hot path minus the socket);
* state bytes: ``state_to_bytes`` -> ``state_from_bytes`` (one protobuf message; small states);

and floors over the same arrays: ``np.copyto`` into preallocated arrays, ``arr.copy()`` (fresh
allocations, like the assembler's), and a protobuf ``bytes`` field round trip.

Target (docs/architecture.md, "Performance targets"): the payload path at >= half of a numpy
copy's GB/s.

Usage: ``python benchmarks/codec.py [--size 100_000_000] [--chunk-mib 4] [--repeat 5]``
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable

import numpy as np

from fedpipe.common.codec import state_from_bytes, state_to_bytes
from fedpipe.common.payload import (
    CHUNK_FIELD,
    PayloadAssembler,
    chunk_frame,
    encode_payload,
    parse_chunk_frame,
)
from fedpipe.common.state import State
from fedpipe.common.vector import Vector
from fedpipe.proto.fedpipe.v1 import tensor_pb2 as pb


def best_of(repeat: int, func: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        result = func()
        times.append(time.perf_counter() - start)
        del result
    return min(times)


def make_vector(size: int, layers: int) -> Vector:
    rng = np.random.default_rng(0)
    sizes = [size // layers] * layers
    sizes[-1] += size - sum(sizes)
    return Vector({f"layer{i}": rng.random(n, dtype=np.float32) for i, n in enumerate(sizes)})


def payload_round_trip(state: State, chunk_size: int, max_bytes: int) -> State:
    payload = encode_payload(state, chunk_size)
    header = pb.PayloadHeader.FromString(payload.header.SerializeToString())
    assembler = PayloadAssembler(header, max_bytes=max_bytes, allow_nonfinite=False)
    for tensor, offset, data in payload.chunks():
        chunk = parse_chunk_frame(chunk_frame(CHUNK_FIELD, tensor, offset, data), CHUNK_FIELD)
        assert chunk is not None
        assembler.add_chunk(*chunk)
    return assembler.finish()


def copy_into(targets: list[np.ndarray], arrays: list[np.ndarray]) -> None:
    for target, array in zip(targets, arrays, strict=True):
        np.copyto(target, array)


def protobuf_round_trip(array: np.ndarray) -> bytes:
    frame = pb.Chunk(data=array.tobytes()).SerializeToString()
    return pb.Chunk.FromString(frame).data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=lambda s: int(float(s)), default=100_000_000)
    parser.add_argument("--layers", type=int, default=4, help="arrays in the Vector")
    parser.add_argument("--chunk-mib", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    vector = make_vector(args.size, args.layers)
    state: State = {"weights": vector}
    nbytes = vector.nbytes
    chunk_size = int(args.chunk_mib * (1 << 20))
    # Floors copy the same arrays as the payload path allocates (allocation size decides
    # whether malloc maps fresh, huge-page backed memory or reuses its heap).
    arrays = list(vector.coefs.values())
    targets = [np.empty_like(a) for a in arrays]
    copy_into(targets, arrays)  # touch the pages once: this floor is a pure memcpy

    out = payload_round_trip(state, chunk_size, nbytes)
    assert isinstance(out["weights"], Vector) and out["weights"].array_equal(vector)
    back = state_from_bytes(state_to_bytes(state))
    assert isinstance(back["weights"], Vector) and back["weights"].array_equal(vector)
    del out, back

    results = {
        "floor: np.copyto (prealloc)": best_of(args.repeat, lambda: copy_into(targets, arrays)),
        "floor: arr.copy()": best_of(args.repeat, lambda: [a.copy() for a in arrays]),
        "floor: protobuf bytes round trip": best_of(
            args.repeat, lambda: [protobuf_round_trip(a) for a in arrays]
        ),
        "payload round trip": best_of(
            args.repeat, lambda: payload_round_trip(state, chunk_size, nbytes)
        ),
        "state_to/from_bytes round trip": best_of(
            args.repeat, lambda: state_from_bytes(state_to_bytes(state))
        ),
    }
    copy_rate = nbytes / results["floor: arr.copy()"] / 1e9
    copyto_rate = nbytes / results["floor: np.copyto (prealloc)"] / 1e9
    print(
        f"{args.size:,} float32 in {args.layers} arrays ({nbytes / 1e6:.0f} MB), "
        f"chunks of {args.chunk_mib:g} MiB, best of {args.repeat}"
    )
    print(f"{'path':34} {'seconds':>8} {'GB/s':>7} {'/copy()':>8} {'/copyto':>8}")
    for name, seconds in results.items():
        rate = nbytes / seconds / 1e9
        print(
            f"{name:34} {seconds:8.3f} {rate:7.2f} {rate / copy_rate:8.2f} "
            f"{rate / copyto_rate:8.2f}"
        )
    payload_rate = nbytes / results["payload round trip"] / 1e9
    verdict = "meets" if payload_rate >= 0.5 * copy_rate else "MISSES"
    print(
        f"payload path {verdict} the target: {payload_rate:.2f} GB/s vs half of arr.copy() "
        f"{0.5 * copy_rate:.2f} GB/s (half of np.copyto: {0.5 * copyto_rate:.2f})"
    )


if __name__ == "__main__":
    main()
