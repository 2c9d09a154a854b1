"""Linear models: one affine layer ``z = x @ kernel + bias`` under a task head."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from fedpipe.common.models.base import (
    Model,
    head_loss,
    head_loss_and_gradient,
    head_predict,
)
from fedpipe.common.models.stacked_head import stacked_head_loss_and_gradient
from fedpipe.common.vector import Vector

__all__ = ["LinearRegression", "LogisticRegression", "SoftmaxRegression"]

#: Standard deviation of the initial kernel; small so that training starts near the origin.
INIT_SCALE = 0.01


#: Rows of the kernel drawn at a time: bounds the float64 temporaries of a large model's init.
_INIT_BLOCK_ELEMENTS = 1 << 22


def _scaled_normal(
    rng: np.random.Generator, shape: tuple[int, ...], scale: float, dtype: str
) -> np.ndarray:
    """``(rng.standard_normal(shape) * scale).astype(dtype)``, the same values, drawn in blocks
    of rows so that a 100M-parameter kernel does not need 1.6 GB of float64 temporaries."""
    out = np.empty(shape, dtype=dtype)
    rows = out.reshape(shape[0], -1)
    step = max(1, _INIT_BLOCK_ELEMENTS // max(rows.shape[1], 1))
    for start in range(0, rows.shape[0], step):
        block = rng.standard_normal((min(step, rows.shape[0] - start), rows.shape[1]))
        block *= scale
        rows[start : start + len(block)] = block
    return out


class _AffineModel(Model):
    """``z = x @ kernel + bias`` followed by the head of ``task``."""

    def __init__(
        self, n_features: int, n_outputs: int | None, dtype: str, seed: int | None
    ) -> None:
        if n_features < 1:
            raise ValueError(f"n_features={n_features}; expected at least 1")
        self.n_features = n_features
        self.seed = seed
        rng = np.random.default_rng(seed)
        kernel_shape = (n_features,) if n_outputs is None else (n_features, n_outputs)
        bias_shape = (1,) if n_outputs is None else (n_outputs,)
        self._weights = {
            "kernel": _scaled_normal(rng, kernel_shape, INIT_SCALE, dtype),
            "bias": np.zeros(bias_shape, dtype=dtype),
        }

    def _logits(self, x: np.ndarray) -> np.ndarray:
        return x @ self._weights["kernel"] + self._weights["bias"]

    def compute_batch_gradients(self, x: np.ndarray, y: np.ndarray) -> tuple[Vector, float]:
        x = self._inputs(x, self.n_features)
        loss, dz = head_loss_and_gradient(self.task, self._logits(x), y)
        kernel, bias = self._weights["kernel"], self._weights["bias"]
        grads = {
            "kernel": (x.T @ dz).astype(kernel.dtype, copy=False),
            "bias": np.add.reduce(dz, axis=0).reshape(bias.shape).astype(bias.dtype, copy=False),
        }
        return Vector.of_numpy(grads), loss

    def compute_stacked_gradients(
        self, weights: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """K clients at once (see :meth:`Model.compute_stacked_gradients`): batched matmuls,
        bit-equal to :meth:`compute_batch_gradients` client by client."""
        x = self._stacked_inputs(x, self.n_features)
        kernel, bias = weights["kernel"], weights["bias"]
        one = kernel.ndim == 2  # one output (logistic regression): kernel (K, d)
        z = (x @ kernel[:, :, None])[..., 0] if one else x @ kernel
        z += bias if one else bias[:, None, :]
        losses, dz = stacked_head_loss_and_gradient(self.task, z, y)
        x_t = np.swapaxes(x, 1, 2)
        grads = {
            "kernel": (x_t @ dz[..., None])[..., 0] if one else x_t @ dz,
            "bias": np.add.reduce(dz, axis=1).reshape(bias.shape),
        }
        return {k: g.astype(self.dtype, copy=False) for k, g in grads.items()}, losses

    def compute_sample_gradients(self, x: np.ndarray, y: np.ndarray) -> tuple[Vector, float]:
        """Per-sample gradients in closed form: sample ``i``'s kernel gradient is ``x_i``
        times its own ``dz_i`` (``n`` times its share of the mean loss's gradient)."""
        x = self._inputs(x, self.n_features)
        loss, dz = head_loss_and_gradient(self.task, self._logits(x), y)
        own = dz * len(x)
        if own.ndim == 1:  # one output (logistic regression): kernel (d,), bias (1,)
            grads = {"kernel": x * own[:, None], "bias": own[:, None]}
        else:
            grads = {"kernel": np.einsum("ni,nk->nik", x, own), "bias": own}
        return Vector({k: g.astype(self.dtype, copy=False) for k, g in grads.items()}), loss

    def predict(self, x: np.ndarray) -> np.ndarray:
        return head_predict(self.task, self._logits(self._inputs(x, self.n_features)))

    def loss(self, x: np.ndarray, y: np.ndarray) -> float:
        return head_loss(self.task, self._logits(self._inputs(x, self.n_features)), y)

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        z = self._logits(self._inputs(x, self.n_features))
        return head_loss(self.task, z, y), head_predict(self.task, z)


class LinearRegression(_AffineModel):
    """Least-squares linear regression.

    The loss is ``0.5 * mean((prediction - y) ** 2)`` over samples and outputs: half the MSE,
    so that its gradient is the mean residual.

    Parameters
    ----------
    n_features:
        Number of input features.
    n_outputs:
        Number of regression targets; with 1, :meth:`predict` returns shape ``(n,)``.
    dtype:
        Weight dtype (inputs are cast to it).
    seed:
        Seed of the random initial kernel (``N(0, 0.01^2)``; bias starts at 0).
    """

    name: ClassVar[str] = "linear-regression"
    task = "regression"

    def __init__(
        self, n_features: int, n_outputs: int = 1, dtype: str = "float32", seed: int | None = 0
    ) -> None:
        if n_outputs < 1:
            raise ValueError(f"n_outputs={n_outputs}; expected at least 1")
        self.n_outputs = n_outputs
        super().__init__(n_features, n_outputs, dtype, seed)

    def get_config(self) -> dict[str, Any]:
        return {
            "n_features": self.n_features,
            "n_outputs": self.n_outputs,
            "dtype": self.dtype.name,
            "seed": self.seed,
        }


class LogisticRegression(_AffineModel):
    """Binary logistic regression, trained on the (numerically stable) binary cross-entropy.

    Targets are 0/1; :meth:`predict` returns the probability of class 1, shape ``(n,)``.
    Weights: ``kernel`` of shape ``(n_features,)`` and ``bias`` of shape ``(1,)``.
    """

    name: ClassVar[str] = "logistic-regression"
    task = "binary"

    def __init__(self, n_features: int, dtype: str = "float32", seed: int | None = 0) -> None:
        super().__init__(n_features, None, dtype, seed)

    def get_config(self) -> dict[str, Any]:
        return {"n_features": self.n_features, "dtype": self.dtype.name, "seed": self.seed}


class SoftmaxRegression(_AffineModel):
    """Multinomial logistic regression: softmax over ``n_classes`` with cross-entropy loss.

    Targets are integer class ids in ``[0, n_classes)``; :meth:`predict` returns class
    probabilities of shape ``(n, n_classes)``.
    """

    name: ClassVar[str] = "softmax-regression"
    task = "multiclass"

    def __init__(
        self, n_features: int, n_classes: int, dtype: str = "float32", seed: int | None = 0
    ) -> None:
        if n_classes < 2:
            raise ValueError(f"n_classes={n_classes}; expected at least 2")
        self.n_classes = n_classes
        super().__init__(n_features, n_classes, dtype, seed)

    def get_config(self) -> dict[str, Any]:
        return {
            "n_features": self.n_features,
            "n_classes": self.n_classes,
            "dtype": self.dtype.name,
            "seed": self.seed,
        }
