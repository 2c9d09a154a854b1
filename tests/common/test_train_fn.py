"""A client's own training function: the update is start - end, the client modules act on it
once, lrate does not scale it, and setups it cannot honour are refused."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedpipe.common.data import load_builtin
from fedpipe.common.plugins import PluginError
from fedpipe.common.train_fn import load_train_fn, run_train_fn
from fedpipe.common.training import LocalTrainer, RunSetup, round_seed
from fedpipe.common.vector import Vector

torch = pytest.importorskip("torch")
from fedpipe.common.data.torch_loaders import LoaderData  # noqa: E402
from tests.common import torch_training  # noqa: E402

MODEL = {"name": "tests.common.torch_models:build", "config": {"hidden": 8}}


def setup(optimizer: dict[str, Any], model: dict[str, Any] = MODEL) -> RunSetup:
    return RunSetup(
        model=model,
        client_optimizer=optimizer,
        aggregator="sum",
        metrics=["loss"],
        training={"epochs": 1, "batch_size": 16},
    )


def digits_loader() -> LoaderData:
    data = torch_training.NoisyDigits(load_builtin("digits"))
    return LoaderData(torch.utils.data.DataLoader(data, batch_size=64))


def shifted_round(optimizer: dict[str, Any], round_number: int) -> tuple[Vector, Any]:
    """One round of ``shift_train`` (start - end = round_number everywhere): the update."""
    trainer = LocalTrainer(setup(optimizer), train_fn=torch_training.shift_train)
    weights = trainer.model.get_weights()
    result = trainer.train(digits_loader(), weights, {}, client="c", round_number=round_number)
    return result.partial.vector("sum").to_numpy(), result


def test_without_modules_the_update_is_start_minus_end_whatever_the_lrate() -> None:
    update, result = shifted_round({"lrate": 0.5}, round_number=3)
    for array in update.coefs.values():  # float32 weights: start - (start - 3) rounds
        np.testing.assert_allclose(array, 3.0, rtol=1e-6)
    # n_samples and the loss come from the train_fn; the steps default to the loader's batches
    assert (result.n_samples, result.loss_sum, result.mean_loss) == (7, 3.5, 0.5)
    assert result.n_steps == int(np.ceil(1797 / 64))


def test_client_modules_see_exactly_the_update_once() -> None:
    clipping = {"lrate": 0.5, "modules": [["l2-global-clipping", {"max_norm": 1.0}]]}
    update, _ = shifted_round(clipping, round_number=3)
    n_params = sum(a.size for a in update.coefs.values())
    assert update.norm() == pytest.approx(1.0, rel=1e-6)
    # clip(start - end) = 3 * (1 / (3 sqrt(P))): the clipping module ran once, on 3s
    for array in update.coefs.values():
        np.testing.assert_allclose(array, 1.0 / np.sqrt(n_params), rtol=1e-6)
    per_layer = {"lrate": 1.0, "modules": [["l2-clipping", {"max_norm": 0.5}]]}
    update, _ = shifted_round(per_layer, round_number=2)
    assert all(n == pytest.approx(0.5, rel=1e-6) for n in update.norms().values())


def test_momentum_carries_across_rounds_of_a_train_fn() -> None:
    trainer = LocalTrainer(
        setup({"modules": [["momentum", {"beta": 0.5}]]}), train_fn=torch_training.shift_train
    )
    weights, loader = trainer.model.get_weights(), digits_loader()
    updates = []
    for round_number in (1, 2):
        result = trainer.train(loader, weights, {}, client="c", round_number=round_number)
        updates.append(result.partial.vector("sum").to_numpy())
    # momentum: m1 = 1, m2 = 0.5 * 1 + 2 = 2.5
    for first, second in zip(updates[0].coefs.values(), updates[1].coefs.values(), strict=True):
        np.testing.assert_allclose(first, 1.0, rtol=1e-6)
        np.testing.assert_allclose(second, 2.5, rtol=1e-6)


def test_a_torch_sgd_train_fn_gives_the_update_of_fedpipes_own_loop() -> None:
    """torch's SGD(lr=0.1, momentum=0.9) in a train_fn and fedpipe's loop with lrate 0.1 and
    a momentum module take the same steps on the same batches: same update, same loss."""
    train, _ = load_builtin("digits").split(0.25, seed=0)
    results = []
    for train_fn in (None, torch_training.sgd_train):
        loader, _ = torch_training.loaders(train)  # same shuffles, same noise
        local = LocalTrainer(setup({"lrate": 0.1, "modules": ["momentum"]}), train_fn=train_fn)
        weights = local.model.get_weights()
        results.append(local.train(LoaderData(loader), weights, {}, client="c", round_number=1))
    ours, theirs = results
    assert ours.partial.vector("sum").allclose(theirs.partial.vector("sum"), rtol=1e-4, atol=1e-6)
    assert (ours.n_samples, ours.n_steps) == (theirs.n_samples, theirs.n_steps) == (449, 29)
    assert ours.mean_loss == pytest.approx(theirs.mean_loss, rel=1e-5)


@pytest.mark.parametrize(
    ("optimizer", "model", "message"),
    [
        ({"regularizers": ["fedprox"]}, MODEL, "regularizer 'fedprox'"),
        ({"w_decay": 0.01}, MODEL, "w_decay=0.01"),
        ({"modules": ["scaffold-client"]}, MODEL, "module 'scaffold-client'"),
        (
            {},
            {"name": "softmax-regression", "config": {"n_features": 64, "n_classes": 10}},
            "model 'softmax-regression' is a SoftmaxRegression, not a TorchModel",
        ),
    ],
)
def test_setups_a_train_fn_cannot_honour_are_refused(
    optimizer: dict[str, Any], model: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        LocalTrainer(setup(optimizer, model), train_fn=torch_training.shift_train)


def test_train_fn_on_a_fedpipe_dataset_says_to_name_loaders() -> None:
    trainer = LocalTrainer(setup({}), train_fn=torch_training.shift_train)
    with pytest.raises(ValueError, match="name a loaders factory"):
        trainer.train(load_builtin("digits"), trainer.model.get_weights(), {}, client="c",
                      round_number=1)  # fmt: skip


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (5, "returned 5; expected (n_samples: int, metrics: dict with a 'loss')"),
        ((0, {"loss": 1.0}), "n_samples=0"),
        ((5, {"accuracy": 1.0}), "returned metrics {'accuracy': 1.0}"),
        ((5, {"loss": "high"}), "non-numeric metrics"),
        ((5, {"loss": float("nan")}), "returned loss nan; expected a finite one"),
    ],
)
def test_a_malformed_train_fn_return_is_a_clear_error(returned: Any, message: str) -> None:
    def train(module: Any, loader: Any, round_config: dict[str, Any]) -> Any:
        return returned

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_train_fn(train, None, None, {})


def test_bad_train_fn_import_paths_are_one_line_errors() -> None:
    with pytest.raises(PluginError) as missing:
        load_train_fn("no_such_pkg_xyz.train:train")
    assert str(missing.value) == (
        "train_fn 'no_such_pkg_xyz.train:train': cannot import the module "
        "'no_such_pkg_xyz.train' (ModuleNotFoundError: No module named 'no_such_pkg_xyz')"
    )
    with pytest.raises(PluginError, match=r"module 'tests\.common\.torch_training' has no attr"):
        load_train_fn("tests.common.torch_training:missing")
    with pytest.raises(PluginError, match="is a str, not callable"):
        load_train_fn("tests.common.torch_training:__doc__")
    assert load_train_fn("tests.common.torch_training:sgd_train") is torch_training.sgd_train


def test_train_fn_gets_the_module_in_training_mode_and_a_plain_round_config() -> None:
    seen: dict[str, Any] = {}

    def record(module: Any, loader: Any, round_config: dict[str, Any]) -> tuple[int, Any]:
        seen.update(training=module.training, loader=loader, config=round_config)
        return 10, {"loss": 1.0, "n_steps": 4, "accuracy": 0.5}

    trainer = LocalTrainer(setup({}), train_fn=record)
    data, weights = digits_loader(), trainer.model.get_weights()
    trainer.evaluate(data, weights)  # leaves the module in eval mode
    result = trainer.train(data, weights, {}, client="c", round_number=2)
    assert seen["training"] is True and seen["loader"] is data.loader
    assert seen["config"] == {
        "round": 2,
        "client": "c",
        "seed": round_seed(0, "c", 2),
        "epochs": 1,
        "max_steps": None,
        "batch_size": 16,
    }
    assert (result.n_samples, result.n_steps, result.n_samples_seen) == (10, 4, 10)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loaders_and_train_fn_on_a_cuda_model() -> None:
    """CPU batches from the loader reach the model on the GPU; the update stays there."""
    from tests.common.torch_models import build

    data = digits_loader()
    for train_fn in (None, torch_training.shift_train):
        model = build(hidden=8)
        model.to("cuda")
        clipping = {"lrate": 0.1, "modules": [["l2-global-clipping", {"max_norm": 1.0}]]}
        trainer = LocalTrainer(setup(clipping), model=model, train_fn=train_fn)
        result = trainer.train(data, model.get_weights(), {}, client="c", round_number=1)
        update = result.partial.vector("sum")
        assert all(t.device.type == "cuda" for t in update.coefs.values())
        assert update.norm() <= 1.0 + 1e-5
        assert trainer.evaluate(data, model.get_weights()).n_samples == 1797
