"""Sample-level DP-SGD: per-sample gradients equal a per-sample loop, clipping bounds each,
the noise has the calibrated std, the accountant equals dp-accounting's own value, a digits
run with DP-SGD learns and reports ε, and the server cannot switch it off."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp

from fedpipe.common.config import DpSgdConfig, SimulationConfig, TrainingConfig
from fedpipe.common.data import Dataset
from fedpipe.common.models import Model
from fedpipe.common.models.linear import LogisticRegression, SoftmaxRegression
from fedpipe.common.models.mlp import MLP
from fedpipe.common.optim import Optimizer
from fedpipe.common.privacy.dp_sgd import BudgetExceeded, DpSgd, clip_samples, sample_norms
from fedpipe.common.training import LocalTrainer, RunSetup
from fedpipe.common.vector import Vector
from fedpipe.server.simulation import client_datasets, simulate

RNG = np.random.default_rng(0)
X = RNG.standard_normal((9, 6)).astype(np.float32)
LABELS = RNG.integers(0, 3, 9)

NUMPY_MODELS: list[tuple[Model, np.ndarray]] = [
    (SoftmaxRegression(6, 3, seed=1), LABELS),
    (LogisticRegression(6, seed=1), LABELS % 2),
    (MLP(6, hidden=[5, 4], n_classes=3, seed=1), LABELS),
    (MLP(6, hidden=[5], task="regression", n_outputs=2, seed=1), X[:, :2]),
]


def loop_reference(model: Model, x: Any, y: Any) -> dict[str, np.ndarray]:
    """Each sample's gradient from a batch of that sample alone."""
    rows = [model.compute_batch_gradients(x[i : i + 1], y[i : i + 1])[0] for i in range(len(x))]
    return {n: np.stack([np.asarray(r.to_numpy().coefs[n]) for r in rows]) for n in rows[0]}


@pytest.mark.parametrize("model, y", NUMPY_MODELS, ids=lambda m: getattr(m, "name", ""))
def test_numpy_sample_gradients_equal_a_per_sample_loop(model: Model, y: np.ndarray) -> None:
    grads, loss = model.compute_sample_gradients(X, y)
    reference = loop_reference(model, X, y)
    for name, expected in reference.items():
        np.testing.assert_allclose(grads.coefs[name], expected, rtol=1e-5, atol=1e-6)
    batch, batch_loss = model.compute_batch_gradients(X, y)
    mean = grads.apply(lambda a: a.mean(0))  # the batch gradient is their mean
    assert mean.allclose(batch, rtol=1e-5, atol=1e-6)
    assert float(loss) == pytest.approx(float(batch_loss))


def test_torch_sample_gradients_equal_a_per_sample_loop() -> None:
    torch = pytest.importorskip("torch")
    from fedpipe.common.models.torch_adapter import TorchModel

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()
    net[0].bias.requires_grad_(False)  # frozen parameters get no gradient
    model = TorchModel(net, torch.nn.CrossEntropyLoss())
    x = X.astype(np.float64)
    grads, loss = model.compute_sample_gradients(x, LABELS)
    assert sorted(grads.coefs) == ["0.weight", "2.bias", "2.weight"]
    for name, expected in loop_reference(model, x, LABELS).items():
        np.testing.assert_allclose(grads.coefs[name].numpy(), expected, rtol=1e-10)
    assert float(loss) == pytest.approx(float(model.compute_batch_gradients(x, LABELS)[1]))


def test_torch_batch_norm_has_no_per_sample_gradient() -> None:
    torch = pytest.importorskip("torch")
    from fedpipe.common.models.torch_adapter import TorchModel

    net = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="module '1' is a batch norm"):
        TorchModel(net, torch.nn.CrossEntropyLoss()).compute_sample_gradients(X, LABELS % 4)


def test_clipping_bounds_every_sample_and_keeps_small_ones() -> None:
    per_sample = Vector({"a": RNG.standard_normal((50, 4, 3)), "b": RNG.standard_normal((50, 2))})
    per_sample = per_sample.apply(
        lambda a: a * np.linspace(0.01, 3, 50).reshape(-1, *[1] * (a.ndim - 1))
    )
    norms = sample_norms(per_sample)
    clipped = clip_samples(per_sample, 1.0)
    after = sample_norms(clipped)
    assert after.max() <= 1.0 + 1e-12 and (norms > 1.0).sum() > 10
    small = norms <= 1.0
    np.testing.assert_allclose(after[small], norms[small])  # below the clip: untouched
    np.testing.assert_allclose(after[~small], 1.0)
    direction = clipped.coefs["b"][-1] / per_sample.coefs["b"][-1]
    np.testing.assert_allclose(direction, direction[0])  # scaled, not bent


def test_noise_std_is_noise_multiplier_times_clip_over_expected_batch() -> None:
    config = DpSgdConfig(clip=0.5, noise_multiplier=2.0)
    dp = DpSgd(config, np.random.default_rng(1))
    model = SoftmaxRegression(200, 500, dtype="float64")  # 100,500 coordinates
    model.set_weights(model.get_weights().zeros_like())
    x, y = np.zeros((3, 200)), np.zeros(3, dtype=int)  # zero inputs: kernel gradients are 0
    gradients, _ = dp.gradients(model, x, y, expected_batch=4.0)
    kernel = gradients.coefs["kernel"]
    assert kernel.std() == pytest.approx(2.0 * 0.5 / 4.0, rel=0.01)
    assert abs(kernel.mean()) < 0.01 * kernel.std()


def library_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    """dp-accounting's own ε for ``steps`` Poisson-sampled Gaussian steps."""
    accountant = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    gaussian = dp_accounting.GaussianDpEvent(sigma)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, gaussian), steps)
    return float(accountant.get_epsilon(delta))


def test_reported_epsilon_equals_dp_accountings_own() -> None:
    """The DP-SGD MNIST setting of Abadi et al.: q = 256/60000, sigma = 1.1, 60 epochs."""
    dp = DpSgd(DpSgdConfig(clip=1.0, noise_multiplier=1.1, delta=1e-5), RNG)
    q, steps = dp.plan(60000, TrainingConfig(batch_size=256, epochs=60))
    assert (q, steps) == (256 / 60000, 60 * 235)
    dp.accountant.spend(dp.step_event(q), steps)
    assert dp.epsilon() == library_epsilon(q, 1.1, steps, 1e-5)
    assert 2.5 < dp.epsilon() < 3.5  # RDP's figure there (Abadi et al.'s moments: 2.55)
    # and the steps a round of training runs: 2 epochs of ceil(9 / 3) steps at q = 1/3
    dp = DpSgd(DpSgdConfig(clip=1.0, noise_multiplier=1.1, delta=1e-5), RNG)
    work = dp.train(
        SoftmaxRegression(6, 3),
        Optimizer(lrate=0.1),
        Dataset(X, LABELS),
        TrainingConfig(batch_size=3, epochs=2),
    )
    assert work.n_steps == 6
    assert dp.epsilon() == library_epsilon(1 / 3, 1.1, 6, 1e-5)


def digits_config(tmp_path: Path, **extra: Any) -> SimulationConfig:
    return SimulationConfig.model_validate(
        {
            "n_clients": 4,
            "noise_seed": 3,
            "partition": {"scheme": "iid", "seed": 2},
            "server": {
                "rounds": 5,
                "min_clients": 4,
                "client_optimizer": {"lrate": 0.3},
                "training": {"epochs": 1, "batch_size": 32},
                "output_dir": str(tmp_path),
                "checkpoint": False,
            },
            **extra,
        }
    )


def test_digits_run_with_dp_sgd_learns_and_reports_epsilon(tmp_path: Path) -> None:
    sim = digits_config(tmp_path, dp_sgd={"clip": 1.0, "noise_multiplier": 1.0, "delta": 1e-5})
    summary = simulate(sim, overwrite=True)
    accuracy = summary.history[-1]["accuracy"]
    assert accuracy > 0.6  # chance is 0.1 on 10 classes; measured 0.75 (0.88 without DP)
    epsilons = [r["sample_epsilon_max"] for r in summary.history]
    # each client's ε is its own steps': rounds x ceil(n / 32) steps at q = 32 / n
    sizes = [len(train) for _, train, _ in client_datasets(sim)]
    for rounds, epsilon in enumerate(epsilons, start=1):
        expected = max(library_epsilon(32 / n, 1.0, rounds * -(-n // 32), 1e-5) for n in sizes)
        assert epsilon == pytest.approx(expected, rel=1e-12)
    assert json.loads((tmp_path / "summary.json").read_text())["sample_epsilon_max"] == epsilons[-1]
    lines = [json.loads(line) for line in (tmp_path / "clients.jsonl").read_text().splitlines()]
    assert max(line["sample_epsilon"] for line in lines) == epsilons[-1]


def test_budget_refuses_a_round_that_would_exceed_max_epsilon() -> None:
    budget = library_epsilon(1 / 3, 2.0, 9, 1e-5) * 1.001  # three rounds of 3 steps fit
    dp = DpSgd(DpSgdConfig(clip=1.0, noise_multiplier=2.0, max_epsilon=budget), RNG)
    model, optimizer, data = SoftmaxRegression(6, 3), Optimizer(lrate=0.1), Dataset(X, LABELS)
    training = TrainingConfig(batch_size=3, epochs=1)
    for _ in range(3):
        dp.train(model, optimizer, data, training)
    weights = model.get_weights()
    with pytest.raises(BudgetExceeded, match=r"3 steps \(q=0.3333\) would bring ε to .* > max_"):
        dp.train(model, optimizer, data, training)
    assert dp.epsilon() == library_epsilon(1 / 3, 2.0, 9, 1e-5)  # the refusal is not counted
    assert model.get_weights().array_equal(weights)  # nor trained


def test_the_server_cannot_turn_dp_sgd_off_or_weaken_it() -> None:
    """The settings are the client's: the run setup (all the server sends) has no say."""
    setup = RunSetup(
        model={"name": "softmax-regression", "config": {"n_features": 6, "n_classes": 3}},
        client_optimizer={"lrate": 0.1},
        aggregator="averaging",
        metrics=["loss"],
        training={"batch_size": 3},
    )
    config = DpSgdConfig(clip=0.7, noise_multiplier=1.3)
    trainer = LocalTrainer(setup, client="a", dp_sgd=config)
    assert trainer.dp_sgd is not None and trainer.dp_sgd.config == config
    with pytest.raises(ValueError, match="dp_sgd"):
        LocalTrainer(RunSetup.from_data({**setup.to_data(), "training": {"dp_sgd": {"clip": 1e9}}}))
    weights = trainer.model.get_weights()
    result = trainer.train(Dataset(X, LABELS), weights, {}, client="a", round_number=1)
    assert result.sample_epsilon == trainer.dp_sgd.epsilon() > 0


def test_dp_sgd_refused_where_it_cannot_be_honoured() -> None:
    with pytest.raises(ValueError, match="dp_sgd draws Poisson batches"):
        SimulationConfig.model_validate(
            {"loaders": "pkg.mod:loaders", "dp_sgd": {"clip": 1.0, "noise_multiplier": 1.0}}
        )
    with pytest.raises(ValueError, match="noise_multiplier"):
        DpSgdConfig.model_validate({"clip": 1.0, "noise_multiplier": 0.0})


def test_the_documented_dp_sgd_section_is_valid() -> None:
    text = (Path(__file__).parents[2] / "docs" / "privacy.md").read_text()
    block = text.split("# client.toml (or the top level of a simulation config)\n")[1]
    section = tomllib.loads(block.split("```")[0])["dp_sgd"]
    assert DpSgdConfig.model_validate(section).max_epsilon == 8.0


def test_the_reply_carries_sample_epsilon_over_the_wire() -> None:
    from fedpipe.common.records import train_reply_parts, train_result_from
    from fedpipe.common.summable import Summable
    from fedpipe.common.training import TrainResult

    result = TrainResult(Summable({"n": 1}), {}, 9, 3, 1.5, 9, 0.1, sample_epsilon=2.25)
    assert train_result_from(*train_reply_parts(result)).sample_epsilon == 2.25
    result.sample_epsilon = None
    info, payload = train_reply_parts(result)
    assert "sample_epsilon" not in info and train_result_from(info, payload).sample_epsilon is None
