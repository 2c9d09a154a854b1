"""FedAvg, FedProx, Scaffold and FedAdam on a strongly label-skewed split of digits.

Not a test: a comparison to read. Each algorithm runs the same in-process simulation (same
partition, model, rounds, local work); prints final federated loss and accuracy, and the
round at which each first reached 90% accuracy.

    .venv/bin/python benchmarks/algorithms.py [--alpha 0.1] [--rounds 30] [--clients 20]
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

from fedpipe.common.config import SimulationConfig
from fedpipe.server.simulation import simulate

ALGORITHMS: dict[str, dict[str, Any]] = {
    "FedAvg": {},
    "FedProx (mu=0.1)": {
        "client_optimizer": {"lrate": 0.2, "regularizers": [["fedprox", {"mu": 0.1}]]}
    },
    "Scaffold": {
        "client_optimizer": {"lrate": 0.2, "modules": ["scaffold-client"]},
        "server_optimizer": {"lrate": 1.0, "modules": ["scaffold-server"]},
    },
    "FedAdam": {
        "server_optimizer": {"lrate": 0.03, "modules": [["adam", {"beta_2": 0.99, "eps": 1e-3}]]},
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3, help="partition seeds to average over")
    args = parser.parse_args()
    print(
        f"digits, {args.clients} clients, Dirichlet alpha={args.alpha}, {args.rounds} rounds, "
        f"softmax regression, 2 local epochs, mean over {args.seeds} partition seeds"
    )
    print(f"{'algorithm':<18} {'loss':>8} {'accuracy':>9} {'round to 90%':>13}")
    for name, overrides in ALGORITHMS.items():
        losses, accs, firsts = [], [], []
        for seed in range(args.seeds):
            server: dict[str, Any] = {
                "rounds": args.rounds,
                "min_clients": args.clients,
                "model": {"name": "softmax-regression"},
                "client_optimizer": {"lrate": 0.2},
                "training": {"epochs": 2, "batch_size": 16},
                "output_dir": tempfile.mkdtemp(prefix="fedpipe-bench-"),
                **overrides,
            }
            sim = SimulationConfig.model_validate(
                {
                    "n_clients": args.clients,
                    "dataset": "digits",
                    "partition": {"scheme": "dirichlet", "alpha": args.alpha, "seed": seed},
                    "server": server,
                }
            )
            history = simulate(sim).history
            losses.append(history[-1]["loss"])
            accs.append(history[-1]["accuracy"])
            reached = [r["round"] for r in history if r.get("accuracy", 0) >= 0.9]
            firsts.append(reached[0] if reached else None)
        shown = ",".join("-" if f is None else str(f) for f in firsts)
        print(
            f"{name:<18} {sum(losses) / len(losses):>8.4f} {sum(accs) / len(accs):>9.4f} "
            f"{shown:>13}"
        )


if __name__ == "__main__":
    main()
