"""FedAdam, FedYogi and FedAdagrad against the formulas of Reddi et al. 2021 (Alg. 2) and of
Flower's strategies, each written here as a plain numpy loop, over 20 rounds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fedpipe.common.modules import AdagradModule, AdamModule, YogiModule
from fedpipe.common.optim import BareWeights, Optimizer
from fedpipe.common.vector import Vector

ROUNDS = 20
ETA, TAU, BETA_1, BETA_2 = 0.1, 1e-3, 0.9, 0.99

Clients = Callable[[np.ndarray, int], np.ndarray]


def clients_mean() -> Clients:
    """The clients' averaged model after local training from ``x`` in round ``t``: a few
    noisy gradient steps on a quadratic, so that the trajectory depends on the server."""
    rng = np.random.default_rng(7)
    a = np.diag(np.linspace(0.5, 3.0, 6))
    b = rng.normal(size=6)
    noise = rng.normal(scale=0.3, size=(ROUNDS, 6))

    def train(x: np.ndarray, t: int) -> np.ndarray:
        y = x.copy()
        for _ in range(3):
            y = y - 0.05 * (a @ y - b + noise[t])
        return y

    return train


def reference(rule: str, v_init: float, beta_1: float, correction: str) -> list[np.ndarray]:
    """``x_{t+1} = x_t + eta_t m_t / (sqrt(v_t) + tau)``, ``Delta_t`` the clients' mean minus
    ``x_t``; ``correction="flower"`` is flwr >= 1.13's FedAdam step size, its rounds
    counted from 1: ``eta * sqrt(1 - b2^(round+1)) / (1 - b1^(round+1))``."""
    train = clients_mean()
    x = np.linspace(-1.0, 1.0, 6)
    m, v = np.zeros(6), np.full(6, v_init)
    trajectory = []
    for t in range(ROUNDS):
        delta = train(x, t) - x
        m = beta_1 * m + (1 - beta_1) * delta
        if rule == "adam":
            v = BETA_2 * v + (1 - BETA_2) * delta * delta
        elif rule == "yogi":
            v = v - (1 - BETA_2) * delta * delta * np.sign(v - delta * delta)
        else:
            v = v + delta * delta
        eta = ETA
        if correction == "flower":
            server_round = t + 1
            eta = (
                ETA * np.sqrt(1 - BETA_2 ** (server_round + 1)) / (1 - BETA_1 ** (server_round + 1))
            )
        x = x + eta * m / (np.sqrt(v) + TAU)
        trajectory.append(x)
    return trajectory


def fedpipe_run(module: list[Any]) -> list[np.ndarray]:
    """The server optimizer with the clients' mean as its pseudo-gradient ``x - mean``."""
    train = clients_mean()
    optimizer = Optimizer(lrate=ETA, modules=[module])
    model = BareWeights(Vector({"x": np.linspace(-1.0, 1.0, 6)}))
    trajectory = []
    for t in range(ROUNDS):
        x = model.get_weights()["x"]
        optimizer.apply(model, Vector({"x": x - train(x, t)}))
        trajectory.append(model.get_weights(copy=True)["x"])
    return trajectory


PAPER = {"eps": TAU, "initial_accumulator_value": TAU**2}
ADAM = {"beta_1": BETA_1, "beta_2": BETA_2}
CASES = {
    # Reddi et al. 2021, Alg. 2: v_{-1} = tau^2, no bias correction
    "paper-fedadam": (
        ("adam", TAU**2, BETA_1, "none"),
        {**ADAM, **PAPER, "bias_correction": "none"},
    ),
    "paper-fedyogi": (("yogi", TAU**2, BETA_1, "none"), {**ADAM, **PAPER}),
    "paper-fedadagrad": (("adagrad", TAU**2, BETA_1, "none"), {"beta_1": BETA_1, **PAPER}),
    # Flower: v_0 = 0; FedAdam's step size bias-corrected since flwr 1.13, not before
    "flower-fedadam": (
        ("adam", 0.0, BETA_1, "flower"),
        {**ADAM, "eps": TAU, "bias_correction": "flower"},
    ),
    "flower-1.12-fedadam": (
        ("adam", 0.0, BETA_1, "none"),
        {**ADAM, "eps": TAU, "bias_correction": "none"},
    ),
    "flower-fedyogi": (("yogi", 0.0, BETA_1, "none"), {**ADAM, "eps": TAU}),
    "flower-fedadagrad": (("adagrad", 0.0, 0.0, "none"), {"eps": TAU}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_server_optimizer_matches_the_reference(case: str) -> None:
    (rule, v_init, beta_1, correction), config = CASES[case]
    expected = reference(rule, v_init, beta_1, correction)
    got = fedpipe_run([rule, config])
    for t in range(ROUNDS):
        np.testing.assert_allclose(got[t], expected[t], rtol=0, atol=1e-12, err_msg=f"round {t}")
    assert np.abs(expected[-1] - np.linspace(-1.0, 1.0, 6)).max() > 0.1  # it did move


def test_torch_bias_correction_is_not_the_papers() -> None:
    # The default (torch's Adam) moves differently: the option is what reproduces the paper.
    paper = reference("adam", 0.0, BETA_1, "none")[-1]
    torch_like = fedpipe_run(["adam", {**ADAM, "eps": TAU}])[-1]
    assert np.abs(torch_like - paper).max() > 1e-2


def test_flower_bias_correction_first_step() -> None:
    # g = -1, b1 = b2 = .5, eps = 0: m = -.5, v = .5; Flower's first round uses exponent 2:
    # sqrt(1 - .25) / (1 - .25) = 1/sqrt(.75); out = -.5/sqrt(.5)/sqrt(.75) = -0.816497
    module = AdamModule(beta_1=0.5, beta_2=0.5, eps=0.0, bias_correction="flower")
    out = module.run(Vector({"x": np.array([-1.0])}))["x"][0]
    assert out == pytest.approx(-0.816496580927726, rel=1e-15)


def test_adagrad_momentum_three_steps() -> None:
    # b1 = .5, eps = 0, gradients 1, -1, 2: m = .5, -.25, .875; sums 1, 2, 6
    # out = .5, -.25/sqrt2 = -0.176777, .875/sqrt6 = 0.357217
    module = AdagradModule(eps=0.0, beta_1=0.5)
    outs = [module.run(Vector({"x": np.array([g])}))["x"][0] for g in (1.0, -1.0, 2.0)]
    assert outs == pytest.approx([0.5, -0.17677669529663687, 0.3572172541558802], rel=1e-15)
    assert module.get_state()["m"]["x"][0] == 0.875


def test_yogi_starts_from_its_initial_accumulator() -> None:
    # b1 = 0, b2 = .5, eps = 0, v_0 = 4, gradients 1, 3:
    # v = 4 - .5*sign(4-1)*1 = 3.5 -> 1/sqrt(3.5); v = 3.5 - .5*sign(3.5-9)*9 = 8 -> 3/sqrt8
    module = YogiModule(beta_1=0.0, beta_2=0.5, eps=0.0, initial_accumulator_value=4.0)
    first = module.run(Vector({"x": np.array([1.0])}))["x"][0]
    assert module.get_state()["v"]["x"][0] == 3.5
    second = module.run(Vector({"x": np.array([3.0])}))["x"][0]
    assert module.get_state()["v"]["x"][0] == 8.0
    assert [first, second] == pytest.approx([1 / np.sqrt(3.5), 3 / np.sqrt(8.0)], rel=1e-15)


@pytest.mark.parametrize("module", ["adam", "yogi"])
def test_unknown_bias_correction_is_rejected(module: str) -> None:
    with pytest.raises(
        ValueError, match=rf"{module} bias_correction=True; expected one of 'torch'"
    ):
        (AdamModule if module == "adam" else YogiModule)(bias_correction=True)  # type: ignore[arg-type]
