"""GPU simulation: client updates per second of fedpipe's vectorized and sequential modes next
to two plain-PyTorch floors, measured in the same run on the same device.

Workload (issue 8): a small CNN (545,098 params: 2 conv + 2 linear) on CIFAR-sized inputs
(3x32x32, 10 classes, synthetic seeded data), ``--clients`` 100 x ``--samples`` 512, 1 local
epoch, batch 32, SGD (lr 0.05), FedAvg weighted by samples.

- floor 1, per-client loop: plain torch, one client after another on the device (one model,
  ``torch.optim.SGD``, weights reset per client, a running weighted sum of updates);
- floor 2, vmap: plain torch, all clients of a round at once (``functional_call`` + ``vmap``
  + ``grad``), ``--max-clients`` at a time;
- fedpipe vectorized / sequential: the in-process simulation's own wiring, as
  ``fedpipe simulate`` with ``mode = "vectorized"`` / ``"sequential"`` runs it: one
  :class:`~fedpipe.server.transports.inprocess.SharedModels` on the device, one
  :class:`~fedpipe.server.transports.inprocess.InProcessClient` per client (its own
  :class:`LocalTrainer`), each round's task sent to every client at once and the replies
  folded in client order by the ``averaging`` aggregator. Measured: training rounds only
  (staging the weights on the device, local training, folding, the global update); the
  dataset partitioning, evaluation, checkpoints and history of a full run are left out.

Targets on one H100: vectorized >= 450 client updates/s, >= 0.85x the vmap floor and >= 13x
the per-client loop; sequential >= 0.9x the per-client loop; a 10,000-client round
(``--clients 10000 --samples 64``) completes. The first round of each mode is a warm-up and
is left out when there are several.

Usage: ``python benchmarks/gpu_simulation.py [--device cuda] [--clients 100] [--samples 512]
[--batch 32] [--rounds 3] [--max-clients 1024] [--modes loop,vmap,vectorized,sequential]
[--small] [--tiny] [--json out.json]``

CPU proxy of the per-step host cost (what bounds both sequential paths on a GPU at this size):
``--device cpu --tiny --modes loop,sequential --clients 20``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from fedpipe.common.aggregators import Aggregator
from fedpipe.common.data import Dataset
from fedpipe.common.models.torch_adapter import TorchModel
from fedpipe.common.summable import Summable
from fedpipe.common.training import RunSetup
from fedpipe.common.vector import Vector
from fedpipe.server.clients import RoundTask
from fedpipe.server.devices import resolve_devices
from fedpipe.server.transports.inprocess import InProcessClient, SharedModels

LR = 0.05
MODES = ("loop", "vmap", "vectorized", "sequential")
TARGET_UPDATES_S, TARGET_VS_VMAP, TARGET_VS_LOOP, TARGET_SEQ_VS_LOOP = 450.0, 0.85, 13.0, 0.9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--samples", type=int, default=512, help="samples per client")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-clients", type=int, default=1024, help="clients stacked at once")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset")
    parser.add_argument("--small", action="store_true", help="CPU-sized: 3 x 40, 2 rounds")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="the CNN's layers with 2 channels and 4 hidden units on 3x8x8 inputs: next to no "
        "compute, so that on a CPU the per-step host cost of each mode dominates (a proxy "
        "for a GPU)",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.small:
        args.clients, args.samples, args.rounds = 3, 40, 2  # 40 = 32 + a ragged batch of 8
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        parser.error(f"--modes: unknown {unknown}; expected some of {', '.join(MODES)}")
    return args


def cnn(tiny: bool = False) -> torch.nn.Module:
    """2 conv + 2 linear on 3x32x32 inputs, 545,098 parameters (``tiny``: the same layers on
    3x8x8 inputs, 2 channels and 4 hidden units, 180 parameters)."""
    c1, c2, hidden = (2, 2, 4) if tiny else (32, 64, 128)
    side = 8 if tiny else 32
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, c1, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(c1, c2, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(c2 * (side // 4) ** 2, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10),
    )  # fmt: skip


def synthetic(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [clients, samples, 3, side, side]``, ``y [clients, samples]`` on the device (side
    32, or 8 with ``--tiny``)."""
    gen = torch.Generator().manual_seed(0)
    side = 8 if args.tiny else 32
    x = torch.randn((args.clients, args.samples, 3, side, side), generator=gen)
    y = torch.randint(0, 10, (args.clients, args.samples), generator=gen)
    return x.to(args.device), y.to(args.device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed_rounds(args: argparse.Namespace, one_round: Callable[[], None]) -> list[float]:
    seconds = []
    for _ in range(args.rounds):
        sync(args.device)
        start = time.perf_counter()
        one_round()
        sync(args.device)
        seconds.append(time.perf_counter() - start)
    return seconds


def loop_floor(args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Plain torch, one client after another: the per-client simulation loop."""
    net = cnn(args.tiny).to(args.device)
    params = list(net.parameters())
    global_w = [p.detach().clone() for p in params]
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator(device=args.device).manual_seed(1)

    def one_round() -> None:
        total = [torch.zeros_like(w) for w in global_w]
        for k in range(args.clients):
            with torch.no_grad():
                for p, w in zip(params, global_w, strict=True):
                    p.copy_(w)
            opt = torch.optim.SGD(params, lr=LR, foreach=True)  # as on a GPU, on a CPU too
            order = torch.randperm(args.samples, generator=gen, device=args.device)
            for idx in order.split(args.batch):
                opt.zero_grad(set_to_none=True)
                loss_fn(net(x[k, idx]), y[k, idx]).backward()
                opt.step()
            with torch.no_grad():
                for t, p, w in zip(total, params, global_w, strict=True):
                    t.add_(w - p, alpha=float(args.samples))
        with torch.no_grad():
            for w, t in zip(global_w, total, strict=True):
                w.sub_(t, alpha=1.0 / (args.samples * args.clients))

    return timed_rounds(args, one_round)


def vmap_floor(args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Plain torch, ``--max-clients`` clients at once with functional_call + vmap + grad."""
    net = cnn(args.tiny).to(args.device)
    global_w = {n: p.detach().clone() for n, p in net.named_parameters()}
    loss_fn = torch.nn.CrossEntropyLoss()

    def loss(params: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(net, params, (xb,)), yb)

    grads_of = vmap(grad(loss))
    gen = torch.Generator(device=args.device).manual_seed(1)

    def one_round() -> None:
        total = {n: torch.zeros_like(w) for n, w in global_w.items()}
        for lo in range(0, args.clients, args.max_clients):
            k = min(args.max_clients, args.clients - lo)
            stacked = {n: w.expand(k, *w.shape).clone() for n, w in global_w.items()}
            keys = torch.rand((k, args.samples), generator=gen, device=args.device)
            order = keys.argsort(dim=1)
            rows = torch.arange(k, device=args.device)[:, None]
            for idx in order.split(args.batch, dim=1):
                grads = grads_of(stacked, x[lo : lo + k][rows, idx], y[lo : lo + k][rows, idx])
                for n, g in grads.items():
                    stacked[n].sub_(g, alpha=LR)
            for n, s in stacked.items():
                total[n].add_((global_w[n] - s).sum(0))
        for n, w in global_w.items():
            w.sub_(total[n], alpha=1.0 / args.clients)

    return timed_rounds(args, one_round)


def cnn_model(tiny: bool = False) -> TorchModel:
    """The CNN as fedpipe's model factory, seeded: both fedpipe modes start equal."""
    torch.manual_seed(0)
    return TorchModel(cnn(tiny), torch.nn.CrossEntropyLoss())


def fedpipe_rounds(
    args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor, mode: str
) -> tuple[list[float], Vector]:
    """fedpipe's in-process simulation in ``mode`` on ``args.device``: its shared models and
    client proxies, its replies folded by the averaging aggregator (as the round loop)."""
    return asyncio.run(_simulated_rounds(args, x.cpu().numpy(), y.cpu().numpy(), mode))


async def _simulated_rounds(
    args: argparse.Namespace, x: np.ndarray, y: np.ndarray, mode: str
) -> tuple[list[float], Vector]:
    setup = RunSetup(
        # run as a script, this folder is on sys.path: the module is importable by its stem
        model={"name": f"{Path(__file__).stem}:cnn_model", "config": {"tiny": args.tiny}},
        client_optimizer={"lrate": LR},
        aggregator="averaging",
        metrics=["loss"],
        training={"epochs": 1, "batch_size": args.batch},
    )
    devices = resolve_devices(args.device)  # "cuda": every visible GPU, as simulate does
    models = SharedModels(devices, mode, args.max_clients)  # type: ignore[arg-type]
    clients = [
        InProcessClient(f"client-{k}", Dataset(x[k], y[k]), None, models)
        for k in range(args.clients)
    ]
    weights = models.get(setup).get_weights().to_numpy()
    for client in clients:
        await client.initialize(setup, weights.specs())
    aggregator = clients[0].trainer.aggregator
    seconds = []
    try:
        for round_number in range(1, args.rounds + 1):
            sync(args.device)
            start = time.perf_counter()
            task = RoundTask(round_number, weights)
            total = await _round_total(clients, task, aggregator)
            weights = weights - aggregator.finalize(total).to_numpy()
            sync(args.device)
            seconds.append(time.perf_counter() - start)
    finally:
        models.close()
    return seconds, weights


async def _round_total(
    clients: list[InProcessClient], task: RoundTask, aggregator: Aggregator
) -> Summable:
    """The round's admitted sum, as the round loop gets it: from the clients' cohort when they
    train as one (the vectorized mode on one device: summed on the device), else reply by
    reply in client order."""
    cohort = clients[0].cohort()
    if cohort is not None:
        reply = await cohort.train_together(clients, task, aggregator)
        if reply is not None:
            if reply.failures or reply.total is None:
                raise RuntimeError(f"round {task.round_number}: clients failed: {reply.failures}")
            return reply.total
    total: Summable | None = None
    replies = [asyncio.ensure_future(c.train(task)) for c in clients]  # as the loop
    for client, reply_ in zip(clients, replies, strict=True):
        partial = (await reply_).partial
        total = partial if total is None else total.add_(partial)
        await client.release()  # folded: as the round loop, free the client's turn
    assert total is not None
    return total


def report(args: argparse.Namespace, seconds: dict[str, list[float]]) -> dict[str, Any]:
    kept = {m: s[1:] if len(s) > 1 else s for m, s in seconds.items()}
    per_round = {m: statistics.median(s) for m, s in kept.items()}
    rate = {m: args.clients / s for m, s in per_round.items()}
    labels = {
        "loop": "floor 1: per-client loop (torch)",
        "vmap": "floor 2: vmap (torch.func)",
        "vectorized": "fedpipe vectorized",
        "sequential": "fedpipe sequential",
    }
    print(f"{'mode':<34} {'s/round':>9} {'updates/s':>10}")
    for mode in seconds:
        print(f"{labels[mode]:<34} {per_round[mode]:9.4f} {rate[mode]:10.1f}")
    ratios: dict[str, float] = {}
    checks = [
        ("vectorized", None, TARGET_UPDATES_S, "vectorized updates/s"),
        ("vectorized", "vmap", TARGET_VS_VMAP, "vectorized / vmap floor"),
        ("vectorized", "loop", TARGET_VS_LOOP, "vectorized / per-client loop"),
        ("sequential", "loop", TARGET_SEQ_VS_LOOP, "sequential / per-client loop"),
    ]
    for mode, floor, target, what in checks:
        if mode not in rate or (floor is not None and floor not in rate):
            continue
        value = rate[mode] if floor is None else rate[mode] / rate[floor]
        ratios[what] = value
        mark = "meets" if value >= target else "below"
        print(f"  {what:<30} {value:8.2f}   target >= {target:g} (H100): {mark}")
    return {
        "benchmark": "gpu_simulation",
        "device": args.device,
        "device_name": torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else "cpu",
        "clients": args.clients,
        "samples": args.samples,
        "batch": args.batch,
        "rounds": args.rounds,
        "tiny": args.tiny,
        "params": sum(p.numel() for p in cnn(args.tiny).parameters()),
        "seconds": seconds,
        "s_per_round": per_round,
        "updates_per_s": rate,
        "ratios": ratios,
        "s_per_round_median": per_round.get("vectorized", float("nan")),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(0)
    np.random.seed(0)
    print(
        f"gpu_simulation: CNN {sum(p.numel() for p in cnn(args.tiny).parameters()):,} params, "
        f"{args.clients} clients x {args.samples} samples, batch {args.batch}, 1 epoch, SGD, "
        f"FedAvg, {args.rounds} rounds, device {args.device}",
        flush=True,
    )
    x, y = synthetic(args)
    runs = {
        "loop": lambda: loop_floor(args, x, y),
        "vmap": lambda: vmap_floor(args, x, y),
        "vectorized": lambda: fedpipe_rounds(args, x, y, "vectorized"),
        "sequential": lambda: fedpipe_rounds(args, x, y, "sequential"),
    }
    seconds, finals = {}, {}
    for mode in MODES:
        if mode in args.modes:
            out = runs[mode]()
            seconds[mode], finals[mode] = out if isinstance(out, tuple) else (out, None)
    result = report(args, seconds)
    if finals.get("vectorized") is not None and finals.get("sequential") is not None:
        diff = (finals["vectorized"] - finals["sequential"]).abs()
        result["max_abs_diff_vectorized_sequential"] = max(
            float(a.max()) for a in diff.coefs.values()
        )
        print(
            "  fedpipe vectorized vs sequential, final global weights: max |diff| "
            f"{result['max_abs_diff_vectorized_sequential']:.2e}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
