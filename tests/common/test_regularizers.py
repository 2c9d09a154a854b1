"""Regularizers: penalty gradients and FedProx's anchor."""

from __future__ import annotations

import numpy as np
import pytest

from fedpipe.common.regularizers import FedProxRegularizer, LassoRegularizer, RidgeRegularizer
from fedpipe.common.vector import Vector


def vec(*values: float) -> Vector:
    return Vector({"w": np.array(values, dtype=np.float64)})


def test_fedprox_gradient_is_mu_times_distance_to_anchor() -> None:
    fedprox = FedProxRegularizer(mu=0.5)
    start = vec(1.0, 2.0)
    fedprox.on_round_start(start)
    start.coefs["w"][:] = 0.0  # the anchor is a copy
    out = fedprox.run(vec(0.1, 0.1), vec(2.0, 0.0))
    # 0.1 + 0.5 * ([2, 0] - [1, 2]) = [0.6, -0.9]
    np.testing.assert_allclose(out["w"], [0.6, -0.9])
    assert fedprox.get_state()["anchor"].array_equal(vec(1.0, 2.0))  # type: ignore[union-attr]


def test_fedprox_anchor_defaults_to_first_weights_and_resumes() -> None:
    fedprox = FedProxRegularizer(mu=1.0)
    assert fedprox.get_state() == {"anchor": None}
    first = fedprox.run(vec(0.5), vec(3.0))
    np.testing.assert_allclose(first["w"], [0.5])  # the anchor is the weights of step 1
    resumed = FedProxRegularizer(mu=1.0)
    resumed.set_state(fedprox.get_state())
    np.testing.assert_allclose(resumed.run(vec(0.0), vec(5.0))["w"], [2.0])  # 5 - 3


def test_lasso_adds_alpha_times_sign() -> None:
    out = LassoRegularizer(alpha=0.1).run(vec(0.0, 0.0, 1.0), vec(2.0, -3.0, 0.0))
    np.testing.assert_allclose(out["w"], [0.1, -0.1, 1.0])


def test_ridge_adds_twice_alpha_times_weights() -> None:
    # penalty alpha * ||w||^2 -> gradient 2 * alpha * w
    out = RidgeRegularizer(alpha=0.1).run(vec(1.0, 1.0), vec(2.0, -3.0))
    np.testing.assert_allclose(out["w"], [1.4, 0.4])


def test_regularizers_keep_float32() -> None:
    grads = Vector({"w": np.ones(3, np.float32)})
    weights = Vector({"w": np.full(3, 2.0, np.float32)})
    for regularizer in (FedProxRegularizer(), LassoRegularizer(), RidgeRegularizer()):
        assert regularizer.run(grads, weights).specs() == grads.specs()


@pytest.mark.parametrize("cls", [FedProxRegularizer, LassoRegularizer, RidgeRegularizer])
def test_negative_strength_is_rejected(cls: type) -> None:
    with pytest.raises(ValueError, match="expected a non-negative number"):
        cls(-1.0)
