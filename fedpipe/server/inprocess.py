"""In-process client proxies: simulated clients that train in the server's process.

Simulated clients share one model object (weights are reset at every task); each keeps only
its own state between rounds: its data and its optimizer (module states, aux vars). Nothing is
encoded: Vectors are handed over as they are.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from fedpipe.common.data import Dataset
from fedpipe.common.models import Model
from fedpipe.common.training import EvalResult, LocalTrainer, RunSetup, TrainResult, build_model
from fedpipe.common.vector import ArraySpec
from fedpipe.server.clients import ClientError, ClientProxy, RoundTask, RunOutcome

__all__ = ["InProcessClient", "SharedModels"]


class SharedModels:
    """One model object per run setup, reused by every simulated client."""

    def __init__(self) -> None:
        self._models: dict[int, Model] = {}

    def get(self, setup: RunSetup) -> Model:
        key = id(setup)
        if key not in self._models:
            self._models[key] = build_model(setup)
        return self._models[key]


class InProcessClient(ClientProxy):
    """A simulated client: its private data and its own :class:`LocalTrainer`."""

    def __init__(
        self, name: str, train_data: Dataset, eval_data: Dataset | None, models: SharedModels
    ) -> None:
        self.name = name
        self.train_data = train_data
        self.eval_data = eval_data
        self.n_train_samples = len(train_data)
        self.n_eval_samples = len(eval_data) if eval_data is not None else 0
        self._models = models
        self._trainer: LocalTrainer | None = None

    @property
    def trainer(self) -> LocalTrainer:
        if self._trainer is None:
            raise ClientError(f"client {self.name} got a task before being initialized")
        return self._trainer

    async def initialize(self, setup: RunSetup, specs: Mapping[str, ArraySpec]) -> None:
        self._trainer = LocalTrainer(setup, model=self._models.get(setup))

    async def train(self, task: RoundTask) -> TrainResult:
        result = self.trainer.train(
            self.train_data,
            task.weights,
            task.aux_vars,
            client=self.name,
            round_number=task.round_number,
        )
        await asyncio.sleep(0)  # let the loop breathe between simulated clients
        return result

    async def evaluate(self, task: RoundTask) -> EvalResult:
        if self.eval_data is None:
            raise ClientError(f"client {self.name} has no evaluation data")
        result = self.trainer.evaluate(self.eval_data, task.weights)
        await asyncio.sleep(0)
        return result

    async def stop(self, outcome: RunOutcome) -> None:
        self._trainer = None
