"""Federated LoRA fine-tuning of a small BERT: only the adapters travel.

Run from the repository root (needs ``pip install 'fedpipe[torch,lora]'``)::

    python examples/lora_finetune/run.py --clients 4 --rounds 5

Each of the simulated clients holds a share of a synthetic task (is the keyword token in the
sequence?). The model is built locally from a config, nothing is downloaded. The script prints
each round's metrics, then the bytes each client exchanges per round, measured on the encoded
payloads (the adapters and the head), next to the full model's size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))  # lora_model, by import path "lora_model:build"

from lora_model import KEYWORD, VOCAB, build

from fedpipe.common.config import SimulationConfig
from fedpipe.common.payload import encode_payload
from fedpipe.server.simulation import simulate


def synthetic_data(path: Path, n: int = 1200, length: int = 12, seed: int = 0) -> Path:
    """Token sequences (a leading id 0, as BERT's [CLS]); label 1 when ``KEYWORD`` occurs."""
    rng = np.random.default_rng(seed)
    x = rng.integers(KEYWORD + 1, VOCAB, size=(n, length))
    x[:, 0] = 0
    y = rng.integers(0, 2, size=n)
    for row in np.flatnonzero(y):
        x[row, rng.integers(1, length, size=rng.integers(1, 3))] = KEYWORD
    np.savez(path, x=x.astype(np.float32), y=y)
    return path


def payload_bytes(weights: Any) -> tuple[int, int]:
    """Tensor bytes and wire bytes (with the header) of one payload of ``weights``."""
    payload = encode_payload({"weights": weights})
    return payload.total_bytes, payload.total_bytes + payload.header.ByteSize()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--samples", type=int, default=1200, help="sequences in all")
    parser.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    parser.add_argument("--out", type=Path, default=Path("runs/lora-finetune"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model = {"name": "lora_model:build", "config": {"rank": args.rank}}
    sim = SimulationConfig.model_validate(
        {
            "n_clients": args.clients,
            "dataset": str(synthetic_data(args.out / "tokens.npz", args.samples)),
            "partition": {"scheme": "iid"},
            "server": {
                "rounds": args.rounds,
                "min_clients": args.clients,
                "model": model,
                "client_optimizer": {"lrate": 0.01, "modules": ["adam"]},
                "training": {"epochs": args.epochs, "batch_size": 16},
                "output_dir": str(args.out / "run"),
            },
        }
    )
    summary = simulate(sim, overwrite=True)
    for record in summary.history:
        metrics = {k: v for k, v in record.items() if k in ("loss", "accuracy", "train_loss")}
        print(f"round {record['round']}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    tensors, wire = payload_bytes(summary.weights)
    local = build(rank=args.rank)
    full = sum(p.numel() * p.element_size() for p in local.module.parameters())
    print(
        f"bytes per client per round: {wire:,} down + {wire:,} up ({tensors:,} of adapters and "
        f"head); full model {full:,} bytes, {full / tensors:.0f}x more"
    )
    return {"history": summary.history, "payload_bytes": tensors, "full_bytes": full}


if __name__ == "__main__":
    main()
