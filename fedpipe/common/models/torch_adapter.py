"""A :class:`~fedpipe.common.models.Model` around any CPU ``torch.nn.Module`` and loss.

Needs the ``torch`` extra (``pip install 'fedpipe[torch]'``). Users name a factory by import
path in the run config (``name = "mypkg.models:build"``) that returns a :class:`TorchModel`::

    def build(hidden: int = 64) -> TorchModel:
        net = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(),
                                  torch.nn.Linear(hidden, 10))
        return TorchModel(net, torch.nn.CrossEntropyLoss(), task="multiclass")

The weights are the module's parameters, exposed as numpy arrays that share the tensors'
memory: fedpipe's optimizer pipeline updates them in place, without copies. Buffers (batch
norm statistics) stay local to each client. CPU only: a GPU module needs the torch Vector
backend, which is not written yet.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from fedpipe.common.models.base import TASKS, Model
from fedpipe.common.vector import Vector

__all__ = ["TorchModel"]


class TorchModel(Model, register_name=False):
    """Wraps ``module`` (outputs: logits for classification, values for regression) and
    ``loss_fn(outputs, targets)`` (a mean over the batch, e.g. ``CrossEntropyLoss()``).

    Parameters
    ----------
    module:
        A CPU ``torch.nn.Module``; its parameters are the federated weights.
    loss_fn:
        Mean loss; targets are int64 class ids for ``"multiclass"``, float for the others.
    task:
        ``"multiclass"``, ``"binary"`` (one logit per sample) or ``"regression"``.
    """

    name: ClassVar[str] = "torch"

    def __init__(
        self,
        module: torch.nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        task: str = "multiclass",
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task={task!r}; expected one of {', '.join(TASKS)}")
        devices = {p.device.type for p in module.parameters()}
        if devices - {"cpu"}:
            raise ValueError(f"TorchModel needs a CPU module, got parameters on {devices}")
        self.module, self.loss_fn, self.task = module, loss_fn, task
        self._params = dict(module.named_parameters())
        # numpy views of the parameters' storage: updates land in the module directly
        self._weights = {n: p.detach().numpy() for n, p in self._params.items()}

    def get_config(self) -> dict[str, Any]:
        return {"module": type(self.module).__name__, "task": self.task}

    def _targets(self, y: np.ndarray) -> torch.Tensor:
        if self.task == "multiclass":
            return torch.from_numpy(np.asarray(y, dtype=np.int64))
        dtype = next(iter(self._weights.values())).dtype
        return torch.from_numpy(np.asarray(y, dtype=dtype))

    def _outputs(self, x: np.ndarray) -> torch.Tensor:
        dtype = next(iter(self._weights.values())).dtype
        out = self.module(torch.from_numpy(np.ascontiguousarray(x, dtype=dtype)))
        return out.reshape(-1) if self.task == "binary" else out

    def compute_batch_gradients(self, x: np.ndarray, y: np.ndarray) -> tuple[Vector, float]:
        self.module.train()
        self.module.zero_grad()
        loss = self.loss_fn(self._outputs(x), self._targets(y))
        loss.backward()
        grads = {n: _grad(n, p) for n, p in self._params.items()}
        return Vector(grads), float(loss.detach())

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        self.module.eval()
        with torch.no_grad():
            out = self._outputs(x)
            loss = float(self.loss_fn(out, self._targets(y)))
        return loss, self._predictions(out)

    def predict(self, x: np.ndarray) -> np.ndarray:
        self.module.eval()
        with torch.no_grad():
            return self._predictions(self._outputs(x))

    def loss(self, x: np.ndarray, y: np.ndarray) -> float:
        return self.evaluate(x, y)[0]

    def _predictions(self, out: torch.Tensor) -> np.ndarray:
        if self.task == "multiclass":
            return torch.softmax(out, dim=1).numpy()
        if self.task == "binary":
            return torch.sigmoid(out).numpy()
        values = out.numpy()
        return values[:, 0] if values.ndim == 2 and values.shape[1] == 1 else values


def _grad(name: str, param: torch.nn.Parameter) -> np.ndarray:
    if param.grad is None:  # unused by this batch's graph: a zero gradient
        return np.zeros(tuple(param.shape), dtype=param.detach().numpy().dtype)
    return param.grad.detach().numpy().copy()
