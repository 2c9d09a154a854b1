"""The accountant reports what dp-accounting computes for the same run (the plumbing, not the
library), keeps its count in checkpoints, and calibrates noise for a target epsilon."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from fedpipe.common.codec import state_from_bytes, state_to_bytes
from fedpipe.common.config import PrivacyConfig
from fedpipe.common.privacy.accountant import PrivacyAccountant, RoundEvent
from fedpipe.server.privacy.calibrate import calibrate_noise

# DP-SGD on MNIST (Abadi et al. 2016): batches of 256 of 60,000, sigma 1.1, 60 epochs.
Q, SIGMA, DELTA = 256 / 60000, 1.1, 1e-5
STEPS = int(60 * 60000 / 256)


def library_epsilon(accountant: dp_accounting.PrivacyAccountant, steps: int) -> float:
    event = dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(SIGMA))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return float(accountant.get_epsilon(DELTA))


def counted(kind: str, steps: int) -> PrivacyAccountant:
    accountant = PrivacyAccountant(kind, DELTA)  # type: ignore[arg-type]
    for _ in range(steps):
        accountant.spend(RoundEvent(SIGMA, q=Q))
    return accountant


def test_rdp_epsilon_equals_the_library_for_the_mnist_setting() -> None:
    expected = library_epsilon(rdp.RdpAccountant(), STEPS)
    assert counted("rdp", STEPS).epsilon() == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(2.5966, abs=1e-3)  # the reference value, reproduced


def test_pld_equals_the_library_and_is_tighter_than_rdp() -> None:
    steps = 2000  # PLD is slow: a shorter run
    expected = library_epsilon(pld.PLDAccountant(), steps)
    pld_eps = counted("pld", steps).epsilon()
    assert pld_eps == pytest.approx(expected, rel=1e-6)
    assert pld_eps < counted("rdp", steps).epsilon()


def test_fixed_size_sampling_counts_replace_one_neighbours() -> None:
    accountant = PrivacyAccountant("rdp", DELTA)
    for _ in range(20):
        accountant.spend(RoundEvent(1.0, population=100, sample_size=10))
    library = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    inner = dp_accounting.GaussianDpEvent(0.5)  # the sum moves by 2 x clip: z / 2
    library.compose(dp_accounting.SampledWithoutReplacementDpEvent(100, 10, inner), 20)
    assert accountant.epsilon() == pytest.approx(library.get_epsilon(DELTA), rel=1e-9)
    assert not PrivacyAccountant("pld", DELTA).supports(RoundEvent(1.0, 0.0, 100, 10))


def test_state_round_trip_keeps_counting() -> None:
    first = counted("rdp", 30)
    resumed = PrivacyAccountant("rdp", DELTA)
    resumed.set_state(state_from_bytes(state_to_bytes(first.get_state())))
    for accountant in (first, resumed):
        for _ in range(30):
            accountant.spend(RoundEvent(SIGMA, q=Q))
    assert resumed.epsilon() == first.epsilon() == counted("rdp", 60).epsilon()
    assert resumed.rounds == [(RoundEvent(SIGMA, q=Q), 60)]
    with pytest.raises(ValueError, match="expected 5 floats"):
        resumed.set_state({"rounds": [[1.0, 2.0]]})


def test_calibrated_noise_spends_the_target_in_the_planned_rounds() -> None:
    config = PrivacyConfig(clip=1.0, target_epsilon=4.0, on_budget="calibrate")
    event = RoundEvent(1.0, q=0.1)
    sigma = calibrate_noise(config, event, 50)
    spent = PrivacyAccountant("rdp", config.delta)
    for _ in range(50):
        spent.spend(RoundEvent(sigma, q=0.1))
    assert spent.epsilon() == pytest.approx(4.0, rel=1e-3)
    assert spent.epsilon() <= 4.0 + 1e-6


def test_fixed_size_sampling_accounts_the_sum_moving_by_twice_the_clip() -> None:
    # Replacing one of n clients moves the clipped sum by up to 2 x clip: with every client
    # drawn, the round is a Gaussian of std z x clip at distance 2 x clip, which the library's
    # PLD models exactly (its REPLACE_ONE shifts both ways). RDP may be looser, never tighter.
    accountant = PrivacyAccountant("rdp", DELTA)
    for _ in range(5):
        accountant.spend(RoundEvent(1.0, population=10, sample_size=10))
    exact = pld.PLDAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    exact.compose(dp_accounting.GaussianDpEvent(1.0), 5)
    assert accountant.epsilon() >= exact.get_epsilon(DELTA)
