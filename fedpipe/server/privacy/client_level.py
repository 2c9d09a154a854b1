"""Client-level DP on the server: DP-FedAvg's clipping and noise, and its accountant.

McMahan et al. 2018, "Learning differentially private recurrent language models": each
sampled client's update ``D_i`` is clipped to ``|D_i| <= C``; the round's update is
``(sum_i D_i + N(0, (z C)^2 I)) / n`` with ``n`` the expected participants (``q x
candidates`` under Poisson sampling, the drawn count under fixed-size sampling: a fixed
denominator, so that who took part does not show through it). Adaptive clipping (Andrew et
al. 2021, "Differentially private learning with adaptive clipping") moves ``C`` towards the
``gamma`` quantile of the update norms, ``C *= exp(-eta (b - gamma))``, with ``b`` the noised
fraction of clients under the clip. Its count noise ``sigma_b`` costs privacy too: the
updates get the multiplier ``z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` so that the round as
a whole is a Gaussian mechanism of multiplier ``z`` (their Theorem 1), what is accounted.

``central`` mode (a trusted server): the server clips each reply as it arrives and adds the
noise, drawn from its OS entropy. ``distributed`` mode (for secure aggregation): each client
clips its own update and adds ``N(0, (z C)^2 / n)``, so the sum of ``n`` replies carries the
noise the accountant assumes; the server only divides.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from fedpipe.common.aggregators import Aggregator
from fedpipe.common.aggregators.averaging import AveragingAggregator, SumAggregator
from fedpipe.common.config import ConfigError, PrivacyConfig, ServerConfig
from fedpipe.common.optim import Optimizer
from fedpipe.common.privacy.accountant import PrivacyAccountant
from fedpipe.common.state import State
from fedpipe.common.summable import Summable
from fedpipe.common.vector import Vector
from fedpipe.server.privacy.sampling import check_sampler, round_event
from fedpipe.server.run_checks import aux_var_modules, refuse_any
from fedpipe.server.sampling import ClientSampler, PoissonSampler

__all__ = ["BudgetSpent", "ClientLevelDP", "check_private_run"]

log = logging.getLogger(__name__)


class BudgetSpent(Exception):
    """The next round would spend more than ``target_epsilon``: the run ends before it."""


def check_aggregator(aggregator: Aggregator) -> str:
    """The partial's sum field, if each client's update goes in with weight 1 and the
    aggregator's result is that sum over a count (its ``finalize`` is bypassed); else raise."""
    if type(aggregator) is SumAggregator:
        return "sum"
    if type(aggregator) is AveragingAggregator and aggregator.weights.weighting == "uniform":
        return "weighted_sum"
    raise ConfigError(
        f"aggregator {aggregator.name!r} ({aggregator.get_config()}): client-level DP bounds "
        "each client's weight in the sum; use aggregator = ['averaging', {weighting = "
        "'uniform'}] or 'sum' (a client weighted by its sample count could outweigh the clip)"
    )


def check_private_run(config: ServerConfig, optimizer: Optimizer) -> None:
    """Raise ConfigError if the run has a setting that lets client data reach the model past
    the clip and the noise."""
    refused = {
        # Who counts depends on the others' norms: one client moves the sum by more than C.
        "validation (rejecting by the round's median norm makes one client's presence "
        "decide whether others count)": config.validation is not None,
        # The clients' statistics would go into the released model, neither clipped nor noised.
        "model.buffers='average' (the clients' statistics would join the model unclipped and "
        "un-noised)": config.model.buffers == "average",
    }
    # SCAFFOLD's control variates...: they reach the server unclipped and un-noised
    refused |= dict.fromkeys(aux_var_modules(config, optimizer), True)
    refuse_any(
        "privacy",
        refused,
        "the accountant assumes each client moves the noised sum by at most one clip; "
        "remove one of them",
    )


class ClientLevelDP:
    """Clipping, noise and accounting of one run; :meth:`begin_round` for each round,
    :meth:`clip_reply` for each reply (central mode), :meth:`finalize` on the sum."""

    def __init__(
        self,
        config: PrivacyConfig,
        sampler: ClientSampler,
        aggregator: Aggregator,
        noise_multiplier: float,
        rng: np.random.Generator | None = None,
        min_replies: int = 1,
    ) -> None:
        check_sampler(sampler)
        #: The fewest replies a round is aggregated with (``min_results``).
        self.min_replies = max(min_replies, 1)
        self.field = check_aggregator(aggregator)
        self.config = config
        self.sampler = sampler
        self.noise_multiplier = noise_multiplier
        self.value_multiplier = _value_multiplier(config, noise_multiplier)
        self.clip = config.clip if config.clip is not None else config.adaptive_clip.initial  # type: ignore[union-attr]
        self.accountant = PrivacyAccountant(config.accountant, config.delta)
        #: Server noise draws from OS entropy: a trusted server's noise, never replayable.
        self.rng = rng if rng is not None else np.random.default_rng(np.random.SeedSequence())
        self.denominator = 1.0
        self._under_clip = 0.0  # sum of (b_i - 1/2) over the round's clipped replies

    def begin_round(self, round_number: int, candidates: int, sampled: int) -> dict[str, Any]:
        """Account the round about to run (before any reply is seen); its record fields.

        Raises
        ------
        BudgetSpent
            With ``target_epsilon``, when this round would take ε past it.
        """
        if isinstance(self.sampler, PoissonSampler):
            self.denominator = max(self.sampler.q * candidates, 1e-12)
        else:
            self.denominator = float(max(sampled, 1))
        event = round_event(self.sampler, self._round_multiplier(), candidates, sampled)
        target = self.config.target_epsilon
        if target is not None:
            after = self.accountant.epsilon(event)
            if after > target:
                raise BudgetSpent(
                    f"privacy budget: round {round_number} would take epsilon to {after:.4g} "
                    f"> target_epsilon={target:g} (delta={self.config.delta:g}); the run "
                    f"stopped after round {round_number - 1}"
                )
        self.accountant.spend(event)
        self._under_clip = 0.0
        return {"epsilon": self.accountant.epsilon(), "delta": self.config.delta, "clip": self.clip}

    def _round_multiplier(self) -> float:
        """The noise multiplier the round is accounted at. Central: the server's noise.
        Distributed: each client adds a share of the noise calibrated to the expected
        participants, so the sum holds only the shares of the clients that reply; the round
        is accounted at the fewest replies it can be aggregated with (``min_results``), which
        never understates ε when clients drop."""
        if self.config.mode != "distributed":
            return self.noise_multiplier
        present = min(float(self.min_replies), self.denominator) / self.denominator
        return self.noise_multiplier * math.sqrt(present)

    def clip_reply(self, partial: Summable) -> None:
        """Central mode: clip one reply's update in place to the round's clip norm."""
        if self.config.mode != "central":
            return
        update = partial.vector(self.field)
        norm = update.norm()
        self._under_clip += (1.0 if norm <= self.clip else 0.0) - 0.5
        if norm > self.clip:
            update.mul_(self.clip / norm)

    def client_settings(self) -> dict[str, float]:
        """Distributed mode: what each sampled client applies to its own update."""
        std = self.value_multiplier * self.clip / math.sqrt(self.denominator)
        return {"clip": self.clip, "noise_std": std}

    def finalize(self, total: Summable) -> Vector:
        """The round's update: the sum of clipped updates, noised (central mode), divided by
        the expected participants; the clip norm then adapts (adaptive clipping)."""
        summed = total.vector(self.field)
        if self.config.mode == "central":
            std = self.value_multiplier * self.clip
            summed = summed.add_(summed.normal_like(self.rng), alpha=std)
        self._adapt_clip()
        return summed.mul_(1.0 / self.denominator)

    def _adapt_clip(self) -> None:
        adaptive = self.config.adaptive_clip
        if adaptive is None:
            return
        noised = self._under_clip + float(self.rng.normal(0.0, adaptive.count_stddev))
        fraction = noised / self.denominator + 0.5
        self.clip *= math.exp(-adaptive.learning_rate * (fraction - adaptive.target_quantile))

    def summary(self) -> dict[str, Any]:
        """What ``summary.json`` says of the run's privacy."""
        return {
            "epsilon": self.accountant.epsilon(),
            "delta": self.config.delta,
            "noise_multiplier": self.noise_multiplier,
            "accountant": self.config.accountant,
            "privacy_mode": self.config.mode,
        }

    def get_state(self) -> State:
        return {"clip": float(self.clip), "accountant": self.accountant.get_state()}

    def set_state(self, state: State) -> None:
        clip, accountant = state.get("clip"), state.get("accountant")
        if not isinstance(clip, float) or not clip > 0 or not isinstance(accountant, dict):
            raise ValueError(f"privacy state {state!r}: expected a clip > 0 and an accountant")
        self.accountant.set_state(accountant)
        self.clip = clip


def _value_multiplier(config: PrivacyConfig, noise_multiplier: float) -> float:
    """The updates' noise multiplier: ``z``, or ``z_update`` when the clip count is noised too."""
    adaptive = config.adaptive_clip
    if adaptive is None:
        return noise_multiplier
    rest = noise_multiplier**-2 - (2 * adaptive.count_stddev) ** -2
    if rest <= 0:
        raise ConfigError(
            f"adaptive_clip.count_stddev={adaptive.count_stddev}: with noise_multiplier="
            f"{noise_multiplier:g} it must exceed noise_multiplier / 2 = "
            f"{noise_multiplier / 2:g}, or the clip count alone spends the whole budget"
        )
    return float(rest**-0.5)


def build_client_level_dp(
    config: PrivacyConfig,
    sampler: ClientSampler,
    aggregator: Aggregator,
    rounds: int,
    min_clients: int,
    min_replies: int = 1,
) -> ClientLevelDP:
    """The run's DP, its noise multiplier calibrated when ``on_budget = "calibrate"``."""
    check_sampler(sampler)
    event = round_event(sampler, config.noise_multiplier or 1.0, min_clients)
    accountant = PrivacyAccountant(config.accountant, config.delta)
    if not accountant.supports(event):
        raise ConfigError(
            f"accountant={config.accountant!r} cannot count sampler {sampler.name!r} "
            "(dp-accounting's PLD models Poisson sampling only); use accountant = 'rdp'"
        )
    multiplier = config.noise_multiplier
    if multiplier is None:
        from fedpipe.server.privacy.calibrate import calibrate_noise

        multiplier = calibrate_noise(config, event, rounds)
        log.info(
            "noise_multiplier %.4g: epsilon %g at delta %g after %d round(s) (%s)",
            multiplier,
            config.target_epsilon,
            config.delta,
            rounds,
            config.accountant,
        )
    return ClientLevelDP(config, sampler, aggregator, multiplier, min_replies=min_replies)
