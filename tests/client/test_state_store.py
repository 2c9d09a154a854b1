"""A client's module state per round: rollback to the base round, files, lost states."""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedpipe.client.privacy_record import PrivacyRecordLost, spent_steps
from fedpipe.client.state_store import ClientStateStore, StateStoreError
from fedpipe.common.config import DpSgdConfig
from fedpipe.common.data import Dataset
from fedpipe.common.summable import Summable
from fedpipe.common.training import LocalTrainer, RunSetup, TrainResult
from fedpipe.common.vector import Vector

MOMENTUM = {"lrate": 0.1, "modules": [["momentum", {"beta": 0.9}]]}
SCAFFOLD = {"lrate": 0.1, "modules": ["scaffold-client"]}
DP_SGD = DpSgdConfig(clip=1.0, noise_multiplier=1.1)
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

    def __init__(
        self, state_dir: Path | None, run: RunSetup | None = None, dp_sgd: bool = False
    ) -> None:
        self.trainer = LocalTrainer(run or setup(), noise_seed=0, dp_sgd=DP_SGD if dp_sgd else None)
        self.store = ClientStateStore("site-0", state_dir)
        self.store.start_run(self.trainer)

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


def steps(client: Client) -> int:
    assert client.trainer.dp_sgd is not None
    return spent_steps(client.trainer.dp_sgd.accountant)


def test_dp_sgd_steps_survive_a_restart_and_a_rollback_refunds_none(tmp_path: Path) -> None:
    first = Client(tmp_path, dp_sgd=True)
    first.train(1, 0)
    first.train(2, 1)
    first.train(3, 2)  # never aggregated: its data was used all the same
    per_round = steps(first) // 3
    assert per_round == 5 and steps(first) == 15  # ceil(40 / 8) steps a round
    restarted = Client(tmp_path, dp_sgd=True)
    assert restarted.trainer.dp_sgd is not None and first.trainer.dp_sgd is not None
    assert steps(restarted) == 15
    assert restarted.trainer.dp_sgd.epsilon() == first.trainer.dp_sgd.epsilon() > 0
    restarted.train(3, 2)  # rolled back to round 2's modules, not to its privacy spent
    assert steps(restarted) == 20
    assert steps(Client(tmp_path, dp_sgd=True)) == 20  # the newest record, not round 2's


@pytest.mark.parametrize("state_dir", [False, True], ids=["no-state-dir", "files-lost"])
def test_a_dp_sgd_client_without_its_record_refuses_to_continue_a_round(
    tmp_path: Path, state_dir: bool
) -> None:
    Client(tmp_path / "a", dp_sgd=True).train(1, 0)
    restarted = Client(tmp_path / "b" if state_dir else None, dp_sgd=True)
    where = f"no state file of this run in {tmp_path / 'b'}" if state_dir else "no state_dir"
    with pytest.raises(
        PrivacyRecordLost,
        match=rf"round 2: the server continues .* round 1.*{re.escape(where)}.*under-report",
    ):
        restarted.train(2, 1)
    assert steps(restarted) == 0
    restarted.train(2, 0)  # none of its replies aggregated: it cannot tell (documented)
    assert steps(restarted) == 5


def test_files_of_the_run_without_a_dp_sgd_record_are_refused(tmp_path: Path) -> None:
    Client(tmp_path).train(1, 0)  # the run began here without dp_sgd
    restarted = Client(tmp_path, dp_sgd=True)
    with pytest.raises(PrivacyRecordLost, match=r"state files of this run in .* hold no DP-SGD"):
        restarted.train(2, 0)
