"""Local training and evaluation: what a client does with a task, whatever the transport.

The client daemon (over gRPC) and the in-process simulation both call :class:`LocalTrainer`,
so a simulated client trains exactly like a deployed one.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, SupportsFloat

import numpy as np

from fedpipe.common import registry
from fedpipe.common.aggregators import Aggregator
from fedpipe.common.backends import is_array, ops_of
from fedpipe.common.config import OptimizerConfig, TrainingConfig
from fedpipe.common.data import Dataset
from fedpipe.common.metrics import MetricSet
from fedpipe.common.models import Model, load_model
from fedpipe.common.optim import Optimizer
from fedpipe.common.summable import Summable
from fedpipe.common.vector import Vector

__all__ = ["EvalResult", "LocalTrainer", "RunSetup", "TrainResult", "round_seed"]


@dataclass(frozen=True)
class RunSetup:
    """What the server tells every client when it joins: plain data only (``run_id``
    names the run, so that a client never continues another run's module state).

    ``model`` is ``{"name": ..., "config": {...}}``; ``client_optimizer`` the kwargs of
    :class:`~fedpipe.common.optim.Optimizer`; ``aggregator`` and ``metrics`` registry specs.
    """

    model: dict[str, Any]
    client_optimizer: dict[str, Any]
    aggregator: Any
    metrics: list[Any]
    training: dict[str, Any]
    seed: int = 0
    chunk_bytes: int = 4 << 20
    run_id: str = ""

    def to_data(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "client_optimizer": self.client_optimizer,
            "aggregator": self.aggregator,
            "metrics": self.metrics,
            "training": self.training,
            "seed": self.seed,
            "chunk_bytes": self.chunk_bytes,
            "run_id": self.run_id,
        }

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> RunSetup:
        try:
            return cls(
                model=dict(data["model"]),
                client_optimizer=dict(data["client_optimizer"]),
                aggregator=data["aggregator"],
                metrics=list(data["metrics"]),
                training=dict(data["training"]),
                seed=int(data.get("seed", 0)),
                chunk_bytes=int(data.get("chunk_bytes", 4 << 20)),
                run_id=str(data.get("run_id", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed run setup: {exc!r}") from None


@dataclass
class TrainResult:
    """One client's answer to a train task."""

    partial: Summable
    aux_vars: dict[str, Summable]
    n_samples: int  # local dataset size (the averaging weight)
    n_steps: int
    loss_sum: float  # sum of per-sample training losses over the round
    n_samples_seen: int = 0  # samples processed (epochs x dataset, or fewer with max_steps)
    seconds: float = 0.0

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.n_samples_seen, 1)


@dataclass
class EvalResult:
    """One client's metric states (they add up exactly across clients)."""

    metrics: dict[str, Summable]
    n_samples: int
    seconds: float = 0.0


def round_seed(seed: int, client: str, round_number: int) -> int:
    """A shuffling seed that depends only on the run seed, the client and the round, so that
    every transport draws the same batches."""
    digest = hashlib.blake2b(f"{seed}/{client}/{round_number}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class LocalTrainer:
    """A client's model, optimizer and aggregator, built from the server's :class:`RunSetup`.

    The model object may be shared between simulated clients (it is reset to the global
    weights at every task); the optimizer is each client's own, since its modules carry
    state across rounds.
    """

    def __init__(self, setup: RunSetup, model: Model | None = None) -> None:
        self.setup = setup
        self.model = model if model is not None else build_model(setup)
        self.optimizer: Optimizer = OptimizerConfig.model_validate(setup.client_optimizer).build()
        self.aggregator: Aggregator = registry.build_spec("aggregator", setup.aggregator)
        self.training = TrainingConfig.model_validate(setup.training)

    def train(
        self,
        data: Dataset,
        weights: Vector,
        aux_vars: Mapping[str, Summable],
        *,
        client: str,
        round_number: int,
    ) -> TrainResult:
        """Train from ``weights`` on ``data``; return the prepared update (start minus end)."""
        start = time.perf_counter()
        model, optimizer, cfg = self.model, self.optimizer, self.training
        model.set_weights(weights)
        initial = model.get_weights()  # where the model lives (a torch model's GPU...)
        if aux_vars:
            optimizer.process_aux_var(dict(aux_vars))
        optimizer.place_like(initial)
        optimizer.start_round(initial)
        rng = np.random.default_rng(round_seed(self.setup.seed, client, round_number))
        steps, seen = 0, 0
        loss_sum: Any = 0.0  # a torch model's losses add up on its device: read once, below
        for _ in range(cfg.epochs):
            for x, y in data.batches(
                cfg.batch_size, shuffle=True, seed=rng, drop_remainder=cfg.drop_remainder
            ):
                gradients, loss = model.compute_batch_gradients(x, y)
                optimizer.apply(model, gradients, consume=True)
                steps += 1
                seen += len(x)
                loss_sum = _add_loss(loss_sum, loss, len(x))
                if cfg.max_steps is not None and steps >= cfg.max_steps:
                    break
            if cfg.max_steps is not None and steps >= cfg.max_steps:
                break
        updates = initial.add_(model.get_weights(copy=False), alpha=-1.0)  # start - end
        partial = self.aggregator.prepare(updates, n_samples=len(data), n_steps=steps)
        return TrainResult(
            partial=partial,
            aux_vars=optimizer.collect_aux_var(),
            n_samples=len(data),
            n_steps=steps,
            loss_sum=float(loss_sum),
            n_samples_seen=seen,
            seconds=time.perf_counter() - start,
        )

    def check_data(self, data: Dataset, n: int = 2) -> None:
        """Run the model on a few samples of ``data``, so that data the model cannot take
        (wrong number of features, labels out of range...) fails the setup, not a round.

        Raises
        ------
        ValueError
            The model rejects the data; the message has the model's own error.
        """
        if len(data) == 0:
            raise ValueError("this client's training data is empty")
        x, y = data.x[:n], data.y[:n]
        try:
            loss, _ = self.model.evaluate(x, y)
            if not np.all(np.isfinite(loss)):
                raise ValueError(f"loss {loss} on the first samples is not finite")
        except (ValueError, TypeError, IndexError, RuntimeError) as exc:
            raise ValueError(
                f"this client's data (x {tuple(data.x.shape)} {data.x.dtype}, y "
                f"{tuple(data.y.shape)} {data.y.dtype}) does not fit model "
                f"{self.setup.model.get('name')!r}: {exc}"
            ) from None

    def evaluate(self, data: Dataset, weights: Vector) -> EvalResult:
        """Metric states of ``weights`` on ``data``."""
        start = time.perf_counter()
        self.model.set_weights(weights)
        metrics = MetricSet(self.setup.metrics)
        for x, y in data.batches(self.training.eval_batch_size, shuffle=False):
            loss, predictions = self.model.evaluate(x, y)
            metrics.update(y, predictions, loss)
        return EvalResult(metrics.state(), len(data), time.perf_counter() - start)


def _add_loss(total: Any, loss: SupportsFloat, n: int) -> Any:
    """``total + loss * n`` in float64; an array's loss (a torch model's, on its device) is
    added where it is, so that no batch waits for the device to read it."""
    if is_array(loss):
        return total + ops_of(loss).cast(loss, "float64") * n
    return total + float(loss) * n


def build_model(setup: RunSetup) -> Model:
    return load_model(setup.model["name"], dict(setup.model.get("config", {})))
