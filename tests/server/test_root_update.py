"""FLTrust's server update: root samples drawn once and seeded, trained like a client's
update, handed to the aggregator each round; a root dataset that cannot serve fails the run's
construction with the field and value."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedpipe.common import registry
from fedpipe.common.config import ConfigError
from fedpipe.common.training import LocalTrainer
from fedpipe.server.root_update import ROOT_CLIENT, RootUpdate
from fedpipe.server.rounds import FederatedRun
from fedpipe.server.simulation import client_datasets, complete_model_config
from tests.server.test_rounds import sim_config


def fltrust_run(tmp_path: Path, **config: object) -> FederatedRun:
    sim = sim_config(tmp_path, aggregator=["fltrust", config])
    server = complete_model_config(sim.server, client_datasets(sim)[0][1])
    return FederatedRun(server, pool=None)  # type: ignore[arg-type]


def test_the_root_samples_are_seeded_and_the_server_update_is_a_clients_training(
    tmp_path: Path,
) -> None:
    with fltrust_run(tmp_path / "a", samples=50, seed=3) as run:
        root = run.root
        assert isinstance(root, RootUpdate) and len(root.data) == 50
        weights = run.model.weights
        update = root.train(weights, 4)
        same = RootUpdate(
            run.setup, registry.build_spec("aggregator", ["fltrust", {"samples": 50, "seed": 3}])
        )
        assert np.array_equal(same.data.x, root.data.x)
        # exactly what a client named "server-root" with that data computes in round 4
        want = LocalTrainer(run.setup).train(
            root.data, weights, {}, client=ROOT_CLIENT, round_number=4
        )
        assert update.array_equal(want.partial.vector("update"))
        assert update.norm() > 0
        root.give(weights, 4)
        assert run.aggregator.server_update is not None  # type: ignore[attr-defined]
    with fltrust_run(tmp_path / "b", samples=50, seed=4) as other:
        assert other.root is not None and not np.array_equal(other.root.data.x, root.data.x)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"samples": 5000}, "fltrust: samples=5000, but 'digits' has 1797"),
        ({"dataset": "no-such-data"}, "unknown built-in dataset 'no-such-data'"),
    ],
)
def test_a_root_dataset_that_cannot_serve_fails_the_run_at_construction(
    tmp_path: Path, config: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        fltrust_run(tmp_path, **config)
