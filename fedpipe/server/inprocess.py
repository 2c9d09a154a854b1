"""In-process client proxies: simulated clients that train in the server's process.

Simulated clients share one model object per device (weights are reset at every task); each
keeps only its own state between rounds: its data and its optimizer (module states, aux vars).
Nothing is encoded. A round's global weights and aux vars are put where the model lives once
per round and device (one host-to-GPU copy per round, not one per client), every client of
that device trains from them, and their updates stay there: the round loop's running sum adds
them up on the device and brings the total to the host once (``fedpipe.server.rounds``).

Sequential mode: clients of a device train one after another. With several devices, client
``i`` trains on device ``i % n`` in that device's worker thread, so the devices work at once;
replies come back in task order, which keeps the run bit-identical to a one-device run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from fedpipe.common.config import ConfigError
from fedpipe.common.data import Dataset
from fedpipe.common.models import Model
from fedpipe.common.summable import Summable
from fedpipe.common.training import EvalResult, LocalTrainer, RunSetup, TrainResult, build_model
from fedpipe.common.vector import ArraySpec, Vector
from fedpipe.server.clients import ClientError, ClientProxy, RoundTask, RunOutcome
from fedpipe.server.devices import DeviceWorkers

__all__ = ["InProcessClient", "SharedModels"]

R = TypeVar("R")


class SharedModels:
    """Model objects reused by every simulated client: one per run setup and device slot.

    Parameters
    ----------
    devices:
        Device names (see :func:`~fedpipe.server.devices.resolve_devices`), one model object
        each; client ``i`` uses slot ``i % len(devices)``. Empty: one model object, where
        the model's factory put it.
    """

    def __init__(self, devices: Sequence[str] = ()) -> None:
        self.devices = list(devices)
        self._models: dict[tuple[int, int], Model] = {}
        #: Worker threads when there are several slots (one slot trains inline).
        self.workers = DeviceWorkers(self.devices) if len(self.devices) > 1 else None

    def slot_of(self, index: int) -> int:
        """The device slot of the simulation's ``index``-th client (round robin)."""
        return index % len(self.devices) if self.devices else 0

    def get(self, setup: RunSetup, slot: int = 0) -> Model:
        """The model object of ``slot`` for ``setup``, built (and placed) on first use.

        Raises
        ------
        ConfigError
            A device is named and the model is not a torch model.
        """
        key = (id(setup), slot)
        if key not in self._models:
            model = build_model(setup)
            if self.devices:
                _place(model, self.devices[slot])
            self._models[key] = model
        return self._models[key]

    def close(self) -> None:
        """End the worker threads once their work is done (idempotent)."""
        if self.workers is not None:
            self.workers.close()


def _place(model: Model, device: str) -> None:
    from fedpipe.common.models.torch_adapter import TorchModel  # torch: only with a device

    if not isinstance(model, TorchModel):
        raise ConfigError(
            f"device={device!r} places a torch model, but model {model.name!r} is a numpy "
            "model; leave device unset"
        )
    model.to(device)


class InProcessClient(ClientProxy):
    """A simulated client: its private data and its own :class:`LocalTrainer`, on the device
    slot of its ``index`` among the simulation's clients."""

    def __init__(
        self,
        name: str,
        train_data: Dataset,
        eval_data: Dataset | None,
        models: SharedModels,
        index: int = 0,
    ) -> None:
        self.name = name
        self.train_data = train_data
        self.eval_data = eval_data
        self.n_train_samples = len(train_data)
        self.n_eval_samples = len(eval_data) if eval_data is not None else 0
        self._models = models
        self.slot = models.slot_of(index)
        self._trainer: LocalTrainer | None = None

    @property
    def trainer(self) -> LocalTrainer:
        if self._trainer is None:
            raise ClientError(f"client {self.name} got a task before being initialized")
        return self._trainer

    async def initialize(self, setup: RunSetup, specs: Mapping[str, ArraySpec]) -> None:
        self._trainer = LocalTrainer(setup, model=self._models.get(setup, self.slot))

    async def train(self, task: RoundTask) -> TrainResult:
        trainer, data, name = self.trainer, self.train_data, self.name
        weights, aux_vars = self._staged(task)
        return await self._run(
            task,
            lambda: trainer.train(
                data, weights, aux_vars, client=name, round_number=task.round_number
            ),
        )

    async def evaluate(self, task: RoundTask) -> EvalResult:
        if self.eval_data is None:
            raise ClientError(f"client {self.name} has no evaluation data")
        trainer, data = self.trainer, self.eval_data
        weights, _ = self._staged(task)
        return await self._run(task, lambda: trainer.evaluate(data, weights))

    async def stop(self, outcome: RunOutcome) -> None:
        self._trainer = None

    def _staged(self, task: RoundTask) -> tuple[Vector, dict[str, Summable]]:
        """The task's weights and aux vars where this client's model lives: moved there once
        per task and device, then shared by every client on that device (read-only: a
        trainer copies the weights into its model and its modules copy the aux vars)."""
        slot_key = f"inprocess/slot-{self.slot}"
        staged: tuple[Vector, dict[str, Summable]] | None = task.cache.get(slot_key)
        if staged is None:
            like = self.trainer.model.get_weights(copy=False)
            device_key = f"inprocess/{like.backend}/{like.device}"  # slots may share one
            staged = task.cache.get(device_key)
            if staged is None:
                aux_vars = {k: v.like(like) for k, v in task.aux_vars.items()}
                staged = task.cache[device_key] = (task.weights.like(like), aux_vars)
            task.cache[slot_key] = staged
        return staged

    async def _run(self, task: RoundTask, work: Callable[[], R]) -> R:
        workers = self._models.workers
        if workers is None:
            result = work()
            await asyncio.sleep(0)  # let the loop breathe between simulated clients
            return result
        turns: list[asyncio.Future[None]] = task.cache.setdefault("inprocess/turns", [])
        return await workers.run(self.slot, turns, work)
