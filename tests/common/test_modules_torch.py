"""Our modules against ``torch.optim``: same weights after a few steps (float64)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedpipe.common.optim import BareWeights, Optimizer
from fedpipe.common.vector import Vector

torch = pytest.importorskip("torch")

LR = 0.1
STEPS = 6

# (torch optimizer, its kwargs besides lr, our Optimizer kwargs besides lrate)
CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "sgd-momentum": ("SGD", {"momentum": 0.9}, {"modules": [["momentum", {"beta": 0.9}]]}),
    "sgd-dampening": (
        "SGD",
        {"momentum": 0.8, "dampening": 0.3},
        {"modules": [["momentum", {"beta": 0.8, "dampening": 0.3}]]},
    ),
    "sgd-nesterov": (
        "SGD",
        {"momentum": 0.9, "nesterov": True},
        {"modules": [["momentum", {"beta": 0.9, "nesterov": True}]]},
    ),
    "sgd-weight-decay": (
        "SGD",
        {"momentum": 0.5, "weight_decay": 0.1},
        {"regularizers": [["ridge", {"alpha": 0.05}]], "modules": [["momentum", {"beta": 0.5}]]},
    ),
    "adam": ("Adam", {}, {"modules": ["adam"]}),
    "adam-options": (
        "Adam",
        {"betas": (0.8, 0.9), "eps": 1e-3},
        {"modules": [["adam", {"beta_1": 0.8, "beta_2": 0.9, "eps": 1e-3}]]},
    ),
    "adam-amsgrad": (
        "Adam",
        {"betas": (0.5, 0.6), "amsgrad": True},
        {"modules": [["adam", {"beta_1": 0.5, "beta_2": 0.6, "amsgrad": True}]]},
    ),
    "adam-weight-decay": (
        "Adam",
        {"weight_decay": 0.1},
        {"regularizers": [["ridge", {"alpha": 0.05}]], "modules": ["adam"]},
    ),
    "adamw": ("AdamW", {"weight_decay": 0.1}, {"w_decay": 0.1, "modules": ["adam"]}),
    "adamw-amsgrad": (
        "AdamW",
        {"weight_decay": 0.3, "amsgrad": True, "betas": (0.5, 0.6)},
        {"w_decay": 0.3, "modules": [["adam", {"beta_1": 0.5, "beta_2": 0.6, "amsgrad": True}]]},
    ),
    "rmsprop": ("RMSprop", {}, {"modules": ["rmsprop"]}),
    "rmsprop-centered": (
        "RMSprop",
        {"alpha": 0.9, "eps": 1e-4, "centered": True},
        {"modules": [["rmsprop", {"beta": 0.9, "eps": 1e-4, "centered": True}]]},
    ),
    "rmsprop-momentum": (
        "RMSprop",
        {"momentum": 0.7, "centered": True, "weight_decay": 0.2},
        {
            "regularizers": [["ridge", {"alpha": 0.1}]],
            "modules": [["rmsprop", {"centered": True}], ["momentum", {"beta": 0.7}]],
        },
    ),
    "adagrad": ("Adagrad", {}, {"modules": ["adagrad"]}),
    "adagrad-options": (
        "Adagrad",
        {"initial_accumulator_value": 0.5, "eps": 1e-3, "weight_decay": 0.1},
        {
            "regularizers": [["ridge", {"alpha": 0.05}]],
            "modules": [["adagrad", {"initial_accumulator_value": 0.5, "eps": 1e-3}]],
        },
    ),
    "adagrad-lr-decay": (
        "Adagrad",
        {"lr_decay": 0.3},
        {
            "modules": ["adagrad"],
            "lrate": ["inverse-time-decay", {"initial": LR, "decay_rate": 0.3}],
        },
    ),
}


def problem() -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """A quadratic with noisy gradients: A (SPD), b, the start point, per-step noise."""
    rng = np.random.default_rng(42)
    m = rng.normal(size=(6, 6))
    a = m @ m.T / 6 + np.eye(6)
    return a, rng.normal(size=6), rng.normal(size=6), [rng.normal(size=6) for _ in range(STEPS)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_torch_optim(case: str) -> None:
    torch_name, torch_kwargs, our_kwargs = CASES[case]
    a, b, start, noise = problem()

    param = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    reference = getattr(torch.optim, torch_name)([param], lr=LR, **torch_kwargs)
    ours = Optimizer(**{"lrate": LR, **our_kwargs})
    model = BareWeights(Vector({"x": start.copy()}))
    for step in range(STEPS):
        x = param.detach().numpy()
        param.grad = torch.tensor(a @ x - b + noise[step], dtype=torch.float64)
        reference.step()
        x = model.get_weights()["x"]
        ours.apply(model, Vector({"x": a @ x - b + noise[step]}))
        np.testing.assert_allclose(
            model.get_weights()["x"], param.detach().numpy(), rtol=1e-12, atol=1e-14
        )
    assert not np.allclose(model.get_weights()["x"], start)  # the weights did move
