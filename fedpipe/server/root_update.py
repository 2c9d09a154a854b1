"""The server's own update on its root dataset, for aggregators that compare client updates
with one (FLTrust, :mod:`fedpipe.common.aggregators.fltrust`).

The server draws the root samples once (seeded), and each round trains a model of the run
from the round's global weights with the clients' local training (the run setup's client
optimizer and training settings; seed ``round_seed(run seed, "server-root", round)``). Its
optimizer modules start fresh each round, so a resumed run computes the same updates.
"""

from __future__ import annotations

import numpy as np

from fedpipe.common.aggregators import Aggregator, FLTrust
from fedpipe.common.data import Dataset, load_source
from fedpipe.common.training import LocalTrainer, RunSetup, build_model
from fedpipe.common.vector import Vector

__all__ = ["ROOT_CLIENT", "RootUpdate"]

#: The name the root training's shuffling seed is drawn under.
ROOT_CLIENT = "server-root"


class RootUpdate:
    """Trains the server update an FLTrust aggregator needs, and hands it over each round."""

    def __init__(self, setup: RunSetup, aggregator: FLTrust) -> None:
        data = load_source(aggregator.dataset)
        if aggregator.samples > len(data):
            raise ValueError(
                f"fltrust: samples={aggregator.samples}, but {aggregator.dataset!r} has {len(data)}"
            )
        rng = np.random.default_rng(aggregator.seed)
        self.data: Dataset = data.subset(rng.choice(len(data), aggregator.samples, replace=False))
        self.setup, self.aggregator = setup, aggregator
        self.model = build_model(setup)

    @classmethod
    def of(cls, setup: RunSetup, aggregator: Aggregator) -> RootUpdate | None:
        """The root training ``aggregator`` needs, or None."""
        return cls(setup, aggregator) if isinstance(aggregator, FLTrust) else None

    def train(self, weights: Vector, round_number: int) -> Vector:
        """The server's update (start minus end weights) from ``weights``."""
        trainer = LocalTrainer(self.setup, self.model)  # fresh modules: resumable
        result = trainer.train(
            self.data, weights, {}, client=ROOT_CLIENT, round_number=round_number
        )
        return result.partial.vector("update")

    def give(self, weights: Vector, round_number: int) -> None:
        """Train this round's server update and hand it to the aggregator."""
        self.aggregator.server_update = self.train(weights, round_number)
