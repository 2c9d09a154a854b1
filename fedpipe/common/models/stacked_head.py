"""The task heads of :mod:`fedpipe.common.models.base` for K clients at once: pre-activations
with a leading client axis, ``z[k]`` client ``k``'s batch (every client the same batch size).

Each client's loss and gradient are those of :func:`~fedpipe.common.models.base.
head_loss_and_gradient` on its own slice, bit for bit: the same numpy operations, reduced
along the same contiguous axes, so the stacked simulation matches the client-by-client one.
"""

from __future__ import annotations

import numpy as np

from fedpipe.common.models.base import _sigmoid, _targets

__all__ = ["stacked_head_loss_and_gradient"]


def stacked_head_loss_and_gradient(
    task: str, z: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each client's mean loss (float64, shape ``(K,)``) and the gradient of its mean loss
    w.r.t. its ``z`` (``z``: ``(K, n, k)``, or ``(K, n)`` logits for binary; ``y``: ``(K, n,
    ...)``). Raises ValueError on targets the head cannot take (as the one-client head)."""
    n_clients, n = z.shape[0], z.shape[1]
    flat_z = z.reshape(n_clients * n, *z.shape[2:])
    t = _targets(task, y.reshape(n_clients * n, *y.shape[2:]), flat_z).reshape(
        z.shape[:2] + (z.shape[2:] if task == "regression" else ())
    )
    per = max(n, 1)
    if task == "regression":
        residual = z - t
        size = residual[0].size
        if not size:
            return np.zeros(n_clients), residual
        means = np.mean(residual**2, axis=(1, 2)).astype(np.float64)
        return 0.5 * means, residual / max(size, 1)
    if task == "binary":
        sums = np.add.reduce(np.logaddexp(0.0, z) - t * z, axis=1).astype(np.float64)
        return sums / per, (_sigmoid(z) - t) / per
    shifted = z - np.maximum.reduce(z, axis=2, keepdims=True)
    log_p = shifted - np.log(np.add.reduce(np.exp(shifted), axis=2, keepdims=True))
    clients, rows = np.arange(n_clients)[:, None], np.arange(n)[None, :]
    losses = -np.add.reduce(log_p[clients, rows, t], axis=1).astype(np.float64) / per
    grad = np.exp(log_p)
    grad[clients, rows, t] -= 1.0
    grad /= per
    return losses, grad
