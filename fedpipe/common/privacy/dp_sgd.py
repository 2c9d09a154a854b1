"""Sample-level DP-SGD on a client (Abadi et al. 2016, "Deep Learning with Differential
Privacy").

Each local step draws its batch by Poisson sampling (every sample in with probability
``q = batch_size / n``), computes every sample's own gradient
(:meth:`~fedpipe.common.models.Model.compute_sample_gradients`), clips each to L2 norm ``C``,
adds ``N(0, (z C)^2)`` to their sum and divides by the *expected* batch size ``q n`` (a fixed
denominator: the drawn size does not show through it). The result goes through the client's
optimizer pipeline like any gradient (post-processing: it costs no privacy).

Each step is one Poisson-sampled Gaussian mechanism of multiplier ``z``; the client's
:class:`~fedpipe.common.privacy.accountant.PrivacyAccountant` (``dp-accounting``) turns the
steps it ran into ε at ``delta``. Batches and noise draw from the client's private generator
(:func:`~fedpipe.common.privacy.entropy.private_rng`): the amplification by sampling holds
only if nobody else knows which samples each step used, so the run seed the server sends
never picks them.
"""

from __future__ import annotations

import logging
import math
from typing import Any, NamedTuple

import numpy as np

from fedpipe.common.config import DpSgdConfig, TrainingConfig
from fedpipe.common.data import Dataset
from fedpipe.common.loss_sum import LossSum
from fedpipe.common.models import Model
from fedpipe.common.optim import Optimizer
from fedpipe.common.privacy.accountant import PrivacyAccountant, RoundEvent
from fedpipe.common.vector import Vector

__all__ = ["DpSgd", "DpSgdWork", "clip_samples", "noisy_mean", "sample_norms"]

log = logging.getLogger(__name__)


def sample_norms(per_sample: Vector) -> Any:
    """The L2 norm of each sample's gradient over all its arrays (leading sample axis)."""
    arrays = list(per_sample.coefs.values())
    n = len(arrays[0])
    return sum((a.reshape(n, -1) ** 2).sum(1) for a in arrays) ** 0.5


def clip_samples(per_sample: Vector, clip: float) -> Vector:
    """Each sample's gradient scaled to L2 norm ``clip`` at most (its direction kept)."""
    norms = sample_norms(per_sample)
    factors = 1.0 / (norms / clip).clip(min=1.0)
    n = len(norms)
    return per_sample.apply(lambda a: a * factors.reshape((n,) + (1,) * (a.ndim - 1)))


def noisy_mean(
    clipped_sum: Vector, std: float, expected_batch: float, rng: np.random.Generator
) -> Vector:
    """``(clipped_sum + N(0, std^2)) / expected_batch``, in place."""
    return clipped_sum.add_(clipped_sum.normal_like(rng), alpha=std).mul_(1.0 / expected_batch)


class DpSgdWork(NamedTuple):
    """What a round of DP-SGD did."""

    n_steps: int
    loss_sum: float
    n_samples_seen: int


class DpSgd:
    """One client's DP-SGD: its settings, its private generator and its accountant, which
    counts every step this client ran in the run (a replayed round is counted again: its
    data was used again).

    Raises
    ------
    BudgetExceeded
        (from :meth:`train`) ``max_epsilon`` is set and the round would exceed it.
    """

    def __init__(self, config: DpSgdConfig, rng: np.random.Generator) -> None:
        self.config = config
        self.rng = rng
        self.accountant = PrivacyAccountant(config.accountant, config.delta)

    def epsilon(self) -> float:
        """ε at ``delta`` of the steps run so far."""
        return self.accountant.epsilon()

    def plan(self, n: int, training: TrainingConfig) -> tuple[float, int]:
        """The sampling rate ``q`` and the number of steps of a round on ``n`` samples:
        ``epochs`` expected passes of ``ceil(n / batch_size)`` steps, at most ``max_steps``."""
        q = min(1.0, training.batch_size / n)
        steps = training.epochs * math.ceil(1.0 / q)
        return q, min(steps, training.max_steps or steps)

    def step_event(self, q: float) -> RoundEvent:
        """One step's mechanism for the accountant: Poisson rate ``q``, this noise."""
        return RoundEvent(self.config.noise_multiplier, q)

    def train(
        self, model: Model, optimizer: Optimizer, data: Dataset, training: TrainingConfig
    ) -> DpSgdWork:
        """Run a round's steps of DP-SGD on ``data``; count them."""
        q, steps = self.plan(len(data), training)
        event = self.step_event(q)
        if self.config.max_epsilon is not None:
            after = self.accountant.epsilon(event, steps)
            if after > self.config.max_epsilon:
                raise BudgetExceeded(
                    f"dp_sgd: this round's {steps} steps (q={q:.4g}) would bring ε to "
                    f"{after:.4g} > max_epsilon={self.config.max_epsilon}; the client "
                    "refuses to train further in this run"
                )
        loss_sum, seen = LossSum(), 0  # a torch model's losses read once, not at every step
        for _ in range(steps):
            chosen = np.flatnonzero(self.rng.random(len(data)) < q)
            gradients, loss = self.gradients(model, data.x[chosen], data.y[chosen], q * len(data))
            optimizer.apply(model, gradients, consume=True)
            loss_sum.add(loss, len(chosen))
            seen += len(chosen)
        self.accountant.spend(event, steps)
        return DpSgdWork(steps, loss_sum.value(), seen)

    def gradients(self, model: Model, x: Any, y: Any, expected_batch: float) -> tuple[Vector, Any]:
        """The noised mean of the clipped per-sample gradients of the batch ``(x, y)``, and
        its mean loss (0 for an empty batch, whose gradient is noise alone)."""
        cfg = self.config
        if len(x):
            per_sample, loss = model.compute_sample_gradients(x, y)
            clipped = clip_samples(per_sample, cfg.clip).apply(lambda a: a.sum(0))
        else:
            clipped, loss = model.get_weights().zeros_like(), 0.0
        return noisy_mean(clipped, cfg.noise_multiplier * cfg.clip, expected_batch, self.rng), loss


class BudgetExceeded(ValueError):
    """A round of DP-SGD would spend more than the client's ``max_epsilon``."""
