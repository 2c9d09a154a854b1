"""Client samplers: the statistics each promises, determinism, state and config errors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from fedpipe.common import registry
from fedpipe.common.codec import state_from_bytes, state_to_bytes
from fedpipe.common.state import states_equal
from fedpipe.server.sampling import ClientSampler, PowerOfChoiceSampler

#: Arguments for samplers: each draws a strict subset of 12 clients with these (a new sampler
#: that cannot be built with defaults needs an entry here, or the registry-wide tests fail).
TEST_CONFIGS: dict[str, dict[str, Any]] = {
    "uniform": {"fraction": 0.5},
    "poisson": {"q": 0.3},
    "power-of-choice": {"d": 5, "m": 3},
    "weighted": {"count": 3},
}


@dataclass
class Client:
    name: str
    n_train_samples: int = 100


def clients(n: int, sizes: list[int] | None = None) -> list[Client]:
    sizes = sizes if sizes is not None else [100] * n
    return [Client(f"client-{i:02d}", size) for i, size in enumerate(sizes)]


def build(name: str) -> ClientSampler:
    sampler: ClientSampler = registry.build_spec("sampler", [name, TEST_CONFIGS.get(name, {})])
    return sampler


SAMPLERS = registry.names("sampler")


def draws(
    sampler: ClientSampler, pool: list[Client], rounds: int, seed: int = 0
) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [[c.name for c in sampler.sample(pool, rng, r + 1)] for r in range(rounds)]


# ---- every sampler ---------------------------------------------------------------------------


def test_the_built_in_samplers_are_registered() -> None:
    assert {"uniform", "weighted", "poisson", "power-of-choice"} <= set(SAMPLERS)


@pytest.mark.parametrize("name", SAMPLERS)
def test_config_round_trips(name: str) -> None:
    sampler = build(name)
    clone = registry.build_spec("sampler", registry.spec_of(sampler))
    assert type(clone) is type(sampler) and clone.get_config() == sampler.get_config()


@pytest.mark.parametrize("name", SAMPLERS)
def test_same_seed_same_clients_in_candidate_order(name: str) -> None:
    pool = clients(12, [10 * (i + 1) for i in range(12)])
    first, second = draws(build(name), pool, 20), draws(build(name), pool, 20)
    assert first == second
    order = [c.name for c in pool]
    for picked in first:
        assert picked == sorted(picked, key=order.index) and len(set(picked)) == len(picked)
    assert draws(build(name), pool, 20, seed=1) != first


@pytest.mark.parametrize("name", SAMPLERS)
def test_state_survives_the_checkpoint_encoding(name: str) -> None:
    pool = clients(8)
    sampler = build(name)
    sampler.observe({c.name: float(i) for i, c in enumerate(pool[:4])})
    state = state_from_bytes(state_to_bytes(sampler.get_state()))
    clone = build(name)
    clone.set_state(state)
    assert states_equal(clone.get_state(), sampler.get_state())
    assert draws(clone, pool, 5) == draws(sampler, pool, 5)


@pytest.mark.parametrize("name", SAMPLERS)
def test_no_candidate_no_client(name: str) -> None:
    assert build(name).sample([], np.random.default_rng(0), 1) == []


# ---- uniform ---------------------------------------------------------------------------------


def test_uniform_draws_what_the_round_loop_drew_before_samplers() -> None:
    # Pinned from ClientPool.sample(rng, fraction, count) before samplers existed: existing
    # runs keep their clients.
    pool = clients(10)
    by_fraction = registry.build_spec("sampler", ["uniform", {"fraction": 0.3}])
    by_count = registry.build_spec("sampler", ["uniform", {"count": 4}])
    short = [[name[-1] for name in picked] for picked in draws(by_fraction, pool, 4, seed=7)]
    assert short == [["5", "6", "7"], ["2", "6", "7"], ["2", "7", "9"], ["1", "6", "7"]]
    short = [[name[-1] for name in picked] for picked in draws(by_count, pool, 4, seed=7)]
    assert short == [
        ["5", "6", "8", "9"],
        ["0", "1", "2", "9"],
        ["1", "3", "6", "7"],
        ["2", "7", "8", "9"],
    ]


def test_uniform_default_takes_everyone_and_leaves_the_rng_alone() -> None:
    rng = np.random.default_rng(3)
    before = rng.bit_generator.state
    pool = clients(5)
    assert registry.build_spec("sampler", "uniform").sample(pool, rng, 1) == pool
    assert rng.bit_generator.state == before


def test_uniform_inclusion_is_even() -> None:
    pool = clients(10)
    counts = np.zeros(10)
    rng = np.random.default_rng(0)
    sampler = registry.build_spec("sampler", ["uniform", {"count": 3}])
    for r in range(6000):
        for c in sampler.sample(pool, rng, r):
            counts[pool.index(c)] += 1
    sigma = math.sqrt(6000 * 0.3 * 0.7)
    assert np.all(np.abs(counts - 1800) < 5 * sigma), counts


# ---- weighted --------------------------------------------------------------------------------


def frequencies(sampler: ClientSampler, pool: list[Client], n: int) -> np.ndarray:
    counts = np.zeros(len(pool))
    rng = np.random.default_rng(11)
    for r in range(n):
        for c in sampler.sample(pool, rng, r):
            counts[pool.index(c)] += 1
    return counts / n


def test_weighted_frequencies_are_proportional_to_reported_sizes() -> None:
    pool = clients(5, [10, 20, 30, 40, 0])
    freq = frequencies(registry.build_spec("sampler", ["weighted", {"count": 1}]), pool, 8000)
    expected = np.array([0.1, 0.2, 0.3, 0.4, 0.0])
    sigma = np.sqrt(expected * (1 - expected) / 8000)
    assert np.all(np.abs(freq - expected) <= 5 * sigma + 1e-12), freq
    assert freq[4] == 0.0  # no data, never drawn


def test_weighted_cap_limits_what_a_large_report_weighs() -> None:
    pool = clients(2, [10, 1_000_000])
    capped = registry.build_spec("sampler", ["weighted", {"count": 1, "max_samples": 10}])
    freq = frequencies(capped, pool, 8000)
    assert abs(freq[0] - 0.5) < 5 * math.sqrt(0.25 / 8000), freq


def test_weighted_draws_without_replacement_and_only_holders_of_data() -> None:
    pool = clients(4, [5, 0, 7, 0])
    sampler = registry.build_spec("sampler", ["weighted", {"count": 3}])
    for picked in draws(sampler, pool, 50):
        assert picked == ["client-00", "client-02"]


# ---- poisson ---------------------------------------------------------------------------------


def test_poisson_round_sizes_are_binomial_with_rate_q() -> None:
    n, q, rounds = 200, 0.1, 2000
    pool = clients(n)
    sampler = registry.build_spec("sampler", ["poisson", {"q": q}])
    rng = np.random.default_rng(5)
    picked = [sampler.sample(pool, rng, r) for r in range(rounds)]
    sizes = np.array([len(p) for p in picked])
    # The mean of `rounds` Binomial(n, q) draws: within 5 standard errors of q n.
    assert abs(sizes.mean() - q * n) < 5 * math.sqrt(n * q * (1 - q) / rounds)
    assert sizes.var(ddof=1) == pytest.approx(n * q * (1 - q), rel=0.2)
    inclusion = np.zeros(n)
    for p in picked:
        for c in p:
            inclusion[pool.index(c)] += 1
    assert np.all(np.abs(inclusion / rounds - q) < 5 * math.sqrt(q * (1 - q) / rounds))


def test_poisson_never_tops_up_an_empty_round(caplog: pytest.LogCaptureFixture) -> None:
    pool = clients(3)
    sampler = registry.build_spec("sampler", ["poisson", {"q": 0.05}])
    rng = np.random.default_rng(0)
    with caplog.at_level("INFO", logger="fedpipe.server.sampling.poisson"):
        sizes = [len(sampler.sample(pool, rng, r + 1)) for r in range(200)]
    empty = sizes.count(0)
    # P(empty) = 0.95 ** 3 = 0.857: 171 of 200 expected, 5 sigma is 25.
    assert abs(empty - 171.5) < 25
    assert "round 1: poisson q=0.05 drew" in caplog.text and "never topped up" in caplog.text


def test_poisson_q_one_takes_everyone() -> None:
    pool = clients(7)
    assert (
        draws(registry.build_spec("sampler", ["poisson", {"q": 1}]), pool, 3)
        == [[c.name for c in pool]] * 3
    )


# ---- power-of-choice -------------------------------------------------------------------------


def test_power_of_choice_keeps_the_highest_losses_unseen_first() -> None:
    pool = clients(6)
    sampler = PowerOfChoiceSampler(d=10, m=2)  # every client is a candidate
    rng = np.random.default_rng(0)
    assert len(sampler.sample(pool, rng, 1)) == 2  # no loss yet: any two
    sampler.observe({"client-00": 1.0, "client-01": 5.0, "client-02": 3.0, "client-03": 0.5})
    sampler.observe({"client-04": 4.0, "client-05": 2.0})
    assert [c.name for c in sampler.sample(pool, rng, 2)] == ["client-01", "client-04"]
    sampler.observe({"client-01": 0.1})  # the latest report wins
    assert [c.name for c in sampler.sample(pool, rng, 3)] == ["client-02", "client-04"]
    newcomer = [*pool, Client("client-06")]
    assert [c.name for c in sampler.sample(newcomer, rng, 4)] == ["client-04", "client-06"]


def test_power_of_choice_candidates_follow_data_size() -> None:
    pool = clients(4, [10, 20, 30, 40])
    # d = m = 1: the one candidate is the pick, drawn in proportion to size.
    freq = frequencies(PowerOfChoiceSampler(d=1, m=1), pool, 8000)
    expected = np.array([0.1, 0.2, 0.3, 0.4])
    assert np.all(np.abs(freq - expected) <= 5 * np.sqrt(expected * (1 - expected) / 8000))


def test_power_of_choice_favours_high_loss_clients() -> None:
    pool = clients(10)
    sampler = PowerOfChoiceSampler(d=5, m=2)
    sampler.observe({c.name: float(i) for i, c in enumerate(pool)})  # client-09 is worst
    freq = frequencies(sampler, pool, 4000)
    # client-09 is picked whenever it is a candidate: P = 5 / 10; client-00 never (4 rank above).
    assert abs(freq[9] - 0.5) < 5 * math.sqrt(0.25 / 4000) and freq[0] == 0.0
    assert freq.sum() == pytest.approx(2.0)


def test_power_of_choice_state_holds_the_losses() -> None:
    sampler = PowerOfChoiceSampler(d=3, m=1)
    sampler.observe({"a": 0.25})
    assert sampler.get_state() == {"losses": {"a": 0.25}}
    with pytest.raises(ValueError, match="power-of-choice state 'losses' is None"):
        sampler.set_state({})


# ---- config errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (["uniform", {"fraction": 0.5, "count": 2}], "fraction=0.5 and count=2 are two ways"),
        (["uniform", {"fraction": 0}], "uniform sampler: fraction=0; expected a number in (0, 1]"),
        (["weighted", {"count": 0}], "weighted sampler: count=0; expected an integer >= 1"),
        (["weighted", {"max_samples": -1}], "max_samples=-1; expected an integer >= 1"),
        (["poisson", {"q": 1.5}], "poisson sampler: q=1.5; expected a probability in (0, 1]"),
        (["power-of-choice", {"d": 2, "m": 3}], "m=3 exceeds d=2"),
        (["power-of-choice", {"d": 2}], "missing 1 required positional argument: 'm'"),
        (["poisson", {"rate": 0.1}], "unexpected keyword argument 'rate'"),
    ],
)
def test_bad_sampler_config_says_what_is_wrong(spec: list[Any], message: str) -> None:
    with pytest.raises((ValueError, TypeError)) as err:
        registry.build_spec("sampler", spec)
    assert message in str(err.value)


def test_a_stateless_sampler_refuses_a_foreign_state() -> None:
    with pytest.raises(ValueError, match="sampler 'uniform' keeps no state, got keys"):
        registry.build_spec("sampler", "uniform").set_state({"losses": {}})
