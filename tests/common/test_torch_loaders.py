"""A client's torch DataLoaders: fedpipe's loop over their batches, evaluation over them,
and factories named by import path (errors are one line)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedpipe.cli import main
from fedpipe.common.data import Dataset, load_builtin
from fedpipe.common.outcome import ExitCode
from fedpipe.common.plugins import PluginError
from fedpipe.common.training import LocalTrainer, RunSetup

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader, IterableDataset  # noqa: E402

from fedpipe.common.data.torch_loaders import LoaderData, load_loaders  # noqa: E402
from tests.common import torch_training  # noqa: E402

FACTORY = "tests.common.torch_training:loaders"


def trainer(**training: Any) -> LocalTrainer:
    return LocalTrainer(
        RunSetup(
            model={"name": "tests.common.torch_models:build", "config": {"hidden": 8}},
            client_optimizer={"lrate": 0.1},
            aggregator="averaging",
            metrics=["accuracy", "loss"],
            training={"batch_size": 1000, **training},  # the loader's 16 wins
        )
    )


def digits_loaders() -> tuple[LoaderData, LoaderData | None]:
    train, test = load_builtin("digits").split(0.8, seed=0)
    return load_loaders(FACTORY, train, test)


@pytest.mark.parametrize(("epochs", "max_steps", "steps"), [(2, None, 2 * 90), (2, 100, 100)])
def test_fedpipes_loop_takes_the_loaders_batches(
    epochs: int, max_steps: int | None, steps: int
) -> None:
    train, _ = digits_loaders()
    assert len(train) == 1437 and len(train.loader) == 90  # samples, batches of 16
    local = trainer(epochs=epochs, max_steps=max_steps)
    result = local.train(train, local.model.get_weights(), {}, client="c", round_number=1)
    assert (result.n_samples, result.n_steps) == (1437, steps)
    full_epochs, rest = divmod(steps, 90)
    assert result.n_samples_seen == full_epochs * 1437 + rest * 16
    assert 0 < result.mean_loss < 2.4  # ln(10) = 2.30 at the start: it learns


def test_evaluation_over_a_loader_equals_evaluation_over_the_dataset() -> None:
    _, test = digits_loaders()
    assert test is not None
    local = trainer()
    weights = local.model.get_weights()
    test_set = load_builtin("digits").split(0.8, seed=0)[1]
    over_loader = local.evaluate(test, weights)
    over_dataset = local.evaluate(test_set, weights)
    assert over_loader.n_samples == over_dataset.n_samples == 360
    assert over_loader.metrics["accuracy"].fields == over_dataset.metrics["accuracy"].fields
    assert over_loader.metrics["loss"].number("loss_sum") == pytest.approx(
        over_dataset.metrics["loss"].number("loss_sum"), rel=1e-5
    )


class Endless(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    def __iter__(self) -> Any:
        yield torch.zeros(64), torch.tensor(0)


def test_loaders_factory_errors_are_one_line() -> None:
    with pytest.raises(PluginError) as missing:
        load_loaders("no_such_pkg_xyz:loaders")
    assert str(missing.value) == (
        "loaders 'no_such_pkg_xyz:loaders': cannot import the module 'no_such_pkg_xyz' "
        "(ModuleNotFoundError: No module named 'no_such_pkg_xyz')"
    )
    with pytest.raises(PluginError, match="is a str, not callable"):
        load_loaders("tests.common.torch_training:__doc__")
    digits = load_builtin("digits")
    with pytest.raises(PluginError, match=r"returned NoisyDigits .*expected a torch DataLoader"):
        load_loaders("tests.common.torch_training:NoisyDigits", digits)
    with pytest.raises(ValueError, match="its dataset has no len"):
        LoaderData(DataLoader(Endless()))


def test_a_batch_that_is_not_a_pair_is_named() -> None:
    dicts = [{"x": np.zeros(64, np.float32), "y": 0}] * 4
    data = LoaderData(DataLoader(dicts, batch_size=2), "train loader of 'mypkg:loaders'")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'mypkg:loaders' yields a dict; expected \\(inputs, "):
        data.first_batch()


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            ["loaders=no_such_pkg_xyz:loaders"],
            "loaders 'no_such_pkg_xyz:loaders': cannot import the module 'no_such_pkg_xyz' "
            "(ModuleNotFoundError: No module named 'no_such_pkg_xyz')",
        ),
        (
            [f"loaders={FACTORY}", "train_fn=tests.common.torch_training:nope"],
            "train_fn 'tests.common.torch_training:nope': module 'tests.common.torch_training' "
            "has no attribute 'nope'",
        ),
        (
            ["train_fn=tests.common.torch_training:sgd_train"],
            "train_fn='tests.common.torch_training:sgd_train' trains on a torch DataLoader: "
            "set 'loaders' too",
        ),
    ],
)
def test_client_command_reports_bad_import_paths_in_one_line(
    sets: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["client", "--server", "127.0.0.1:1", "--dataset", "digits", "--name", "c"]
    code = main([*args, *(a for s in sets for a in ("--set", s))])
    assert code == ExitCode.USAGE
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_loader_data_counts_samples_not_batches() -> None:
    data = Dataset(np.zeros((10, 64), np.float32), np.zeros(10, np.int64))
    loader = LoaderData(DataLoader(torch_training.NoisyDigits(data), batch_size=4))
    assert (len(loader), len(loader.loader)) == (10, 3)
