"""A :class:`~fedpipe.common.models.Model` around any ``torch.nn.Module`` and loss, on any device.

Needs the ``torch`` extra (``pip install 'fedpipe[torch]'``). Users name a factory by import
path in the run config (``name = "mypkg.models:build"``) that returns a :class:`TorchModel`::

    def build(hidden: int = 64) -> TorchModel:
        net = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(),
                                  torch.nn.Linear(hidden, 10))
        return TorchModel(net, torch.nn.CrossEntropyLoss(), task="multiclass")

The federated weights are the module's **trainable** parameters (``requires_grad=True``),
as torch tensors that share the parameters' memory on the module's device: fedpipe's optimizer
pipeline runs on them there (the torch backend of :class:`~fedpipe.common.vector.Vector`) and
updates them in place. Frozen parameters (a frozen backbone under LoRA adapters) stay local to
each client: they never cross the wire. So do buffers (batch-norm statistics), unless the run
config says ``model.buffers = "average"`` (:mod:`fedpipe.common.buffers`). A client picks
the device (``device = "cuda:0"`` in its own config, or :meth:`TorchModel.to`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import numpy as np
import torch

from fedpipe.common.data import Dataset
from fedpipe.common.host_staging import HostStaging
from fedpipe.common.models.base import TASKS, Model
from fedpipe.common.models.torch_batches import DeviceBatches
from fedpipe.common.torch_backend import TorchOps
from fedpipe.common.vector import ArraySpec, Vector, VectorSpecs

__all__ = ["TorchModel"]

_OPS = TorchOps()
_BATCH_NORMS = (torch.nn.modules.batchnorm._BatchNorm,)


class TorchModel(Model, register_name=False):
    """Wraps ``module`` (outputs: logits for classification, values for regression) and
    ``loss_fn(outputs, targets)`` (a mean over the batch, e.g. ``CrossEntropyLoss()``).

    Parameters
    ----------
    module:
        A ``torch.nn.Module`` on any device; its trainable parameters are the federated
        weights.
    loss_fn:
        Mean loss; targets are int64 class ids for ``"multiclass"``, float for the others.
    task:
        ``"multiclass"``, ``"binary"`` (one logit per sample) or ``"regression"``.
    device:
        Move the module there first (``"cuda:0"``, ``"cpu"``...); default: where it is.
    """

    name: ClassVar[str] = "torch"
    _weights: dict[str, torch.Tensor]  # type: ignore[assignment]

    def __init__(
        self,
        module: torch.nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        task: str = "multiclass",
        device: str | torch.device | None = None,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task={task!r}; expected one of {', '.join(TASKS)}")
        self.module, self.loss_fn, self.task = module, loss_fn, task
        trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
        if not trainable:
            raise ValueError("the module has no trainable parameter (requires_grad=True)")
        devices = {p.device for p in trainable.values()}
        if len(devices) > 1:
            raise ValueError(f"the module's trainable parameters are on several devices {devices}")
        self._params = trainable
        self._staging = HostStaging()  # incoming weights' way to the device, reused
        self._batches = DeviceBatches()  # clients' training data on the device, kept
        self.to(device if device is not None else devices.pop())

    def to(self, device: str | torch.device) -> None:
        """Move the module (parameters, buffers, frozen parts) to ``device``."""
        self.module.to(device)
        self._params = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        # tensors sharing the parameters' storage: updates land in the module directly
        self._weights = {n: p.detach() for n, p in self._params.items()}
        self.device = next(iter(self._params.values())).device
        self._batches.clear()

    def get_config(self) -> dict[str, Any]:
        return {"module": type(self.module).__name__, "task": self.task}

    # ---- weights (torch tensors on the model's device) ----------------------------------------

    def _build_specs(self) -> VectorSpecs:  # the base class caches them per _weights dict
        return {n: ArraySpec(tuple(t.shape), _OPS.dtype_name(t)) for n, t in self._weights.items()}

    def get_weights(self, copy: bool = True) -> Vector:
        """The trainable parameters: copies, or with ``copy=False`` the live tensors (which
        torch cannot make read-only: do not write to them)."""
        if copy:
            return Vector({n: t.clone() for n, t in self._weights.items()})
        return Vector(dict(self._weights))

    def host_weights(self) -> dict[str, np.ndarray] | None:
        """Numpy views of the parameters on the CPU (the same memory); on a device, of the
        (pinned) host buffer that :meth:`set_weights` copies to the device from, so that
        weights received there cross to the device with no host copy. Valid until the next
        :meth:`set_weights`."""
        if self.device.type != "cpu":
            return self._staging.landing(self._weights)
        try:
            return {n: _OPS.to_numpy(t) for n, t in self._weights.items()}
        except TypeError:  # a dtype numpy cannot hold
            return None

    def set_weights(self, weights: Vector) -> None:
        """Copy ``weights`` (numpy or torch, any device) into the parameters; numpy weights
        reach a CUDA device through a reused pinned buffer, in one synchronized transfer."""
        weights.check_specs(self._cached_specs(), f"weights for model {self.name!r}")
        if weights.backend == "numpy":
            self._staging.to_device(weights.coefs, self._weights)
            return
        with torch.no_grad():
            for name, tensor in self._weights.items():
                tensor.copy_(_OPS.asarray(weights.coefs[name], tensor))

    def apply_updates(self, updates: Vector) -> None:
        """In place: ``weights += updates`` (specs checked)."""
        updates.check_specs(self._cached_specs(), f"updates for model {self.name!r}")
        updates = updates.like(Vector(self._weights))
        with torch.no_grad():  # one multi-tensor kernel on a GPU
            _OPS.add_all_(list(self._weights.values()), [updates.coefs[n] for n in self._weights])

    def _float_buffers(self) -> dict[str, torch.Tensor]:
        """The floating-point buffers: integer ones (``num_batches_tracked``) never travel."""
        return {n: b for n, b in self.module.named_buffers() if b.is_floating_point()}

    def get_buffers(self) -> Vector:
        return Vector({n: b.detach().clone() for n, b in self._float_buffers().items()})

    def set_buffers(self, buffers: Vector) -> None:
        own = self._float_buffers()
        specs = {n: ArraySpec(tuple(b.shape), _OPS.dtype_name(b)) for n, b in own.items()}
        buffers.check_specs(specs, f"buffers for model {self.name!r}")
        with torch.no_grad():
            for name, tensor in own.items():
                tensor.copy_(_OPS.asarray(buffers.coefs[name], tensor))

    # ---- training and inference ---------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:  # type: ignore[override]
        return next(iter(self._weights.values())).dtype

    def _tensor(self, values: Any, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(values, torch.Tensor):
            return values.to(self.device, dtype)
        array = np.ascontiguousarray(values)
        return torch.from_numpy(array).to(self.device, dtype, non_blocking=True)

    def _target_dtype(self) -> torch.dtype:
        return torch.int64 if self.task == "multiclass" else self.dtype

    def _targets(self, y: Any) -> torch.Tensor:
        return self._tensor(y, self._target_dtype())

    def _outputs(self, x: Any) -> torch.Tensor:
        out = self.module(self._tensor(x, self.dtype))
        return out.reshape(-1) if self.task == "binary" else out

    def batches(
        self, data: Dataset, batch_size: int, *, seed: np.random.Generator, drop_remainder: bool
    ) -> Iterator[tuple[Any, Any]]:
        """One epoch of ``data`` in shuffled batches drawn on the model's device, the data and
        the epoch's sample order copied there once (:mod:`~fedpipe.common.models.torch_batches`);
        the same samples as ``Dataset.batches``."""
        place = (self.device, self.dtype, self._target_dtype())
        return self._batches.batches(
            data, batch_size, seed=seed, drop_remainder=drop_remainder, place=place
        )

    def compute_batch_gradients(self, x: Any, y: Any) -> tuple[Vector, torch.Tensor]:
        """Gradients of the mean loss (tensors on the model's device) and that loss, a 0-d
        tensor there too (reading it would wait for the device at every batch)."""
        if not self.module.training:  # after an evaluation (train() walks every submodule)
            self.module.train()
        for param in self._params.values():  # frozen parameters never get a gradient
            param.grad = None
        loss = self.loss_fn(self._outputs(x), self._targets(y))
        loss.backward()
        # backward allocates fresh .grad tensors after they were set to None: the optimizer
        # may consume (modify) them in place
        grads = {n: _grad(p) for n, p in self._params.items()}
        return Vector(grads), loss.detach()

    def compute_sample_gradients(self, x: Any, y: Any) -> tuple[Vector, torch.Tensor]:
        """Per-sample gradients of the trainable parameters (a leading sample axis, on the
        model's device) and the mean loss: ``torch.func.vmap`` of ``grad`` of each sample's
        loss through ``functional_call``, as Opacus' functorch path computes them.

        Raises
        ------
        ValueError
            The module has batch normalization, which mixes the samples of a batch: no
            sample has a gradient of its own (use GroupNorm or LayerNorm).
        """
        from torch.func import functional_call, grad_and_value, vmap

        mixing = [n for n, m in self.module.named_modules() if isinstance(m, _BATCH_NORMS)]
        if mixing:
            raise ValueError(
                f"per-sample gradients (DP-SGD): module {mixing[0]!r} is a batch norm, which "
                "mixes the samples of a batch; use GroupNorm or LayerNorm"
            )
        if not self.module.training:
            self.module.train()
        params = {n: p.detach() for n, p in self._params.items()}
        binary = self.task == "binary"

        def sample_loss(weights: dict[str, torch.Tensor], xs: Any, ys: Any) -> torch.Tensor:
            out = functional_call(self.module, weights, (xs.unsqueeze(0),))
            return self.loss_fn(out.reshape(-1) if binary else out, ys.unsqueeze(0))

        per_sample = vmap(grad_and_value(sample_loss), in_dims=(None, 0, 0), randomness="different")
        grads, losses = per_sample(params, self._tensor(x, self.dtype), self._targets(y))
        return Vector(dict(grads)), losses.detach().to(torch.float64).mean()

    def evaluate(self, x: Any, y: Any) -> tuple[float, np.ndarray]:
        self.module.eval()
        with torch.no_grad():
            out = self._outputs(x)
            loss = float(self.loss_fn(out, self._targets(y)))
        return loss, self._predictions(out)

    def predict(self, x: Any) -> np.ndarray:
        self.module.eval()
        with torch.no_grad():
            return self._predictions(self._outputs(x))

    def loss(self, x: Any, y: Any) -> float:
        return self.evaluate(x, y)[0]

    def _predictions(self, out: torch.Tensor) -> np.ndarray:
        if out.dtype not in (torch.float32, torch.float64):
            out = out.float()  # half precision: metrics in float32
        if self.task == "multiclass":
            return torch.softmax(out, dim=1).cpu().numpy()
        if self.task == "binary":
            return torch.sigmoid(out).cpu().numpy()
        values = out.cpu().numpy()
        return values[:, 0] if values.ndim == 2 and values.shape[1] == 1 else values


def _grad(param: torch.nn.Parameter) -> torch.Tensor:
    if param.grad is None:  # unused by this batch's graph: a zero gradient
        return torch.zeros_like(param.detach())
    return param.grad.detach()
