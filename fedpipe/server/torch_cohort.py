"""The vectorized mode of the in-process simulation with a torch model: the round as one cohort.

With ``mode = "vectorized"``, a torch model and one device, the simulated clients share one
:class:`TorchCohort`. The round loop hands it a round's sampled clients
(:mod:`fedpipe.server.cohorts`); it trains them all at once with the
:class:`~fedpipe.common.vectorized.VectorizedTrainer` (``torch.func.vmap``) on the device's
worker thread, and weighs, checks and adds up their updates **on the device** over the client
axis (:func:`~fedpipe.server.stacked_cohort.add_stacked`): one finiteness check and one sum
per array and chunk of clients, then one copy of the sum to the host. No per-client reply,
partial or device sync is made, which is what a round of thousands of small clients costs
otherwise.

The sum over the client axis is one reduction kernel, not the one-by-one fold's row after
row: the two agree to float rounding (the vectorized gradients already differ from the
sequential ones by as much). A round that needs each client's reply on its own (aux vars,
DP, update validation, an aggregator with no stacked form, several devices) goes through the
client-by-client path of :mod:`fedpipe.server.slot_batches` instead, saying why once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from fedpipe.common.client_job import ClientJob
from fedpipe.common.stacked import StackedUpdates
from fedpipe.common.vectorized import VectorizedTrainer
from fedpipe.server.clients import RoundTask
from fedpipe.server.cohorts import CohortReply
from fedpipe.server.devices import DeviceWorkers
from fedpipe.server.stacked_cohort import StackedCohort, round_unfit

__all__ = ["TorchCohort"]


class TorchCohort(StackedCohort):
    """The in-process clients of one run setup, on one torch model on one device (``slot``
    of ``workers``, whose thread runs every training of that device, in order)."""

    def __init__(self, engine: VectorizedTrainer, workers: DeviceWorkers, slot: int = 0) -> None:
        super().__init__(engine)
        self.torch_engine, self.workers, self.slot = engine, workers, slot

    def unfit(self, jobs: list[ClientJob], task: RoundTask) -> str | None:
        reason = round_unfit(jobs, bool(task.settings.get("dp")))
        if reason is not None:
            return reason
        modules = jobs[0].trainer.optimizer.modules  # one run setup: configured alike
        senders = [m.name for m in modules if m.aux_name is not None]
        if senders:
            return f"client optimizer module {senders[0]!r} sends aux vars"
        return self.torch_engine.unfit(jobs, task.round_number)

    async def offload(self, work: Callable[[], CohortReply]) -> CohortReply:
        """``work`` on the device's worker thread, after what is queued there."""
        return await self.workers.call(self.slot, work)

    def chunks(self, jobs: list[ClientJob], task: RoundTask) -> Iterator[StackedUpdates]:
        return self.torch_engine.train_stacked(jobs, task.weights, task.round_number)
