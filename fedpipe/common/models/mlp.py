"""A multi-layer perceptron with ReLU hidden layers and hand-written backpropagation."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from fedpipe.common.models.base import (
    TASKS,
    Model,
    head_loss,
    head_loss_and_gradient,
    head_predict,
)
from fedpipe.common.models.stacked_head import stacked_head_loss_and_gradient
from fedpipe.common.vector import Vector

__all__ = ["MLP"]


class MLP(Model):
    """Fully connected network: ``hidden`` ReLU layers, then a linear output layer and the head
    of ``task``.

    Weights are ``kernel_{i}`` of shape ``(fan_in, fan_out)`` and ``bias_{i}`` of shape
    ``(fan_out,)`` for layer ``i`` (the output layer is the last one). Kernels use He
    initialization, ``N(0, 2 / fan_in)`` (He et al., 2015); biases start at 0.

    Parameters
    ----------
    n_features:
        Number of input features.
    hidden:
        Widths of the hidden layers (may be empty: a linear model).
    task:
        ``"multiclass"`` (softmax cross-entropy over ``n_classes``), ``"binary"`` (one logit,
        binary cross-entropy) or ``"regression"`` (``n_outputs`` values, loss
        ``0.5 * mean squared error``).
    n_classes:
        Number of classes; required for ``"multiclass"``, not accepted otherwise.
    n_outputs:
        Number of regression targets (default 1); only for ``"regression"``.
    dtype, seed:
        Weight dtype and initialization seed.
    """

    name: ClassVar[str] = "mlp"

    def __init__(
        self,
        n_features: int,
        hidden: Sequence[int] = (64,),
        task: str = "multiclass",
        n_classes: int | None = None,
        n_outputs: int | None = None,
        dtype: str = "float32",
        seed: int | None = 0,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task={task!r}; expected one of {', '.join(TASKS)}")
        if n_features < 1 or any(int(h) < 1 for h in hidden):
            raise ValueError(
                f"n_features={n_features}, hidden={list(hidden)}; all widths must be >= 1"
            )
        if task == "multiclass":
            if n_classes is None or n_classes < 2 or n_outputs is not None:
                raise ValueError(
                    f"task 'multiclass' needs n_classes >= 2 and no n_outputs, got "
                    f"n_classes={n_classes}, n_outputs={n_outputs}"
                )
            width = n_classes
        elif task == "regression":
            if n_classes is not None or (n_outputs is not None and n_outputs < 1):
                raise ValueError(
                    f"task 'regression' takes n_outputs >= 1 and no n_classes, got "
                    f"n_classes={n_classes}, n_outputs={n_outputs}"
                )
            width = n_outputs or 1
        else:
            if n_classes not in (None, 2) or n_outputs is not None:
                raise ValueError(
                    f"task 'binary' has one output; got n_classes={n_classes}, "
                    f"n_outputs={n_outputs}"
                )
            width = 1
        self.task = task
        self.n_features = n_features
        self.hidden = [int(h) for h in hidden]
        self.n_classes = n_classes
        self.n_outputs = n_outputs
        self.seed = seed
        rng = np.random.default_rng(seed)
        sizes = [n_features, *self.hidden, width]
        self._weights = {}
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            std = np.sqrt(2.0 / fan_in)
            self._weights[f"kernel_{i}"] = (rng.standard_normal((fan_in, fan_out)) * std).astype(
                dtype
            )
            self._weights[f"bias_{i}"] = np.zeros(fan_out, dtype=dtype)
        self._n_layers = len(sizes) - 1

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "n_features": self.n_features,
            "hidden": list(self.hidden),
            "task": self.task,
        }
        if self.n_classes is not None:
            config["n_classes"] = self.n_classes
        if self.n_outputs is not None:
            config["n_outputs"] = self.n_outputs
        config.update(dtype=self.dtype.name, seed=self.seed)
        return config

    def _forward(self, x: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Inputs of every layer (``x`` then each hidden activation) and the output ``z``."""
        inputs = [x]
        h = x
        for i in range(self._n_layers):
            z = h @ self._weights[f"kernel_{i}"] + self._weights[f"bias_{i}"]
            if i == self._n_layers - 1:
                return inputs, z[:, 0] if self.task == "binary" else z
            h = np.maximum(z, 0)
            inputs.append(h)
        raise AssertionError("unreachable: an MLP has at least one layer")

    def _backward(
        self, x: np.ndarray, y: np.ndarray
    ) -> tuple[float, dict[int, tuple[np.ndarray, np.ndarray]]]:
        """The mean loss and, per layer ``i``, its input ``h`` and the gradient ``dz`` of the
        mean loss w.r.t. its pre-activation (rows: samples)."""
        x = self._inputs(x, self.n_features)
        inputs, z = self._forward(x)
        loss, dz = head_loss_and_gradient(self.task, z, y)
        if self.task == "binary":
            dz = dz[:, None]
        layers: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for i in reversed(range(self._n_layers)):
            h = inputs[i]
            layers[i] = (h, dz)
            if i:
                # ReLU'(pre-activation) is 1 exactly where the activation h is positive
                dz = (dz @ self._weights[f"kernel_{i}"].T) * (h > 0)
        return loss, layers

    def compute_batch_gradients(self, x: np.ndarray, y: np.ndarray) -> tuple[Vector, float]:
        loss, layers = self._backward(x, y)
        grads: dict[str, np.ndarray] = {}
        for i, (h, dz) in layers.items():
            grads[f"kernel_{i}"] = (h.T @ dz).astype(self.dtype, copy=False)
            grads[f"bias_{i}"] = dz.sum(axis=0).astype(self.dtype, copy=False)
        return Vector.of_numpy({name: grads[name] for name in self._weights}), loss

    def compute_stacked_gradients(
        self, weights: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """K clients at once (see :meth:`Model.compute_stacked_gradients`): the forward and
        backward passes with batched matmuls, bit-equal to :meth:`compute_batch_gradients`
        client by client."""
        h = self._stacked_inputs(x, self.n_features)
        inputs = [h]
        last = self._n_layers - 1
        for i in range(self._n_layers):
            z = h @ weights[f"kernel_{i}"] + weights[f"bias_{i}"][:, None, :]
            if i < last:
                h = np.maximum(z, 0)
                inputs.append(h)
        losses, dz = stacked_head_loss_and_gradient(
            self.task, z[..., 0] if self.task == "binary" else z, y
        )
        dz = dz[..., None] if self.task == "binary" else dz
        grads: dict[str, np.ndarray] = {}
        for i in reversed(range(self._n_layers)):
            h = inputs[i]
            grads[f"kernel_{i}"] = (np.swapaxes(h, 1, 2) @ dz).astype(self.dtype, copy=False)
            grads[f"bias_{i}"] = dz.sum(axis=1).astype(self.dtype, copy=False)
            if i:
                dz = (dz @ np.swapaxes(weights[f"kernel_{i}"], 1, 2)) * (h > 0)
        return {name: grads[name] for name in self._weights}, losses

    def compute_sample_gradients(self, x: np.ndarray, y: np.ndarray) -> tuple[Vector, float]:
        """Per-sample gradients in closed form: sample ``i``'s kernel gradient is the outer
        product of its layer input and its own ``dz`` (``n`` times its share of the mean)."""
        loss, layers = self._backward(x, y)
        grads: dict[str, np.ndarray] = {}
        for i, (h, dz) in layers.items():
            own = dz * len(dz)
            grads[f"kernel_{i}"] = np.einsum("ni,nj->nij", h, own).astype(self.dtype, copy=False)
            grads[f"bias_{i}"] = own.astype(self.dtype, copy=False)
        return Vector({name: grads[name] for name in self._weights}), loss

    def predict(self, x: np.ndarray) -> np.ndarray:
        return head_predict(self.task, self._forward(self._inputs(x, self.n_features))[1])

    def loss(self, x: np.ndarray, y: np.ndarray) -> float:
        return head_loss(self.task, self._forward(self._inputs(x, self.n_features))[1], y)

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        z = self._forward(self._inputs(x, self.n_features))[1]
        return head_loss(self.task, z, y), head_predict(self.task, z)
