"""The noise multiplier that spends ``target_epsilon`` in the planned rounds."""

from __future__ import annotations

from fedpipe.common.config import PrivacyConfig
from fedpipe.common.privacy.accountant import RoundEvent, new_accountant
from fedpipe.server.privacy.sampling import with_multiplier

__all__ = ["calibrate_noise"]


def calibrate_noise(config: PrivacyConfig, event: RoundEvent, rounds: int) -> float:
    """The smallest noise multiplier whose ``rounds`` rounds of ``event`` spend at most
    ``config.target_epsilon`` at ``config.delta`` (``dp_accounting.calibrate_dp_mechanism``,
    Brent's method with the same accountant the run uses)."""
    import dp_accounting

    assert config.target_epsilon is not None
    poisson = event.population == 0

    def make_event(multiplier: float) -> object:
        return dp_accounting.SelfComposedDpEvent(
            with_multiplier(event, multiplier).dp_event(), rounds
        )

    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: new_accountant(config.accountant, poisson),
            make_event,
            config.target_epsilon,
            config.delta,
            dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
        )
    )
