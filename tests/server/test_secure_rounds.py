"""Secure aggregation in the round loop: an in-process digits simulation whose masked rounds
give plain averaging's weights within the encoding's bound, clients that drop or lie after
masking, a round that cannot be unmasked failing with its reason, distributed DP noise
masked in, and refused configs."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from fedpipe.common.config import (
    ConfigError,
    SecureAggregationConfig,
    ServerConfig,
    SimulationConfig,
)
from fedpipe.common.secagg import FixedPoint
from fedpipe.common.secagg.messages import UnmaskRequest, UnmaskShares
from fedpipe.common.training import TrainResult
from fedpipe.server.clients import ClientError, RoundTask
from fedpipe.server.rounds import RunSummary
from fedpipe.server.simulation import simulate
from fedpipe.server.transports.inprocess import InProcessClient
from tests.server.test_rounds import _pool_run, sim_config

SECURE = {"threshold": 5, "clip": 4.0, "max_weight": 400}


def secure(tmp_path: Path, **server: Any) -> SimulationConfig:
    return sim_config(tmp_path, secure_aggregation=SECURE, **server)


def max_difference(a: RunSummary, b: RunSummary) -> float:
    return max(float(np.max(np.abs(a.weights[k] - b.weights[k]))) for k in a.weights)


def within_bound(plain: RunSummary, masked: RunSummary, total_weight: int) -> bool:
    """Each weight within the encoding's bound on the averaged update (the bound on the
    weighted sum of 8 clients with SECURE's clip and max_weight at 32 bits, over the total
    weight), plus one float32 rounding of each run's weights."""
    encoding = FixedPoint(32, SECURE["clip"], 8, SECURE["max_weight"])
    bound = encoding.error_bound(total_weight) / total_weight
    for key in plain.weights:
        weights = np.asarray(plain.weights[key])
        ulp = np.spacing(np.abs(weights).astype(np.float32))
        if not np.all(np.abs(weights - masked.weights[key]) <= bound + 2 * ulp):
            return False
    return True


def total_samples(sim: SimulationConfig) -> int:
    run, pool = _pool_run(sim)
    run.close()
    return sum(c.n_train_samples for c in pool.clients())


def test_secure_rounds_match_plain_averaging_on_digits(tmp_path: Path) -> None:
    plain = simulate(sim_config(tmp_path / "plain", rounds=1))
    masked = simulate(secure(tmp_path / "secure", rounds=1))
    assert masked.status == "completed"
    assert masked.history[0]["replied"] == 8
    assert within_bound(plain, masked, total_samples(sim_config(tmp_path / "n")))
    assert max_difference(plain, masked) > 0  # 3.0e-6: quantized, the masked path ran


def test_secure_run_reaches_plain_accuracy(tmp_path: Path) -> None:
    plain = simulate(sim_config(tmp_path / "plain", rounds=6))
    masked = simulate(secure(tmp_path / "secure", rounds=6))
    assert masked.status == "completed" and masked.rounds_completed == 6
    accuracy = masked.history[-1]["accuracy"]  # 0.903 when written, as plain's
    assert accuracy >= 0.88
    assert abs(accuracy - plain.history[-1]["accuracy"]) <= 0.01


class SilentAtUnmask(InProcessClient):
    """Sends its masked input, then goes away before revealing any share."""

    async def secagg_unmask(self, request: UnmaskRequest) -> UnmaskShares:
        raise ClientError("connection lost")


class SilentAtMasking(InProcessClient):
    """Shares its keys, then fails to train: its pairwise masks must be removed."""

    async def train_masked(self, task: RoundTask, shares: Any) -> TrainResult:
        raise ClientError("out of memory")


class FailsTraining(InProcessClient):
    """The plain counterpart of :class:`SilentAtMasking`."""

    async def train(self, task: RoundTask) -> TrainResult:
        raise ClientError("out of memory")


class LiesAtUnmask(InProcessClient):
    """Reveals altered self-mask shares: detected by the commitments, excluded."""

    async def secagg_unmask(self, request: UnmaskRequest) -> UnmaskShares:
        shares = await super().secagg_unmask(request)
        altered = {o: bytes([s[0] ^ 1]) + s[1:] for o, s in shares.self_mask_shares.items()}
        return dataclasses.replace(shares, self_mask_shares=altered)


def run_with(sim: SimulationConfig, replaced: dict[str, type[InProcessClient]]) -> RunSummary:
    """``sim`` with the named clients replaced by the given kinds of client."""
    run, pool = _pool_run(sim)
    for name, kind in replaced.items():
        honest = pool.get(name)
        assert isinstance(honest, InProcessClient)
        asyncio.run(pool.add(kind(name, honest.train_data, honest.eval_data, honest._models)))
    with run:
        return asyncio.run(run.run())


def test_clients_lost_after_masking_or_lying_leave_the_sum_recovered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plain = run_with(sim_config(tmp_path / "plain", rounds=1), {})
    lost = {"client-1": SilentAtUnmask, "client-4": SilentAtUnmask, "client-6": LiesAtUnmask}
    masked = run_with(secure(tmp_path / "secure", rounds=1), lost)
    assert masked.status == "completed"
    # Their masked inputs arrived: they are in the sum, which 5 honest revealers unmask.
    assert masked.history[0]["replied"] == 8
    assert "excluding 'client-6': its self-mask share of" in caplog.text
    assert within_bound(plain, masked, total_samples(sim_config(tmp_path / "n")))


def test_clients_dropped_before_masking_leave_the_sum_of_the_others(tmp_path: Path) -> None:
    dropped = ("client-2", "client-5", "client-7")  # 3 of 8, n - threshold
    plain = run_with(
        sim_config(tmp_path / "plain", rounds=1, min_results=5),
        dict.fromkeys(dropped, FailsTraining),
    )
    masked = run_with(
        secure(tmp_path / "secure", rounds=1, min_results=5),
        dict.fromkeys(dropped, SilentAtMasking),
    )
    assert masked.status == "completed"
    assert masked.history[0]["clients"] == plain.history[0]["clients"]
    assert len(masked.history[0]["clients"]) == 5
    run, pool = _pool_run(sim_config(tmp_path / "n"))
    run.close()
    kept = sum(c.n_train_samples for c in pool.clients() if c.name not in dropped)
    assert within_bound(plain, masked, kept)


def test_too_few_unmasking_clients_fail_the_round_with_the_reason(tmp_path: Path) -> None:
    silent = dict.fromkeys(("client-0", "client-3", "client-5", "client-7"), SilentAtUnmask)
    summary = run_with(secure(tmp_path, rounds=2), silent)
    assert summary.status == "failed"
    assert summary.history[0]["failed"].startswith("secure aggregation failed: only 4 valid")
    assert summary.reason.startswith("round 1: secure aggregation failed: only 4 valid")
    assert "fewer than the threshold 5" in summary.reason
    with _pool_run(sim_config(tmp_path / "unchanged"))[0] as fresh:
        initial = fresh.model.weights
    assert all(np.array_equal(summary.weights[k], initial[k]) for k in initial)  # unmoved


def test_masked_replies_hide_the_update_from_the_server(tmp_path: Path) -> None:
    """What the round loop receives from a client is its masked input, no plain partial."""
    run, pool = _pool_run(secure(tmp_path, rounds=1))
    seen: list[TrainResult] = []
    client = pool.clients()[0]
    original = client.train_masked

    async def spy(task: RoundTask, shares: Any) -> TrainResult:
        seen.append(await original(task, shares))
        return seen[-1]

    client.train_masked = spy  # type: ignore[method-assign]
    with run:
        assert asyncio.run(run.run()).status == "completed"
    (reply,) = seen
    assert reply.partial.fields == {} and reply.masked is not None
    assert all(a.dtype == np.uint32 for a in reply.masked.masked.coefs.values())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"aggregator": "median"}, "aggregator='median': expected 'averaging' or 'sum'"),
        (
            {
                "client_optimizer": {"modules": ["scaffold-client"]},
                "server_optimizer": {"modules": ["scaffold-server"]},
            },
            "secure_aggregation with server_optimizer module 'scaffold-server' (aux var "
            "'scaffold'): the server sees only the masked sum",
        ),
        ({"validation": {"max_norm_ratio": 3.0}}, "secure_aggregation with validation: the"),
        (
            {"aggregator": ["averaging", {"max_norm": 5.0}]},
            "secure_aggregation with aggregator 'averaging' with max_norm",
        ),
        (
            {
                "aggregator": ["averaging", {"weighting": "uniform"}],
                "privacy": {"clip": 1.0, "noise_multiplier": 1.0},
                "sampler": ["poisson", {"q": 1.0}],
            },
            "secure_aggregation with privacy.mode='central' (the server clips each reply)",
        ),
    ],
)
def test_runs_secure_aggregation_cannot_hide_are_refused(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _pool_run(secure(tmp_path, **change))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"threshold": 5, "clip": 1.0}, "max_weight\n  Field required"),
        ({**SECURE, "threshold": 9}, "secure_aggregation.threshold=9 exceeds min_clients=8"),
        ({**SECURE, "neighbours": 3}, "secure_aggregation.neighbours=3: expected an even"),
        ({**SECURE, "neighbours": 2}, "threshold=5 exceeds neighbours \\+ 1 = 3"),
        ({**SECURE, "bits": 64}, "bits\n  Input should be less than or equal to 48"),
    ],
)
def test_bad_secure_aggregation_settings_are_refused(
    settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        ServerConfig(min_clients=8, secure_aggregation=settings)


def test_the_documented_config_is_valid_and_its_error_bound_right(tmp_path: Path) -> None:
    page = Path(__file__).resolve().parents[2] / "docs" / "secure-aggregation.md"
    (block,) = [b for b in re.findall(r"^```toml\n(.*?)^```", page.read_text(), re.S | re.M)]
    sim = SimulationConfig.model_validate(tomllib.loads(block))
    assert sim.server.secure_aggregation == SecureAggregationConfig(**SECURE)
    encoding = FixedPoint(32, SECURE["clip"], sim.n_clients, SECURE["max_weight"])
    (stated,) = re.findall(r"config above, ([\d.e-]+) per", page.read_text().replace("\n", " "))
    assert float(stated) == pytest.approx(encoding.clip / encoding.levels, rel=0.01)


def test_vectorized_clients_mask_their_updates_too(tmp_path: Path) -> None:
    """Torch clients trained in one engine call (their updates torch tensors) mask like the
    sequential ones: plain vectorized accuracy, weights within the encoding's error."""
    pytest.importorskip("torch")
    from tests.server.test_vectorized_simulation import run

    plain = run(tmp_path / "plain", "vectorized")
    settings = {"threshold": 2, "clip": 4.0, "max_weight": 1000}
    masked = run(tmp_path, "vectorized", secure_aggregation=settings)
    assert masked.status == "completed"
    assert [r["accuracy"] for r in masked.history] == [r["accuracy"] for r in plain.history]
    assert 0 < max_difference(plain, masked) < 1e-4  # 1.4e-5 when written (3 rounds)


def test_distributed_dp_noise_is_masked_in_and_counted(tmp_path: Path) -> None:
    """Under secure aggregation each client noises its clipped update before masking it: with
    the same client-local noise seed, the masked run's weights are the plain distributed-DP
    run's within the encoding's bound, far from a noiseless run's, and ε is reported."""
    dp = {"mode": "distributed", "clip": 1.0, "noise_multiplier": 1.0, "delta": 1e-5}
    server = {
        "rounds": 1,
        "aggregator": ["averaging", {"weighting": "uniform"}],
        "sampler": ["poisson", {"q": 1.0}],
    }

    def run(name: str, noise_seed: int, **extra: Any) -> RunSummary:
        sim = sim_config(tmp_path / name, **server, **extra)
        return simulate(sim.model_copy(update={"noise_seed": noise_seed}))

    plain = run("plain", 7, privacy=dp)
    masked = run("secure", 7, privacy=dp, secure_aggregation=SECURE)
    other_noise = run("other", 8, privacy=dp, secure_aggregation=SECURE)
    assert masked.status == "completed" and masked.rounds_completed == 1
    assert masked.history[0]["replied"] == 8
    assert masked.history[-1]["epsilon"] == pytest.approx(plain.history[-1]["epsilon"])
    assert masked.history[-1]["epsilon"] > 0
    assert within_bound(plain, masked, 8)  # uniform weighting: each client weighs 1
    assert max_difference(plain, masked) > 0  # quantized: the masked path ran
    # The noise is in the sum: another client seed moves the weights by the noise's size
    # (std z C / 8 = 0.125 per coordinate), not by the encoding's error.
    assert max_difference(masked, other_noise) > 0.1
