"""Optimizer modules: hand-computed steps, clipping, noise, convergence."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from fedpipe.common.codec import state_from_bytes, state_to_bytes
from fedpipe.common.modules import (
    AdagradModule,
    AdamModule,
    EWMAModule,
    GaussianNoise,
    L2Clipping,
    L2GlobalClipping,
    MomentumModule,
    OptiModule,
    RMSPropModule,
    YogiModule,
)
from fedpipe.common.optim import BareWeights, Optimizer
from fedpipe.common.vector import Vector


def scalars(module: OptiModule, grads: list[float]) -> list[float]:
    """Run ``module`` on one-element gradients; return the outputs as floats."""
    return [
        float(module.run(Vector({"x": np.array([g], dtype=np.float64)}))["x"][0]) for g in grads
    ]


# ---- hand-computed three-step expectations ------------------------------------------------
# Gradients 1, -1, 2 unless said otherwise; every expected number is derived in the comment.


def test_momentum_three_steps() -> None:
    # b1 = g1 = 1; b2 = .5*1 + -1 = -.5; b3 = .5*-.5 + 2 = 1.75
    assert scalars(MomentumModule(beta=0.5), [1, -1, 2]) == pytest.approx([1, -0.5, 1.75])


def test_momentum_dampening_three_steps() -> None:
    # torch does not dampen the first step: b1 = 1; b2 = .5*1 + .5*-1 = 0; b3 = 0 + .5*2 = 1
    module = MomentumModule(beta=0.5, dampening=0.5)
    assert scalars(module, [1, -1, 2]) == pytest.approx([1, 0, 1])


def test_nesterov_three_steps() -> None:
    # buffers 1, -.5, 1.75 as above; out = g + .5*b: 1.5, -1.25, 2.875
    module = MomentumModule(beta=0.5, nesterov=True)
    assert scalars(module, [1, -1, 2]) == pytest.approx([1.5, -1.25, 2.875])


def test_nesterov_rejects_dampening() -> None:
    with pytest.raises(ValueError, match="Nesterov"):
        MomentumModule(beta=0.5, dampening=0.1, nesterov=True)


def test_ewma_three_steps() -> None:
    # s1 = .5*1 = .5; s2 = .25 - .5 = -.25; s3 = -.125 + 1 = .875
    assert scalars(EWMAModule(beta=0.5), [1, -1, 2]) == pytest.approx([0.5, -0.25, 0.875])


def test_adam_three_steps() -> None:
    # b1 = b2 = .5, eps = 0.
    # t1: m=.5 v=.5, corrections .5 .5 -> 1 / sqrt(1) = 1
    # t2: m=-.25 v=.75, corrections .75 .75 -> (-1/3) / sqrt(1) = -1/3
    # t3: m=.875 v=2.375, corrections .875 .875 -> 1 / sqrt(19/7) = sqrt(7/19) = 0.606977
    module = AdamModule(beta_1=0.5, beta_2=0.5, eps=0.0)
    assert scalars(module, [1, -1, 2]) == pytest.approx([1, -1 / 3, 0.6069769786668839])


def test_adam_without_and_with_amsgrad() -> None:
    # Gradients 2, 0, 0, b1 = b2 = .5, eps = 0: v = 2, 1, .5 decreases; max(v) stays 2.
    # m = 1, .5, .25 -> m_hat = 2, 2/3, 2/7.
    # plain:   v_hat = 4, 4/3, 4/7
    #          -> 2/2 = 1, (2/3)/sqrt(4/3) = 1/sqrt(3), (2/7)/(2/sqrt7) = 1/sqrt7
    # amsgrad: v_hat = 4, 8/3, 16/7
    #          -> 1, (2/3)/sqrt(8/3) = 1/sqrt(6), (2/7)/(4/sqrt7) = sqrt7/14
    plain = AdamModule(beta_1=0.5, beta_2=0.5, eps=0.0)
    assert scalars(plain, [2, 0, 0]) == pytest.approx([1, 0.5773502691896258, 0.3779644730092272])
    ams = AdamModule(beta_1=0.5, beta_2=0.5, eps=0.0, amsgrad=True)
    assert scalars(ams, [2, 0, 0]) == pytest.approx([1, 0.4082482904638631, 0.18898223650461363])


def test_adam_eps_is_added_after_sqrt() -> None:
    # one step, g = 1, b2 = .5: v_hat = 1 -> 1 / (sqrt(1) + 1) = .5 (eps = 1)
    assert scalars(AdamModule(beta_1=0.5, beta_2=0.5, eps=1.0), [1]) == pytest.approx([0.5])


def test_rmsprop_three_steps() -> None:
    # beta = .5, eps = 0: v = .5, .75, 2.375
    # out = 1/sqrt(.5) = 1.414214, -1/sqrt(.75) = -1.154701, 2/sqrt(2.375) = 1.297771
    module = RMSPropModule(beta=0.5, eps=0.0)
    assert scalars(module, [1, -1, 2]) == pytest.approx(
        [1.4142135623730951, -1.1547005383792517, 1.2977713690461004]
    )


def test_centered_rmsprop_three_steps() -> None:
    # mean a = .5, -.25, .875; v = .5, .75, 2.375; v - a^2 = .25, .6875, 1.609375
    # out = 1/.5 = 2, -1/sqrt(.6875) = -1.206045, 2/sqrt(1.609375) = 1.576527
    module = RMSPropModule(beta=0.5, eps=0.0, centered=True)
    assert scalars(module, [1, -1, 2]) == pytest.approx(
        [2.0, -1.2060453783110545, 1.576526845062869]
    )


def test_adagrad_three_steps() -> None:
    # sums 1, 2, 6 -> 1, -1/sqrt2 = -0.707107, 2/sqrt6 = 0.816497
    module = AdagradModule(eps=0.0)
    assert scalars(module, [1, -1, 2]) == pytest.approx(
        [1.0, -0.7071067811865475, 0.8164965809277261]
    )
    # starting at 1: sums 2, 3, 7 -> 1/sqrt2, -1/sqrt3, 2/sqrt7
    module = AdagradModule(eps=0.0, initial_accumulator_value=1.0)
    assert scalars(module, [1, -1, 2]) == pytest.approx(
        [0.7071067811865475, -0.5773502691896258, 0.7559289460184544]
    )


def test_yogi_three_steps() -> None:
    # b1 = b2 = .5, eps = 0, v0 = 0.
    # t1: v = 0 - .5*sign(0-1)*1 = .5, m = .5 -> .5/sqrt(.5) = 0.707107
    # t2: v = .5 - .5*sign(.5-1)*1 = 1, m = -.25 -> -.25
    # t3: v = 1 - .5*sign(1-4)*4 = 3, m = .875 -> .875/sqrt3 = 0.505181
    module = YogiModule(beta_1=0.5, beta_2=0.5, eps=0.0)
    assert scalars(module, [1, -1, 2]) == pytest.approx(
        [0.7071067811865475, -0.25, 0.5051814855409226]
    )


def test_yogi_second_moment_decreases_additively() -> None:
    # b1 = 0 (m = g), b2 = .5; gradients 2, 1, 1.
    # v = 0 + .5*4 = 2; 2 - .5*1 = 1.5 (v > g^2); 1.5 - .5*1 = 1 (Adam would give 1.25)
    # out = 2/sqrt2 = 1.414214, 1/sqrt(1.5) = 0.816497, 1/1 = 1
    module = YogiModule(beta_1=0.0, beta_2=0.5, eps=0.0)
    assert scalars(module, [2, 1, 1]) == pytest.approx(
        [1.4142135623730951, 0.8164965809277261, 1.0]
    )


def test_yogi_bias_correction() -> None:
    # m_hat as Adam's: 1, -1/3, 1; v = .5, 1, 3 -> v_hat = 1, 4/3, 24/7
    # out = 1, (-1/3)/sqrt(4/3) = -0.288675, sqrt(7/24) = 0.540062
    module = YogiModule(beta_1=0.5, beta_2=0.5, eps=0.0, bias_correction="torch")
    assert scalars(module, [1, -1, 2]) == pytest.approx(
        [1.0, -0.28867513459481287, 0.5400617248673217]
    )


# ---- clipping ---------------------------------------------------------------------------


def two_arrays(dtype: Any = np.float64) -> Vector:
    return Vector({"a": np.array([3.0, 4.0], dtype), "b": np.array([0.3, 0.4], dtype)})


def test_l2_clipping_clips_each_array() -> None:
    out = L2Clipping(max_norm=1.0).run(two_arrays())
    np.testing.assert_allclose(out["a"], [0.6, 0.8])  # norm 5 -> 1
    np.testing.assert_allclose(out["b"], [0.3, 0.4])  # norm .5 is kept
    assert out.norms() == pytest.approx({"a": 1.0, "b": 0.5})


def test_l2_global_clipping_clips_the_whole_vector() -> None:
    grads = two_arrays(np.float32)
    out = L2GlobalClipping(max_norm=1.0).run(grads)
    assert out.specs() == grads.specs()
    assert out.norm() == pytest.approx(1.0, rel=1e-6)
    factor = 1 / math.sqrt(25.25)  # global norm sqrt(9 + 16 + .09 + .16)
    np.testing.assert_allclose(out["a"], [3 * factor, 4 * factor], rtol=1e-6)
    np.testing.assert_allclose(out["b"], [0.3 * factor, 0.4 * factor], rtol=1e-6)
    small = L2GlobalClipping(max_norm=10.0).run(grads)
    assert small.array_equal(grads)


def test_clipping_leaves_zero_gradients_alone() -> None:
    zeros = two_arrays().zeros_like()
    assert L2Clipping(1.0).run(zeros).array_equal(zeros)
    assert L2GlobalClipping(1.0).run(zeros).array_equal(zeros)


# ---- Gaussian noise ---------------------------------------------------------------------


def seeded_noise(std: float, seed: int) -> GaussianNoise:
    module = GaussianNoise(std=std)
    module.seed_locally(np.random.SeedSequence(seed))
    return module


def test_noise_same_local_seed_same_noise_else_os_entropy() -> None:
    grads = two_arrays(np.float32)
    first = seeded_noise(0.1, 7).run(grads)
    assert first.array_equal(seeded_noise(0.1, 7).run(grads))
    assert not first.array_equal(seeded_noise(0.1, 8).run(grads))
    assert first.specs() == grads.specs()
    # unseeded: two modules of the same config draw from OS entropy, never alike
    assert not GaussianNoise(std=0.1).run(grads).array_equal(GaussianNoise(std=0.1).run(grads))


def test_noise_refuses_a_seed_from_its_config() -> None:
    with pytest.raises(ValueError, match=r"seed=3: privacy noise is never seeded from a config"):
        GaussianNoise(std=0.1, seed=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="noise_seed in the client's own config"):
        Optimizer.from_config({"modules": [["gaussian-noise", {"std": 0.1, "seed": 3}]]})


def test_noise_state_round_trip_continues_the_stream() -> None:
    grads = two_arrays()
    module = seeded_noise(1.0, 3)
    module.run(grads)
    state = state_from_bytes(state_to_bytes(module.get_state()))
    expected = [module.run(grads) for _ in range(3)]
    resumed = GaussianNoise(std=1.0)  # the state overrides OS entropy
    resumed.set_state(state)
    for want in expected:
        assert resumed.run(grads).array_equal(want)


def test_noise_state_before_a_draw_keeps_the_local_seed() -> None:
    grads = two_arrays()
    module = seeded_noise(1.0, 5)
    module.set_state(module.get_state())  # {"rng": None}: a client restoring round 0
    assert module.run(grads).array_equal(seeded_noise(1.0, 5).run(grads))


def test_noise_has_the_requested_std() -> None:
    zeros = Vector({"x": np.zeros(200_000)})
    noise = GaussianNoise(std=0.5).run(zeros)["x"]
    assert noise.std() == pytest.approx(0.5, rel=0.01)
    assert abs(noise.mean()) < 0.01
    assert GaussianNoise(std=0.0).run(two_arrays()).array_equal(two_arrays())


# ---- convergence on a convex quadratic -----------------------------------------------------


CONVERGENCE = {
    "momentum": (0.05, {"beta": 0.9}),
    "adam": (["exponential-decay", {"initial": 0.1, "decay_rate": 0.995}], {}),
    "rmsprop": (["exponential-decay", {"initial": 0.05, "decay_rate": 0.995}], {}),
    "adagrad": (0.5, {}),
    "yogi": (["exponential-decay", {"initial": 0.1, "decay_rate": 0.995}], {}),
}


@pytest.mark.parametrize("name", sorted(CONVERGENCE))
def test_minimizes_a_convex_quadratic(name: str) -> None:
    # f(x) = .5 x'Ax - b'x with A SPD, eigenvalues in [1, 10]; minimum at A^-1 b.
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    a = basis @ np.diag(np.linspace(1.0, 10.0, 10)) @ basis.T
    b = rng.normal(size=10)
    optimum = np.linalg.solve(a, b)
    lrate, config = CONVERGENCE[name]
    optimizer = Optimizer(lrate=lrate, modules=[[name, config]])
    model = BareWeights(Vector({"x": np.zeros(10)}))
    for _ in range(1000):
        x = model.get_weights()["x"]
        optimizer.apply(model, Vector({"x": a @ x - b}))
    # within 1e-8 of the optimum (whose norm is about 1.2) after 1000 steps
    assert np.linalg.norm(model.get_weights()["x"] - optimum) < 1e-8
