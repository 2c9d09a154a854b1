"""Local training and evaluation: what a client does with a task, whatever the transport.

The client daemon (over the network) and the in-process simulation both call :class:`LocalTrainer`,
so a simulated client trains exactly like a deployed one.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, SupportsFloat, TypeAlias

import numpy as np

from fedpipe.common import registry
from fedpipe.common.aggregators import Aggregator
from fedpipe.common.buffers import BUFFERS_AUX, buffer_mode, buffers_share, split_buffers
from fedpipe.common.config import DpSgdConfig, OptimizerConfig, TrainingConfig
from fedpipe.common.data import Dataset
from fedpipe.common.loss_sum import LossSum
from fedpipe.common.metrics import MetricSet
from fedpipe.common.models import Model, load_model
from fedpipe.common.optim import Optimizer
from fedpipe.common.privacy.client_update import privatize_update
from fedpipe.common.privacy.dp_sgd import DpSgd
from fedpipe.common.privacy.entropy import private_rng, seed_private_noise
from fedpipe.common.spilled_vector import SpilledVector
from fedpipe.common.staged_start import StagedStart, why_start_in_memory
from fedpipe.common.summable import Summable
from fedpipe.common.train_fn import TrainFn, check_train_fn_setup, run_train_fn
from fedpipe.common.vector import Vector

if TYPE_CHECKING:  # the torch extra; the secagg extra
    from fedpipe.common.data.torch_loaders import LoaderData
    from fedpipe.common.payload import DeferredVector
    from fedpipe.common.secagg.messages import MaskedInput

__all__ = ["ClientData", "EvalResult", "LocalTrainer", "RunSetup", "TrainResult", "round_seed"]

log = logging.getLogger(__name__)

#: What a client trains and evaluates on: fedpipe's arrays, or its own torch DataLoader.
ClientData: TypeAlias = "Dataset | LoaderData"


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
    run_id: str = ""

    def to_data(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "client_optimizer": self.client_optimizer,
            "aggregator": self.aggregator,
            "metrics": self.metrics,
            "training": self.training,
            "seed": self.seed,
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
    #: Under secure aggregation: the update masked (``partial`` is then empty); losses and
    #: sample counts stay in the clear.
    masked: MaskedInput | None = None
    #: Under sample-level DP-SGD: ε (at the client's δ) of every step it ran in this run.
    sample_epsilon: float | None = None
    #: On a server that streams replies: the Vector fields of ``partial``, received to disk
    #: (``partial`` holds the numbers only); the round loop folds them chunk by chunk.
    spilled: dict[str, SpilledVector] = field(default_factory=dict)
    #: On a client whose start weights waited on disk (:mod:`fedpipe.common.staged_start`):
    #: the Vector fields of ``partial``, made chunk by chunk as the reply streams (``partial``
    #: holds empty Vectors in their places).
    deferred: dict[str, DeferredVector] = field(default_factory=dict)

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


class _Work(NamedTuple):
    """What a round of local training did, before its update is prepared."""

    n_samples: int
    n_steps: int
    loss_sum: float
    n_samples_seen: int


class LocalTrainer:
    """A client's model, optimizer and aggregator, built from the server's :class:`RunSetup`.

    The model object may be shared between simulated clients (it is reset to the global
    weights at every task); the optimizer is each client's own, since its modules carry
    state across rounds. With ``train_fn`` (the client's own training loop, see
    :mod:`fedpipe.common.train_fn`) that function trains instead of fedpipe's loop.
    Privacy noise draws from OS entropy, or from ``noise_seed``, the client's own setting
    (never the server's: see :mod:`fedpipe.common.privacy.entropy`), mixed with ``client``.
    ``dp_sgd`` (the client's own setting too) trains by sample-level DP-SGD
    (:mod:`fedpipe.common.privacy.dp_sgd`).

    Raises
    ------
    ValueError
        ``train_fn`` is given and the setup has what it cannot honour (a numpy model,
        regularizers, weight decay, modules exchanging aux vars), or with ``dp_sgd``.
    """

    def __init__(
        self,
        setup: RunSetup,
        model: Model | None = None,
        *,
        train_fn: TrainFn | None = None,
        noise_seed: int | None = None,
        client: str = "",
        dp_sgd: DpSgdConfig | None = None,
    ) -> None:
        self.setup = setup
        self.model = model if model is not None else build_model(setup)
        self.optimizer: Optimizer = OptimizerConfig.model_validate(setup.client_optimizer).build()
        seed_private_noise(self.optimizer.modules, noise_seed, client)
        self._dp_rng = private_rng(noise_seed, client, "dp-update")  # distributed DP noise
        self.dp_sgd: DpSgd | None = None
        if dp_sgd is not None:  # batches and noise from the client's private generator
            self.dp_sgd = DpSgd(dp_sgd, private_rng(noise_seed, client, "dp-sgd"))
        self.aggregator: Aggregator = registry.build_spec("aggregator", setup.aggregator)
        self.training = TrainingConfig.model_validate(setup.training)
        self.train_fn = train_fn
        if train_fn is not None and dp_sgd is not None:
            raise ValueError("dp_sgd clips fedpipe's per-sample gradients: a train_fn cannot")
        if train_fn is not None:
            check_train_fn_setup(self.model, self.optimizer, str(setup.model.get("name")))
        self.buffer_mode = buffer_mode(setup.model)
        #: This client's buffers (a shared model object holds another client's in between).
        self.buffers = self.model.get_buffers()
        self._kept_reasons: set[str] = set()  # why start weights stayed in memory, logged

    def train(
        self,
        data: ClientData,
        weights: Vector,
        aux_vars: Mapping[str, Summable],
        *,
        client: str,
        round_number: int,
        dp: Mapping[str, Any] | None = None,
        stage_start: bool = False,
        start_dir: str | Path | None = None,
    ) -> TrainResult:
        """Train from ``weights`` on ``data``; return the prepared update (start minus end,
        through the modules once more with a ``train_fn``), clipped and noised as ``dp``
        (distributed client-level DP: :mod:`fedpipe.common.privacy.client_update`) says.

        With ``stage_start`` the start weights wait in a file in ``start_dir`` rather than in
        memory where the pipeline allows it (:mod:`fedpipe.common.staged_start`): the update
        is then in ``deferred``, made from the model's arrays as the reply streams."""
        start = time.perf_counter()
        model, optimizer = self.model, self.optimizer
        aux_vars = self._load_buffers(aux_vars)
        model.set_weights(weights)
        staged = self._staged_start(start_dir, dp) if stage_start else None
        initial = model.get_weights() if staged is None else model.get_weights(copy=False)
        if aux_vars:
            optimizer.process_aux_var(dict(aux_vars))
        optimizer.place_like(initial)
        optimizer.start_round(initial)
        seed = round_seed(self.setup.seed, client, round_number)
        deferred: dict[str, DeferredVector] = {}
        if staged is not None:
            work = self._local_steps(data, seed)
            end = model.get_weights(copy=False).coefs  # read as the reply streams
            partial, deferred = staged.prepared(end, self.aggregator, work.n_samples, work.n_steps)
        else:
            work, partial = self._train_from(initial, data, client, round_number, seed, dp)
        self.buffers = model.get_buffers()
        replied = optimizer.collect_aux_var(model.weight_specs())
        if self.buffer_mode == "average" and len(self.buffers):
            replied[BUFFERS_AUX] = buffers_share(self.buffers, work.n_samples)
        return TrainResult(
            partial=partial,
            aux_vars=replied,
            n_samples=work.n_samples,
            n_steps=work.n_steps,
            loss_sum=work.loss_sum,
            n_samples_seen=work.n_samples_seen,
            seconds=time.perf_counter() - start,
            sample_epsilon=self.dp_sgd.epsilon() if self.dp_sgd is not None else None,
            deferred=deferred,
        )

    def _train_from(
        self,
        initial: Vector,
        data: ClientData,
        client: str,
        round_number: int,
        seed: int,
        dp: Mapping[str, Any] | None,
    ) -> tuple[_Work, Summable]:
        """Train from ``initial`` (the start weights' copy, turned into the update in place);
        the work done and the prepared update."""
        model, optimizer = self.model, self.optimizer
        if self.train_fn is None:
            work = self._local_steps(data, seed)
            updates = initial.sub_(model.get_weights(copy=False))  # start - end
        else:
            work = self._user_training(self.train_fn, data, client, round_number, seed)
            updates = optimizer.run_modules(initial.sub_(model.get_weights(copy=False)))
        if dp:
            updates = privatize_update(updates, dp, self._dp_rng)
        partial = self.aggregator.prepare(updates, n_samples=work.n_samples, n_steps=work.n_steps)
        return work, partial

    def _staged_start(
        self, start_dir: str | Path | None, dp: Mapping[str, Any] | None
    ) -> StagedStart | None:
        """The model's weights (the round's start) written to a file in ``start_dir``; None
        (with one log line per reason) where the start must stay in memory, or where the
        file cannot be written."""
        why: str | None
        if self.train_fn is not None:
            why = "the train_fn's update goes through the modules whole"
        elif dp:
            why = "client-level DP clips the whole update"
        else:
            backend = self.model.get_weights(copy=False).backend
            why = why_start_in_memory(self.aggregator, self.optimizer.regularizers, backend)
        if why is not None:
            if why not in self._kept_reasons:
                self._kept_reasons.add(why)
                log.info("the round's start weights stay in memory: %s", why)
            return None
        try:
            return StagedStart(self.model.get_weights(copy=False).coefs, start_dir)
        except OSError as exc:  # a full disk, say: the round goes on with the start in memory
            log.warning("the round's start weights stay in memory: writing them failed: %s", exc)
            return None

    def _load_buffers(self, aux_vars: Mapping[str, Summable]) -> dict[str, Summable]:
        """Put the task's global buffers (``model.buffers = "average"``), else this client's
        own, into the model; the modules' aux vars.

        Raises
        ------
        ValueError
            The task carries buffers and they stay local in this run.
        """
        carried, own = split_buffers(aux_vars)
        if carried is not None:
            if self.buffer_mode != "average":
                raise ValueError("the task carries buffers, but model.buffers='local'")
            self.buffers = carried.vector("buffers")  # read-only: set_buffers copies it
        self.model.set_buffers(self.buffers)
        return own

    def _local_steps(self, data: ClientData, seed: int) -> _Work:
        """fedpipe's loop: ``epochs`` passes (at most ``max_steps`` steps) of the optimizer."""
        cfg = self.training
        if self.dp_sgd is not None:
            if not isinstance(data, Dataset):
                raise ValueError("dp_sgd draws Poisson batches from fedpipe's arrays, not a loader")
            return _Work(len(data), *self.dp_sgd.train(self.model, self.optimizer, data, cfg))
        rng = np.random.default_rng(seed)  # a fresh shuffle per epoch, from the round's seed
        max_steps = cfg.max_steps or -1  # None: every batch of every epoch
        steps, seen = 0, 0
        loss_sum = LossSum()  # a torch model's losses stay on its device: read once, below
        for _ in range(cfg.epochs):
            if isinstance(data, Dataset):  # a torch model draws them on its device
                batches = self.model.batches(
                    data, cfg.batch_size, seed=rng, drop_remainder=cfg.drop_remainder
                )
            else:
                batches = data.batches()  # a DataLoader batches and shuffles itself
            for x, y in batches:
                loss = self._step(x, y)
                steps += 1
                seen += len(x)
                loss_sum.add(loss, len(x))
                if steps == max_steps:
                    return _Work(len(data), steps, loss_sum.value(), seen)
        return _Work(len(data), steps, loss_sum.value(), seen)

    def _step(self, x: Any, y: Any) -> SupportsFloat:
        """One optimizer step on a batch; its loss. The step's model-sized gradients are gone
        when it returns, not alive while the next batch's are computed."""
        gradients, loss = self.model.compute_batch_gradients(x, y)
        self.optimizer.apply(self.model, gradients, consume=True)
        return loss

    def _user_training(
        self, train_fn: TrainFn, data: ClientData, client: str, round_number: int, seed: int
    ) -> _Work:
        """The client's own ``train_fn`` trains the torch module on the train loader."""
        if isinstance(data, Dataset):
            raise ValueError(
                "this client's train_fn trains on a torch DataLoader, but its data is a "
                "fedpipe Dataset: name a loaders factory ('loaders' in the client config)"
            )
        cfg = self.training
        round_config = {
            "round": round_number,
            "client": client,
            "seed": seed,
            "epochs": cfg.epochs,
            "max_steps": cfg.max_steps,
            "batch_size": cfg.batch_size,
        }
        module = self.model.module  # type: ignore[attr-defined]  # a TorchModel (checked)
        module.train()  # after an evaluation, dropout and batch norm back in training mode
        n_samples, metrics = run_train_fn(train_fn, module, data.loader, round_config)
        default_steps = cfg.epochs * len(data.loader)
        if cfg.max_steps is not None:
            default_steps = min(default_steps, cfg.max_steps)
        n_steps = int(metrics.get("n_steps", default_steps))
        log.info("client %s, round %d: train_fn metrics %s", client, round_number, metrics)
        return _Work(n_samples, n_steps, metrics["loss"] * n_samples, n_samples)

    def check_data(self, data: ClientData, n: int = 2) -> None:
        """Run the model on a few samples of ``data``, so that data the model cannot take
        (wrong number of features, labels out of range...) fails the setup, not a round.

        Raises
        ------
        ValueError
            The model rejects the data; the message has the model's own error.
        """
        if len(data) == 0:
            raise ValueError("this client's training data is empty")
        x, y = (data.x, data.y) if isinstance(data, Dataset) else data.first_batch()
        x, y = x[:n], y[:n]
        try:
            loss, _ = self.model.evaluate(x, y)
            if not np.all(np.isfinite(loss)):
                raise ValueError(f"loss {loss} on the first samples is not finite")
        except (ValueError, TypeError, IndexError, RuntimeError) as exc:
            raise ValueError(
                f"this client's data (first samples: x {tuple(x.shape)} {x.dtype}, y "
                f"{tuple(y.shape)} {y.dtype}) does not fit model "
                f"{self.setup.model.get('name')!r}: {exc}"
            ) from None

    def evaluate(
        self, data: ClientData, weights: Vector, aux_vars: Mapping[str, Summable] | None = None
    ) -> EvalResult:
        """Metric states of ``weights`` on ``data``, with the global buffers ``aux_vars``
        carries (``model.buffers = "average"``), else this client's own."""
        start = time.perf_counter()
        self._load_buffers(aux_vars or {})
        self.model.set_weights(weights)
        metrics = MetricSet(self.setup.metrics)
        if isinstance(data, Dataset):
            batches = data.batches(self.training.eval_batch_size, shuffle=False)
        else:
            batches = data.batches(host_targets=True)  # the metrics take numpy targets
        for x, y in batches:
            loss, predictions = self.model.evaluate(x, y)
            metrics.update(y, predictions, loss)
        return EvalResult(metrics.state(), len(data), time.perf_counter() - start)


def build_model(setup: RunSetup) -> Model:
    return load_model(setup.model["name"], dict(setup.model.get("config", {})))
