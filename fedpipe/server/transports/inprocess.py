"""In-process client proxies: simulated clients that train in the server's process.

Simulated clients share one model object per device (weights are reset at every task); each
keeps only its own state between rounds: its data and its optimizer (module states, aux vars).
Nothing is encoded. A round's global weights and aux vars are put where the model lives once
per round and device (one host-to-GPU copy per round, not one per client), every client of
that device trains from them, and their updates stay there: the round loop's running sum adds
them up on the device and brings the total to the host once (``fedpipe.server.rounds``).

Sequential mode: clients of a device train one after another. With one device they train
inline, in task order, each once the round loop has folded enough earlier replies
(:meth:`InProcessClient.release`): a round with thousands of clients holds 64 MiB of replies
(at least two) at a time, not thousands (memory, and the garbage collector's work). With
several devices, client ``i`` trains on device ``i % n`` in that device's worker thread, so the
devices work at once; replies come back in task order, which keeps the run bit-identical to a
one-device run.

Vectorized mode, numpy model: the clients form one
:class:`~fedpipe.server.stacked_cohort.StackedCohort` and a round's clients train stacked,
answering the round loop as one (:mod:`fedpipe.server.cohorts`). Vectorized mode, torch model
on one device: the same with a :class:`~fedpipe.server.torch_cohort.TorchCohort`, whose sum
is taken on the device. Where a round needs each reply on its own (or with several devices),
the clients of a round that share a device slot train in one call of that slot's
:class:`~fedpipe.common.vectorized.VectorizedTrainer` (``max_clients`` stacked at once), on
the slot's worker thread (:mod:`fedpipe.server.slot_batches`), and reply one by one, in task
order. Evaluation stays client by client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal, TypeAlias, TypeVar

from fedpipe.common.config import ConfigError, DpSgdConfig
from fedpipe.common.data import Dataset
from fedpipe.common.models import Model
from fedpipe.common.summable import Summable
from fedpipe.common.train_fn import TrainFn
from fedpipe.common.training import (
    ClientData,
    EvalResult,
    LocalTrainer,
    RunSetup,
    TrainResult,
    build_model,
)
from fedpipe.common.vector import ArraySpec, Vector
from fedpipe.server.clients import ClientError, ClientProxy, RoundTask, RunOutcome
from fedpipe.server.devices import DeviceWorkers

if TYPE_CHECKING:
    from fedpipe.common.models.torch_adapter import TorchModel
    from fedpipe.common.secagg import SecAggClient
    from fedpipe.common.secagg.messages import (
        AdvertiseKeys,
        ForwardedShares,
        Roster,
        ShareKeys,
        UnmaskRequest,
        UnmaskShares,
    )
    from fedpipe.common.vectorized import VectorizedTrainer
    from fedpipe.server.stacked_cohort import StackedCohort

__all__ = ["InProcessClient", "SharedModels", "TrainingMode"]

#: ``SimulationConfig.mode``: "auto" stacks a numpy model's clients, trains a torch model's
#: one after another; "vectorized" stacks both kinds.
TrainingMode: TypeAlias = Literal["auto", "sequential", "vectorized"]

R = TypeVar("R")

VECTORIZED_NEEDS = "mode='vectorized' trains a torch model with torch.func"

#: Bytes of replies a task's clients training inline may hold at once (their updates' size),
#: in at least two turns (one reply folded, in a thread for a large model, while the next
#: client trains) and at most :data:`MAX_INLINE_TURNS` (small models: few loop iterations).
INLINE_REPLY_BYTES = 64 << 20
MAX_INLINE_TURNS = 64


def inline_turns(update_bytes: int) -> int:
    """How many clients of a task may train inline before the oldest reply is folded."""
    return max(2, min(MAX_INLINE_TURNS, INLINE_REPLY_BYTES // max(update_bytes, 1)))


class SharedModels:
    """Model objects reused by every simulated client: one per run setup and device slot.

    Parameters
    ----------
    devices:
        Device names (see :func:`~fedpipe.server.devices.resolve_devices`), one model object
        each; client ``i`` uses slot ``i % len(devices)``. Empty: one model object, where
        the model's factory put it.
    """

    def __init__(
        self,
        devices: Sequence[str] = (),
        mode: TrainingMode = "sequential",
        max_clients: int = 1024,
    ) -> None:
        self.devices, self.mode, self.max_clients = list(devices), mode, max_clients
        self._models: dict[tuple[int, int], Model] = {}
        self._engines: dict[tuple[int, int], VectorizedTrainer] = {}
        self._cohorts: dict[int, StackedCohort | None] = {}
        #: Worker threads when there are several slots or batches to train (a slot of the
        #: sequential mode trains inline). No device named: one slot, the factory's device.
        self.workers = (
            DeviceWorkers(self.devices or [""])
            if len(self.devices) > 1 or mode == "vectorized"
            else None
        )

    def slot_of(self, index: int) -> int:
        """The device slot of the simulation's ``index``-th client (round robin)."""
        return index % len(self.devices) if self.devices else 0

    def get(self, setup: RunSetup, slot: int = 0) -> Model:
        """The model object of ``slot`` for ``setup``, built (and placed) on first use.

        Raises
        ------
        ConfigError
            A device is named, or the mode is vectorized, and the model is not a torch model.
        """
        key = (id(setup), slot)
        if key not in self._models:
            model = build_model(setup)
            if self.devices:
                _place(model, self.devices[slot])
            self._models[key] = model
        return self._models[key]

    def cohort(self, setup: RunSetup) -> StackedCohort | None:
        """The cohort of ``setup``'s clients, built on first use: a numpy model's (modes auto
        and vectorized), a torch model's on one device (mode vectorized; several devices
        keep one batch per device slot); None otherwise (the sequential mode)."""
        if self.mode == "sequential":
            return None
        if id(setup) not in self._cohorts:
            self._cohorts[id(setup)] = self._new_cohort(setup)
        return self._cohorts[id(setup)]

    def _new_cohort(self, setup: RunSetup) -> StackedCohort | None:
        from fedpipe.common.stacked import StackedTrainer
        from fedpipe.server.stacked_cohort import StackedCohort

        model = self.get(setup)
        if not _is_torch(model):
            return StackedCohort(StackedTrainer(model, self.max_clients))
        if self.mode != "vectorized" or len(self.devices) > 1 or self.workers is None:
            return None
        from fedpipe.server.torch_cohort import TorchCohort  # torch: only for a torch model

        return TorchCohort(self.engine(setup, 0), self.workers, 0)

    def engine(self, setup: RunSetup, slot: int) -> VectorizedTrainer:
        """The vectorized engine of ``slot``'s model for ``setup``, built on first use."""
        from fedpipe.common.vectorized import VectorizedTrainer

        key = (id(setup), slot)
        if key not in self._engines:
            model = _torch(self.get(setup, slot), VECTORIZED_NEEDS)
            self._engines[key] = VectorizedTrainer(model, self.max_clients)
        return self._engines[key]

    def close(self) -> None:
        """End the worker threads once their work is done (idempotent)."""
        if self.workers is not None:
            self.workers.close()


def _is_torch(model: Model) -> bool:
    # torch is imported only where it already is: a numpy-only install never imports it
    import sys

    adapter = sys.modules.get("fedpipe.common.models.torch_adapter")
    return adapter is not None and isinstance(model, adapter.TorchModel)


def _place(model: Model, device: str) -> None:
    _torch(model, f"device={device!r} places a torch model").to(device)


def _torch(model: Model, what: str) -> TorchModel:
    """``model``, a torch model, or a ConfigError saying ``what`` needs one."""
    from fedpipe.common.models.torch_adapter import TorchModel  # torch: only when asked for

    if not isinstance(model, TorchModel):
        fix = "mode='sequential'" if what.startswith("mode") else "leave device unset"
        raise ConfigError(f"{what}, but model {model.name!r} is a numpy model; use {fix}")
    return model


class InProcessClient(ClientProxy):
    """A simulated client: its private data (fedpipe's arrays, or its own DataLoaders) and its
    own :class:`LocalTrainer`, on the device slot of its ``index`` among the simulation's
    clients; with ``train_fn``, that function trains in place of fedpipe's loop; with
    ``dp_sgd``, sample-level DP-SGD does."""

    def __init__(
        self,
        name: str,
        train_data: ClientData,
        eval_data: ClientData | None,
        models: SharedModels,
        index: int = 0,
        noise_seed: int | None = None,
        *,
        train_fn: TrainFn | None = None,
        dp_sgd: DpSgdConfig | None = None,
    ) -> None:
        self.name = name
        self.noise_seed = noise_seed
        self.dp_sgd = dp_sgd
        self.train_data = train_data
        self.eval_data = eval_data
        self.n_train_samples = len(train_data)
        self.n_eval_samples = len(eval_data) if eval_data is not None else 0
        self._models = models
        self.slot = models.slot_of(index)
        self.train_fn = train_fn
        self._trainer: LocalTrainer | None = None
        #: This round's secure aggregation session: (round, client state machine).
        self._secagg: tuple[int, SecAggClient] | None = None
        #: The task's turn this client holds until its reply is released (sequential, inline).
        self._turn: asyncio.Semaphore | None = None

    @property
    def trainer(self) -> LocalTrainer:
        if self._trainer is None:
            raise ClientError(f"client {self.name} got a task before being initialized")
        return self._trainer

    async def initialize(self, setup: RunSetup, specs: Mapping[str, ArraySpec]) -> None:
        self._trainer = LocalTrainer(
            setup,
            model=self._models.get(setup, self.slot),
            train_fn=self.train_fn,
            noise_seed=self.noise_seed,
            client=self.name,
            dp_sgd=self.dp_sgd,
        )

    async def train(self, task: RoundTask) -> TrainResult:
        trainer, data, name = self.trainer, self.train_data, self.name
        weights, aux_vars = self._staged(task)
        dp = task.settings.get("dp")
        if self._models.mode == "vectorized" and _is_torch(trainer.model):
            if dp:
                raise ClientError(
                    "distributed DP noise is added client by client: mode='sequential'"
                )
            return await self._batched(task, weights, aux_vars)
        return await self._run(
            task,
            lambda: trainer.train(
                data, weights, aux_vars, client=name, round_number=task.round_number, dp=dp
            ),
        )

    async def _batched(
        self, task: RoundTask, weights: Vector, aux_vars: dict[str, Summable]
    ) -> TrainResult:
        """Vectorized mode: this client's job goes in its slot's batch for ``task``; its reply
        comes back in task order. Nothing is awaited before the job is submitted."""
        from fedpipe.common.vectorized import ClientJob
        from fedpipe.server.slot_batches import submit

        workers = self._models.workers
        assert workers is not None  # the vectorized mode always has worker threads
        # own loaders never come here: the simulation trains them sequentially
        assert isinstance(self.train_data, Dataset)
        job = ClientJob(self.name, self.trainer, self.train_data, aux_vars)
        engine = self._models.engine(self.trainer.setup, self.slot)
        reply = submit(task, self.slot, job, engine, weights, workers)
        turns: list[asyncio.Future[None]] = task.cache.setdefault("inprocess/turns", [])
        return await workers.in_turn(turns, reply)

    def cohort(self) -> StackedCohort | None:
        if self._trainer is None:
            return None
        return self._models.cohort(self._trainer.setup)

    async def evaluate(self, task: RoundTask) -> EvalResult:
        if self.eval_data is None:
            raise ClientError(f"client {self.name} has no evaluation data")
        trainer, data = self.trainer, self.eval_data
        weights, aux_vars = self._staged(task)  # the global buffers, when they travel
        return await self._run(task, lambda: trainer.evaluate(data, weights, aux_vars))

    async def stop(self, outcome: RunOutcome) -> None:
        self._trainer = None
        self._secagg = None

    async def secagg_advertise(self, round_number: int) -> AdvertiseKeys:
        from fedpipe.common.secagg import SecAggClient

        client = SecAggClient(self.name)  # os.urandom, drawn here: never from the server
        self._secagg = (round_number, client)
        return client.advertise()

    async def secagg_share(self, roster: Roster) -> ShareKeys:
        return self._session().share_keys(roster)

    async def train_masked(self, task: RoundTask, shares: ForwardedShares) -> TrainResult:
        from fedpipe.common.secagg.partials import masked_result

        session = self._session(task.round_number)
        result = await self.train(task)
        try:
            return masked_result(session, self.trainer.aggregator, result, shares)
        except ValueError as exc:
            raise ClientError(f"client {self.name}: {exc}") from None

    async def secagg_unmask(self, request: UnmaskRequest) -> UnmaskShares:
        session = self._session()
        self._secagg = None  # one reveal per session
        return session.unmask(request)

    def _session(self, round_number: int | None = None) -> SecAggClient:
        if self._secagg is None or round_number not in (None, self._secagg[0]):
            raise ClientError(
                f"client {self.name}: no secure aggregation session"
                + (f" for round {round_number}" if round_number is not None else "")
            )
        return self._secagg[1]

    async def _inline(self, task: RoundTask, work: Callable[[], R]) -> R:
        """Run ``work`` here, in task order, once a turn is free: a turn is held from the
        start of the work until the round loop releases the reply, so that a round holds
        at most :func:`inline_turns` replies (the rest are folded and freed), however many
        clients it has."""
        turns: asyncio.Semaphore | None = task.cache.get("inprocess/inline")
        if turns is None:
            count = inline_turns(task.weights.nbytes)
            turns = task.cache["inprocess/inline"] = asyncio.Semaphore(count)
        await turns.acquire()  # first come, first served: task order
        self._turn = turns
        try:
            return work()
        except BaseException:
            await self.release()  # no reply to fold: the next client goes on
            raise

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

    async def release(self) -> None:
        """The round loop folded this client's reply (or gave up on it): the next client of
        the task may train."""
        if self._turn is not None:
            self._turn.release()
            self._turn = None

    async def _run(self, task: RoundTask, work: Callable[[], R]) -> R:
        workers = self._models.workers
        if workers is None:
            return await self._inline(task, work)
        turns: list[asyncio.Future[None]] = task.cache.setdefault("inprocess/turns", [])
        return await workers.run(self.slot, turns, work)
