"""A model that kills its own process mid-round, for the Dask transport's lost-worker test.

Named by import path (``tests.dask_models:DyingSoftmax``): Dask workers build it by name, as
they build any user model.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from fedpipe.common.models.linear import SoftmaxRegression

__all__ = ["DyingSoftmax"]


class DyingSoftmax(SoftmaxRegression):
    """Softmax regression whose ``kill_at``-th client gradient step in a process SIGKILLs that
    process, in the first process to get there only (``marker``, created exclusively, says
    one did): one worker dies, mid-round, and its restarted process lives. A stacked call
    of K clients is K client steps (it dies in the call that reaches ``kill_at``)."""

    def __init__(self, n_features: int, n_classes: int, kill_at: int, marker: str) -> None:
        super().__init__(n_features, n_classes)
        self.kill_at, self.marker, self.steps = kill_at, marker, 0

    def compute_batch_gradients(self, x: Any, y: Any) -> Any:
        self._step()
        return super().compute_batch_gradients(x, y)

    def compute_sample_gradients(self, x: Any, y: Any) -> Any:  # DP-SGD's steps
        self._step()
        return super().compute_sample_gradients(x, y)

    def compute_stacked_gradients(self, weights: Any, x: Any, y: Any) -> Any:
        self._step(len(x))
        return super().compute_stacked_gradients(weights, x, y)

    def _step(self, clients: int = 1) -> None:
        self.steps += clients
        if self.steps - clients < self.kill_at <= self.steps:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass  # another worker died already
            else:
                os.kill(os.getpid(), signal.SIGKILL)


class RefusedWeights(Exception):
    """An exception a process that did not raise it cannot rebuild from its pickle (its
    ``__init__`` takes two arguments, its ``args`` hold one): a user's exception class."""

    def __init__(self, model: str, why: str) -> None:
        super().__init__(f"model {model}: {why}")


class RefusingSoftmax(SoftmaxRegression):
    """Softmax regression whose ``get_weights`` raises :class:`RefusedWeights` when a Dask
    worker's own code asks for its weights (:mod:`fedpipe.server.transports.dask.worker`,
    outside any one client's training): user code failing in a worker's call, not in a
    client's."""

    def get_weights(self, copy: bool = True) -> Any:
        caller = sys._getframe(1).f_globals.get("__name__")
        if caller == "fedpipe.server.transports.dask.worker":
            raise RefusedWeights(self.name, "no weights for the worker today")
        return super().get_weights(copy=copy)
