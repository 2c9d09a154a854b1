"""Client-level DP in the round loop: epsilon in every record, the summary and the CSV; the
accountant resumes from the checkpoint; the budget stops a run; unmodelled setups refused."""

from __future__ import annotations

import csv
import itertools
import json
import logging
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedpipe.common.aggregators.averaging import AveragingAggregator
from fedpipe.common.config import ConfigError, PrivacyConfig, ServerConfig, SimulationConfig
from fedpipe.common.privacy.accountant import PrivacyAccountant, RoundEvent
from fedpipe.common.privacy.client_update import privatize_update
from fedpipe.common.summable import Summable
from fedpipe.common.training import EvalResult
from fedpipe.common.vector import Vector
from fedpipe.server.clients import RoundTask
from fedpipe.server.privacy.client_level import ClientLevelDP
from fedpipe.server.sampling import PoissonSampler, UniformSampler
from fedpipe.server.simulation import simulate
from fedpipe.server.transports.inprocess import InProcessClient
from tests.server.sim_runs import resume, sim_config

DP = {"clip": 1.0, "noise_multiplier": 1.0, "delta": 1e-5}
UNIFORM = ["averaging", {"weighting": "uniform"}]


def dp_sim(out: Path, rounds: int = 6, **privacy: Any) -> Any:
    return sim_config(
        out,
        8,
        rounds=rounds,
        sampler=["poisson", {"q": 0.5}],
        aggregator=UNIFORM,
        privacy={**DP, **privacy},
    )


def expected_epsilon(rounds: int, q: float = 0.5, sigma: float = 1.0) -> float:
    accountant = PrivacyAccountant("rdp", 1e-5)
    for _ in range(rounds):
        accountant.spend(RoundEvent(sigma, q=q))
    return accountant.epsilon()


def test_central_dp_simulation_reports_epsilon_everywhere(tmp_path: Path) -> None:
    summary = simulate(dp_sim(tmp_path))
    assert summary.status == "completed" and summary.rounds_completed == 6
    epsilons = [r["epsilon"] for r in summary.history]
    assert epsilons == pytest.approx([expected_epsilon(r) for r in range(1, 7)], rel=1e-9)
    assert all(a < b for a, b in itertools.pairwise(epsilons))
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["epsilon"] == pytest.approx(expected_epsilon(6), rel=1e-9)
    assert (data["delta"], data["noise_multiplier"], data["accountant"]) == (1e-5, 1.0, "rdp")
    with open(tmp_path / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["epsilon"]) for r in rows] == pytest.approx(epsilons)
    assert {float(r["delta"]) for r in rows} == {1e-5}
    assert all(np.isfinite(summary.weights[n]).all() for n in summary.weights.coefs)


def test_a_resumed_run_keeps_counting(tmp_path: Path) -> None:
    simulate(dp_sim(tmp_path, rounds=3))
    resumed = resume(dp_sim(tmp_path, rounds=6))
    assert resumed.status == "completed"
    assert [r["epsilon"] for r in resumed.history] == pytest.approx(
        [expected_epsilon(r) for r in range(1, 7)], rel=1e-9
    )


class Crash(SystemExit):
    """The server process dies (a SystemExit: asyncio lets it through at once)."""


class CrashingInRound3(InProcessClient):
    """Its evaluation task of round 3 (the round's model has left the server) kills it."""

    async def evaluate(self, task: RoundTask) -> EvalResult:
        if task.round_number == 3:
            raise Crash
        return await super().evaluate(task)


def test_a_model_that_left_before_a_crash_counts_with_its_replay(tmp_path: Path) -> None:
    with pytest.raises(Crash):
        resume(dp_sim(tmp_path), CrashingInRound3, again=False)
    resumed = resume(dp_sim(tmp_path))
    assert resumed.status == "completed"
    # Rounds 1-2 from the checkpoint; round 3's first model went out for evaluation, so its
    # replay is a second release: 4 rounds counted at round 3, 7 at the end.
    assert [r["epsilon"] for r in resumed.history] == pytest.approx(
        [expected_epsilon(r) for r in (1, 2, 4, 5, 6, 7)], rel=1e-9
    )


def test_target_epsilon_stops_before_the_budget_is_exceeded(tmp_path: Path) -> None:
    target = (expected_epsilon(3) + expected_epsilon(4)) / 2  # room for 3 rounds, not 4
    summary = simulate(dp_sim(tmp_path, target_epsilon=target))
    assert summary.status == "completed" and summary.stopped_early
    assert summary.rounds_completed == 3
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["reason"].startswith("privacy budget: round 4 would take epsilon to")
    assert data["epsilon"] == pytest.approx(expected_epsilon(3)) and data["epsilon"] <= target


def test_calibrated_run_spends_its_target(tmp_path: Path) -> None:
    sim = dp_sim(tmp_path, 4, noise_multiplier=None, target_epsilon=8.0, on_budget="calibrate")
    summary = simulate(sim)
    assert summary.status == "completed" and summary.rounds_completed == 4
    assert summary.history[-1]["epsilon"] == pytest.approx(8.0, rel=1e-3)


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ({"sampler": ["weighted", {"count": 2}]}, "models only Poisson sampling"),
        ({"aggregator": "averaging"}, "bounds each client's weight in the sum"),
        (  # DP's finalize is a plain mean: it would silently drop the gradient mask
            {"aggregator": ["gradient-masked-averaging", {"weighting": "uniform"}]},
            "gradient-masked-averaging",
        ),
        ({"sampler": ["uniform", {"count": 2}], "privacy": {**DP, "accountant": "pld"}}, "PLD"),
    ],
)
def test_setups_the_accountant_cannot_model_are_refused(
    tmp_path: Path, server: dict[str, Any], message: str
) -> None:
    settings = {"sampler": ["poisson", {"q": 0.5}], "aggregator": UNIFORM, "privacy": DP}
    with pytest.raises(ConfigError, match=message):
        simulate(sim_config(tmp_path, 4, **{**settings, **server}))


def test_clipping_without_noise_is_refused() -> None:
    with pytest.raises(ValueError, match="clipping without noise gives no privacy"):
        PrivacyConfig(clip=1.0, noise_multiplier=0.0)


def partial(values: list[float]) -> Summable:
    return Summable({"weighted_sum": Vector({"w": np.array(values)}), "total_weight": 1.0})


def test_central_clip_and_noise_have_the_stated_sizes() -> None:
    config = PrivacyConfig(clip=2.0, noise_multiplier=0.5)
    dp = ClientLevelDP(config, UniformSampler(count=4), AveragingAggregator("uniform"), 0.5)
    dp.begin_round(1, candidates=10, sampled=4)
    big, small = partial([30.0, 40.0]), partial([0.3, 0.4])
    dp.clip_reply(big)
    dp.clip_reply(small)
    np.testing.assert_allclose(big.vector("weighted_sum")["w"], [1.2, 1.6])  # norm 50 -> 2
    np.testing.assert_allclose(small.vector("weighted_sum")["w"], [0.3, 0.4])  # under the clip
    zeros = Summable({"weighted_sum": Vector({"w": np.zeros(100_000)}), "total_weight": 4.0})
    noised = dp.finalize(zeros)["w"]  # N(0, (0.5 x 2)^2) / 4 participants
    assert noised.std() == pytest.approx(0.5 * 2.0 / 4, rel=0.02)


def test_adaptive_clip_follows_the_quantile() -> None:
    adaptive = {"initial": 1.0, "target_quantile": 0.5, "learning_rate": 0.2, "count_stddev": 0.5}
    config = PrivacyConfig(adaptive_clip=adaptive, noise_multiplier=0.8)  # type: ignore[arg-type]
    dp = ClientLevelDP(config, PoissonSampler(1.0), AveragingAggregator("uniform"), 0.8)
    assert dp.value_multiplier == pytest.approx((0.8**-2 - 1.0**-2) ** -0.5)
    for round_number in range(1, 60):
        dp.begin_round(round_number, candidates=20, sampled=20)
        for norm in np.linspace(0.1, 10.0, 20):  # median norm about 5
            dp.clip_reply(partial([float(norm), 0.0]))
        dp.finalize(partial([0.0, 0.0]))
    assert 3.0 < dp.clip < 7.5


def test_distributed_noise_sums_to_the_central_noise(tmp_path: Path) -> None:
    config = PrivacyConfig(mode="distributed", clip=2.0, noise_multiplier=0.5)
    dp = ClientLevelDP(config, UniformSampler(count=4), AveragingAggregator("uniform"), 0.5)
    dp.begin_round(1, candidates=10, sampled=4)
    settings = dp.client_settings()
    assert settings == {"clip": 2.0, "noise_std": pytest.approx(0.5 * 2.0 / 2)}  # / sqrt(4)
    rng = np.random.default_rng(0)
    replies = [privatize_update(Vector({"w": np.zeros(50_000)}), settings, rng) for _ in range(4)]
    total = Summable({"weighted_sum": sum(replies[1:], replies[0]), "total_weight": 4.0})
    averaged = dp.finalize(total)["w"]  # no server noise: the clients' sum carries it
    assert averaged.std() == pytest.approx(0.5 * 2.0 / 4, rel=0.02)
    big = privatize_update(
        Vector({"w": np.array([300.0, 400.0])}), {**settings, "noise_std": 1e-9}, rng
    )
    np.testing.assert_allclose(big["w"], [1.2, 1.6], rtol=1e-6)
    with pytest.raises(ValueError, match="noise_std=0; expected a positive number"):
        privatize_update(Vector({"w": np.zeros(2)}), {"clip": 1.0, "noise_std": 0}, rng)


@pytest.mark.parametrize(("min_results", "sigma"), [(8, 1.0), (None, 8**-0.5), (4, 0.5**0.5)])
def test_distributed_dp_is_accounted_at_the_fewest_replies_a_round_takes(
    tmp_path: Path, min_results: int | None, sigma: float
) -> None:
    """Each of the expected 8 clients (q = 1) adds an eighth of the noise variance: a round
    aggregated with m < 8 replies holds sigma * sqrt(m / 8), and is accounted so."""
    sim = dp_sim(tmp_path, rounds=3, mode="distributed")
    update = {"min_results": min_results, "sampler": ["poisson", {"q": 1.0}]}
    server = sim.server.model_copy(update=update)
    summary = simulate(sim.model_copy(update={"server": server}))
    assert summary.status == "completed" and summary.rounds_completed == 3
    want = expected_epsilon(3, q=1.0, sigma=sigma)
    assert summary.history[-1]["epsilon"] == pytest.approx(want, rel=1e-9)


def test_the_docs_config_is_valid() -> None:
    text = (Path(__file__).parents[2] / "docs" / "privacy.md").read_text()
    block = text.split("```toml\n", 1)[1].split("```", 1)[0]
    server = ServerConfig.model_validate(tomllib.loads(block)["server"])
    assert server.privacy is not None and server.privacy.target_epsilon == 8.0


def test_the_progress_line_shows_epsilon_and_delta() -> None:
    from fedpipe.cli import format_round

    record = {"round": 2, "sampled": 4, "replied": 4, "epsilon": 1.25, "delta": 1e-5}
    line = format_round({**record, "seconds": 0.5}, 6)
    assert "epsilon 1.2500  delta 1.0e-05" in line


def test_validation_is_refused_with_dp(tmp_path: Path) -> None:
    # Rejecting by the round's median norm lets one client decide whether others count: the
    # sum then moves by more than one clip, which the accountant assumes.
    settings = {"sampler": ["poisson", {"q": 0.5}], "aggregator": UNIFORM, "privacy": DP}
    with pytest.raises(ConfigError, match="privacy with validation"):
        simulate(sim_config(tmp_path, 4, **settings, validation={"max_norm_ratio": 3.0}))


def test_aux_var_modules_are_refused_with_dp(tmp_path: Path) -> None:
    # SCAFFOLD's control variates reach the server optimizer unclipped and un-noised.
    settings = {"sampler": ["poisson", {"q": 0.5}], "aggregator": UNIFORM, "privacy": DP}
    modules = {
        "client_optimizer": {"lrate": 0.3, "modules": ["scaffold-client"]},
        "server_optimizer": {"modules": ["scaffold-server"]},
    }
    with pytest.raises(ConfigError, match="privacy with server_optimizer module 'scaffold-server'"):
        simulate(sim_config(tmp_path, 4, **settings, **modules))


def test_who_is_sampled_is_secret_from_the_config_seed(tmp_path: Path) -> None:
    # Amplification by subsampling assumes nobody knows who was drawn: the run seed, which
    # every client receives, must not decide it (8 clients, q = 0.5, 6 rounds: two draws
    # from private entropy agree with probability 2^-48).
    first = simulate(dp_sim(tmp_path / "a"))
    second = simulate(dp_sim(tmp_path / "b"))
    assert [r["clients"] for r in first.history] != [r["clients"] for r in second.history]


def test_distributed_dp_in_vectorized_mode_trains_client_by_client(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each client adds its own noise share: the vectorized mode falls back, said once,
    rather than failing every client of every round."""
    pytest.importorskip("torch")
    sim = dp_sim(tmp_path, rounds=2, mode="distributed")
    model = {"name": "tests.common.torch_models:build", "config": {"hidden": 8}}
    sim = sim.model_copy(
        update={"mode": "vectorized", "server": sim.server.model_copy(update={"model": model})}
    )
    sim = SimulationConfig.model_validate(sim.model_dump())
    with caplog.at_level(logging.INFO, logger="fedpipe.server.simulation"):
        summary = simulate(sim)
    assert summary.status == "completed" and summary.rounds_completed == 2
    assert all(r["replied"] > 0 for r in summary.history), summary.history
    fallbacks = [r for r in caplog.records if "distributed DP noise" in r.getMessage()]
    assert len(fallbacks) == 1
