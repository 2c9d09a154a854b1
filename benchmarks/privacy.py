"""Accuracy against ε on digits: no DP, client-level DP (DP-FedAvg) and sample-level DP-SGD.

Two federations of softmax regression on the built-in digits data set (1,797 images, 10
classes; chance is 0.10), each run in-process:

- **client-level DP** (``[server.privacy]``, central noise): 100 clients from a Dirichlet
  split (alpha 0.5), Poisson client sampling q = 0.2, updates clipped to 1.0, uniform
  weighting, 30 rounds; noise multiplier z in {0.7, 1.0, 2.0}, and no DP;
- **sample-level DP-SGD** (the clients' ``dp_sgd``): 10 clients from an IID split (about 135
  training images each), Poisson batches of expected size 16, per-sample clip 1.0, 10 rounds
  of one epoch; noise multiplier in {0.8, 1.5}, and no DP.

Prints one line per run: final accuracy (on the clients' held-out 25 %), ε at δ = 1e-5 as the
run reports it (client-level: ``epsilon`` of summary.json; sample-level: the largest client's
``sample_epsilon_max``), and the wall seconds. The floor of each family is its no-DP run.
Under ~2 minutes on 2 cores.

Usage: ``python benchmarks/privacy.py``
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any

from fedpipe.common.config import SimulationConfig
from fedpipe.server.simulation import simulate

CLIENT_LEVEL = {"n_clients": 100, "partition": {"scheme": "dirichlet", "alpha": 0.5, "seed": 1}}
SAMPLE_LEVEL = {"n_clients": 10, "partition": {"scheme": "iid", "seed": 1}}


def run(federation: dict[str, Any], rounds: int, batch: int, **extra: Any) -> tuple[float, Any]:
    """One simulation; its final accuracy and reported ε (None without DP)."""
    server = extra.pop("server", {})
    with tempfile.TemporaryDirectory() as out:
        sim = SimulationConfig.model_validate(
            {
                **federation,
                **extra,
                "server": {
                    "rounds": rounds,
                    "min_clients": federation["n_clients"],
                    "eval_every": rounds,
                    "client_optimizer": {"lrate": 0.3},
                    "training": {"epochs": 1, "batch_size": batch},
                    "output_dir": out,
                    "checkpoint": False,
                    **server,
                },
            }
        )
        summary = simulate(sim, overwrite=True).raise_for_status()
    data = summary.to_data()
    epsilon = data.get("epsilon", data.get("sample_epsilon_max"))
    return float(summary.history[-1]["accuracy"]), epsilon


def client_level(z: float | None) -> dict[str, Any]:
    server: dict[str, Any] = {
        "sampler": ["poisson", {"q": 0.2}],
        "aggregator": ["averaging", {"weighting": "uniform"}],
    }
    if z is not None:
        server["privacy"] = {"clip": 1.0, "noise_multiplier": z, "delta": 1e-5}
    return {"server": server}


def sample_level(z: float | None) -> dict[str, Any]:
    return {} if z is None else {"dp_sgd": {"clip": 1.0, "noise_multiplier": z, "delta": 1e-5}}


def main() -> None:
    logging.disable(logging.WARNING)  # dp-accounting's absl warnings on fractional orders
    print(f"{'setting':<44} {'accuracy':>9} {'epsilon':>9} {'seconds':>8}")
    runs = [
        ("client-level, 100 clients, no DP (floor)", CLIENT_LEVEL, 30, 32, client_level(None)),
        *[
            (f"client-level DP-FedAvg, z = {z}", CLIENT_LEVEL, 30, 32, client_level(z))
            for z in (0.7, 1.0, 2.0)
        ],
        ("sample-level, 10 clients, no DP (floor)", SAMPLE_LEVEL, 10, 16, sample_level(None)),
        *[
            (f"sample-level DP-SGD, z = {z}", SAMPLE_LEVEL, 10, 16, sample_level(z))
            for z in (0.8, 1.5)
        ],
    ]
    for label, federation, rounds, batch, extra in runs:
        start = time.perf_counter()
        accuracy, epsilon = run(federation, rounds, batch, **extra)
        shown = "inf" if epsilon is None else f"{epsilon:.2f}"
        print(f"{label:<44} {accuracy:>9.3f} {shown:>9} {time.perf_counter() - start:>8.1f}")


if __name__ == "__main__":
    main()
