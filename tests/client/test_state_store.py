"""A client's module state per round: rollback to the base round, files, lost states."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedpipe.client.state_store import ClientStateStore, StateStoreError
from fedpipe.common.data import Dataset
from fedpipe.common.summable import Summable
from fedpipe.common.training import LocalTrainer, RunSetup, TrainResult
from fedpipe.common.vector import Vector

MOMENTUM = {"lrate": 0.1, "modules": [["momentum", {"beta": 0.9}]]}
SCAFFOLD = {"lrate": 0.1, "modules": ["scaffold-client"]}
DATA = Dataset(
    np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32),
    np.random.default_rng(1).integers(0, 3, size=40),
)


def setup(optimizer: dict[str, Any] = MOMENTUM, run_id: str = "run-a") -> RunSetup:
    return RunSetup(
        model={"name": "softmax-regression", "config": {"n_features": 4, "n_classes": 3}},
        client_optimizer=optimizer,
        aggregator="averaging",
        metrics=["loss"],
        training={"batch_size": 8},
        run_id=run_id,
    )


def global_weights(round_number: int) -> Vector:
    """What the server would send for a round (the same in every run)."""
    rng = np.random.default_rng(round_number)
    return Vector(
        {
            "kernel": rng.normal(size=(4, 3)).astype(np.float32),
            "bias": np.zeros(3, np.float32),
        }
    )


class Client:
    """A trainer and its state store, as the client daemon holds them."""

    def __init__(self, state_dir: Path | None, run: RunSetup | None = None) -> None:
        self.trainer = LocalTrainer(run or setup())
        self.store = ClientStateStore("site-0", state_dir)
        self.store.start_run(self.trainer.setup)

    def train(
        self, round_number: int, base: int | None, aux: dict[str, Summable] | None = None
    ) -> Vector:
        work = functools.partial(
            self.trainer.train,
            DATA,
            global_weights(round_number),
            aux or {},
            client="site-0",
            round_number=round_number,
        )
        result: TrainResult = self.store.train(self.trainer, base, round_number, work)
        return result.partial.vector("weighted_sum")


@pytest.fixture(scope="module")
def uninterrupted() -> list[Vector]:
    client = Client(None)
    return [client.train(r, r - 1) for r in (1, 2, 3)]


@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "state-dir"])
def test_a_replayed_round_starts_from_its_base_round_state(
    tmp_path: Path, uninterrupted: list[Vector], on_disk: bool
) -> None:
    client = Client(tmp_path if on_disk else None)
    assert client.train(1, 0).array_equal(uninterrupted[0])
    assert client.train(2, 1).array_equal(uninterrupted[1])
    client.train(3, 1)  # round 2's reply was never aggregated: round 3 starts from round 1
    assert client.train(2, 1).array_equal(uninterrupted[1])  # a resumed server replays round 2
    assert client.train(3, 2).array_equal(uninterrupted[2])
    assert client.train(3, 2).array_equal(uninterrupted[2])  # and round 3 again
    if on_disk:  # the base and the latest state, nothing else
        assert sorted(p.name for p in tmp_path.iterdir()) == ["state-2.fpk", "state-3.fpk"]


def test_a_restarted_client_continues_from_its_files(
    tmp_path: Path, uninterrupted: list[Vector]
) -> None:
    first = Client(tmp_path)
    first.train(1, 0)
    first.train(2, 1)
    first.train(3, 2)  # killed before the server aggregated round 3
    (tmp_path / ".state-4.fpk.tmp-999").write_bytes(b"torn")  # a write the kill interrupted
    restarted = Client(tmp_path)
    assert not (tmp_path / ".state-4.fpk.tmp-999").exists()
    assert restarted.train(3, 2).array_equal(uninterrupted[2])


def test_a_lost_state_rejoins_fresh_taking_c_for_its_scaffold_variate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    c = global_weights(0).full_like(0.25)
    aux = {"scaffold": Summable({"global_state": c})}
    client = Client(None, setup(SCAFFOLD))
    client.train(1, 0, aux)
    restarted = Client(None, setup(SCAFFOLD))  # no state_dir: the state died with the process
    work = functools.partial(
        restarted.trainer.train, DATA, global_weights(2), aux, client="site-0", round_number=2
    )
    with caplog.at_level(logging.WARNING):
        result: TrainResult = restarted.store.train(restarted.trainer, 1, 2, work)
    assert "whose module state is lost" in caplog.text
    # the server holds the lost c_i in its sum (and counts the client by name): the fresh
    # module started from c_i = c, not from zero, and reports only its change
    sent = result.aux_vars["scaffold"]
    assert list(sent.fields) == ["delta"]
    local = restarted.trainer.optimizer.modules[0].get_state()["local_state"]
    assert isinstance(local, Vector) and (local - sent.vector("delta")).allclose(c, atol=1e-7)
    assert not local.allclose(c, atol=1e-3)  # it did train


@pytest.mark.parametrize("damage", ["garbage", "other-run"])
def test_an_unusable_state_file_is_named_in_an_error_and_the_client_rejoins(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, uninterrupted: list[Vector], damage: str
) -> None:
    client = Client(tmp_path)
    client.train(1, 0)
    client.train(2, 1)
    path = tmp_path / "state-2.fpk"
    if damage == "garbage":
        path.write_bytes(path.read_bytes()[:-7])
        restarted = Client(tmp_path)
    else:
        restarted = Client(tmp_path, setup(run_id="run-b"))
    with caplog.at_level(logging.INFO):
        result = restarted.train(3, 2)
    if damage == "garbage":
        assert f"cannot use the client state file {path}: {path} is damaged" in caplog.text
    else:
        assert f"{path} belongs to another client, run or round" in caplog.text
    assert "re-joining with a fresh module state" in caplog.text
    assert not result.array_equal(uninterrupted[2])


@pytest.mark.parametrize("base", [3, -1, True, "2"])
def test_a_base_round_that_is_not_an_earlier_round_is_refused(base: Any) -> None:
    client = Client(None)
    with pytest.raises(StateStoreError, match="names base round"):
        client.train(3, base)
