"""The model API: weights as a Vector, batch gradients, predictions, and the loss heads.

A model owns its weights as a dict of numpy arrays. Everything that leaves the model
(``get_weights``, gradients) is a :class:`~fedpipe.common.vector.Vector`; everything that comes
in (``set_weights``, ``apply_updates``) is checked against :meth:`Model.weight_specs` first.

The three task heads shared by the built-in models live here too: given the output layer's
pre-activations ``z``, they compute the mean loss, its gradient w.r.t. ``z`` and predictions.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Literal, SupportsFloat

import numpy as np

from fedpipe.common.data import Dataset
from fedpipe.common.registry import Registrable, declare_family
from fedpipe.common.vector import ArraySpec, Vector, VectorSpecs, dtype_name

__all__ = ["TASKS", "Model", "Task", "head_loss", "head_loss_and_gradient", "head_predict"]

Task = Literal["regression", "binary", "multiclass"]
TASKS: tuple[str, ...] = ("regression", "binary", "multiclass")


@declare_family
class Model(Registrable):
    """A trainable model whose weights are a :class:`Vector`.

    Subclasses fill ``self._weights`` (name -> array) in ``__init__`` (training then changes
    its arrays in place, never their shapes or dtypes) and implement
    :meth:`compute_batch_gradients`, :meth:`predict` and :meth:`loss`.

    ``task`` says what :meth:`predict` returns: ``"regression"`` values of shape ``(n,)`` (one
    output) or ``(n, k)``; ``"binary"`` the probability of class 1, shape ``(n,)``;
    ``"multiclass"`` class probabilities, shape ``(n, k)``. It is a class attribute for models
    with a fixed task and an instance attribute for models configurable per task (``mlp``).
    """

    family: ClassVar[str] = "model"
    name: ClassVar[str]
    task: str

    _weights: dict[str, np.ndarray]
    #: ``(the _weights dict, its specs)``: built on first use, rebuilt if ``_weights`` is
    #: replaced (its arrays change in place only, so their specs do not).
    _spec_cache: tuple[dict[str, np.ndarray], VectorSpecs] | None = None

    # ---- weights ---------------------------------------------------------------------------

    def _cached_specs(self) -> VectorSpecs:
        """The weights' specs, shared (callers do not modify them)."""
        cache = self._spec_cache
        if cache is None or cache[0] is not self._weights:
            cache = self._spec_cache = (self._weights, self._build_specs())
        return cache[1]

    def _build_specs(self) -> VectorSpecs:
        return {
            name: ArraySpec(tuple(int(d) for d in a.shape), dtype_name(a.dtype))
            for name, a in self._weights.items()
        }

    def weight_specs(self) -> VectorSpecs:
        """Names, shapes and dtypes of the weights."""
        return dict(self._cached_specs())

    def get_weights(self, copy: bool = True) -> Vector:
        """The weights: a copy, or with ``copy=False`` a read-only view of the live arrays
        (what optimizers use to read weights at every step without copying the model)."""
        if copy:
            return Vector.of_numpy({name: a.copy() for name, a in self._weights.items()})
        views = {name: a.view() for name, a in self._weights.items()}
        for view in views.values():
            view.flags.writeable = False
        return Vector.of_numpy(views)

    def host_weights(self) -> dict[str, np.ndarray] | None:
        """The live weight arrays, writable, for a receiver to write incoming weights straight
        into (``into`` of :class:`~fedpipe.common.payload.PayloadAssembler`); None where the
        weights are not numpy-readable host memory. ``set_weights`` of these very arrays then
        copies nothing (numpy skips a copy onto the same memory)."""
        return dict(self._weights)

    def set_weights(self, weights: Vector) -> None:
        """Copy ``weights`` into the model; raises ``SpecMismatchError`` on other specs."""
        weights.check_specs(self._cached_specs(), f"weights for model {self.name!r}")
        for name, a in self._weights.items():
            np.copyto(a, weights.coefs[name])

    def apply_updates(self, updates: Vector) -> None:
        """In place: ``weights += updates`` (specs checked)."""
        updates.check_specs(self._cached_specs(), f"updates for model {self.name!r}")
        for name, a in self._weights.items():
            a += updates.coefs[name]

    def get_buffers(self) -> Vector:
        """Copies of the model's floating-point buffers: state that is not trained, such as
        batch-norm statistics (see :mod:`fedpipe.common.buffers`); the built-in models have
        none."""
        return Vector.of_numpy({})

    def set_buffers(self, buffers: Vector) -> None:
        """Copy ``buffers`` into the model; raises ``SpecMismatchError`` on other specs."""
        buffers.check_specs(self.get_buffers().specs(), f"buffers for model {self.name!r}")

    # ---- training and inference ------------------------------------------------------------

    def batches(
        self, data: Dataset, batch_size: int, *, seed: np.random.Generator, drop_remainder: bool
    ) -> Iterator[tuple[Any, Any]]:
        """One epoch of ``data`` in batches shuffled by ``seed``, as
        :meth:`compute_batch_gradients` takes them (here: ``Dataset.batches``' numpy arrays;
        a torch model draws them on its device)."""
        return data.batches(batch_size, shuffle=True, seed=seed, drop_remainder=drop_remainder)

    @abstractmethod
    def compute_batch_gradients(self, x: np.ndarray, y: np.ndarray) -> tuple[Vector, SupportsFloat]:
        """Gradients of the mean loss over the batch w.r.t. the weights, and that mean loss
        (a float, or a 0-d tensor left on the model's device: the trainer adds the losses up
        there and reads the sum once per round, so that no batch waits for the device)."""

    def compute_sample_gradients(
        self, x: np.ndarray, y: np.ndarray
    ) -> tuple[Vector, SupportsFloat]:
        """Per-sample gradients, each array with a leading sample axis (row ``i``: the
        gradient of sample ``i``'s own loss), and the mean loss: what DP-SGD clips sample by
        sample (Abadi et al. 2016). This default loops over the samples, one batch of one at
        a time; the built-in models compute them in closed form."""
        rows = [self.compute_batch_gradients(x[i : i + 1], y[i : i + 1]) for i in range(len(x))]
        if not rows:
            stacked = {n: np.zeros((0, *s.shape), s.dtype) for n, s in self.weight_specs().items()}
            return Vector(stacked), 0.0
        stacked = {n: np.stack([g.coefs[n] for g, _ in rows]) for n in self.weight_specs()}
        return Vector(stacked), float(np.mean([float(loss) for _, loss in rows]))

    def compute_stacked_gradients(
        self, weights: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """K clients' batch gradients at once, for the stacked simulation
        (:mod:`fedpipe.common.stacked`): ``weights[name][k]``, ``x[k]`` and ``y[k]`` are
        client ``k``'s weights and batch (every client the same batch size); returns each
        client's gradients (a leading client axis) and mean loss (float64, ``(K,)``), as
        :meth:`compute_batch_gradients` on each slice would. A model opts in by overriding
        this; by default it has no stacked form (its clients train one after another)."""
        raise NotImplementedError(f"model {self.name!r} computes no stacked gradients")

    def _stacked_inputs(self, x: np.ndarray, n_features: int) -> np.ndarray:
        """``x`` as a 3-D ``(K, n, n_features)`` array of the model's dtype."""
        x = np.asarray(x)
        if x.ndim != 3 or x.shape[2] != n_features:
            raise ValueError(
                f"model {self.name!r} expects stacked inputs of shape (K, n, {n_features}), "
                f"got {x.shape}"
            )
        return x.astype(self.dtype, copy=False)

    @abstractmethod
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predictions for ``x`` (see the class docstring for shapes per ``task``)."""

    @abstractmethod
    def loss(self, x: np.ndarray, y: np.ndarray) -> float:
        """Mean loss over the batch."""

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """Mean loss and predictions of a batch; built-in models make one forward pass."""
        return self.loss(x, y), self.predict(x)

    # ---- helpers for subclasses ------------------------------------------------------------

    @property
    def dtype(self) -> np.dtype:
        return next(iter(self._weights.values())).dtype

    def _inputs(self, x: np.ndarray, n_features: int) -> np.ndarray:
        """``x`` as a 2-D array of the model's dtype, with the expected number of features."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != n_features:
            raise ValueError(
                f"model {self.name!r} expects inputs of shape (n, {n_features}), got {x.shape}"
            )
        return x.astype(self.dtype, copy=False)


def _targets(task: str, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Validate ``y`` against the head's outputs ``z`` and return it in computable form."""
    y = np.asarray(y)
    n = z.shape[0]
    if y.shape[:1] != (n,):
        raise ValueError(f"got {y.shape[0] if y.ndim else 'a scalar'} targets for {n} inputs")
    if task == "regression":
        k = z.shape[1]
        if y.ndim == 1 and k == 1:
            y = y[:, None]
        if y.shape != z.shape:
            raise ValueError(f"regression targets have shape {y.shape}, expected (n, {k})")
        return y.astype(z.dtype, copy=False)
    labels = y.reshape(n) if y.ndim == 2 and y.shape[1] == 1 else y
    if labels.ndim != 1:
        raise ValueError(f"classification targets must be class ids of shape (n,), got {y.shape}")
    ids = labels.astype(np.int64, copy=False)
    n_classes = 2 if task == "binary" else z.shape[1]
    whole = labels.dtype.kind in "iub" or bool((ids == labels).all())
    if not whole or (n and (ids.min() < 0 or ids.max() >= n_classes)):
        raise ValueError(f"{task} targets must be integer class ids in [0, {n_classes - 1}]")
    return ids.astype(z.dtype) if task == "binary" else ids


def head_loss_and_gradient(task: str, z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean loss of pre-activations ``z`` against targets ``y``, and its gradient w.r.t. ``z``.

    ``z`` is ``(n, k)`` for regression and multiclass, ``(n,)`` (logits) for binary.

    - regression: ``0.5 * mean((z - y) ** 2)``, the mean over samples *and* outputs; the 0.5
      makes the gradient the plain residual (divided by the element count).
    - binary: cross-entropy of ``sigmoid(z)``, computed as ``logaddexp(0, z) - y * z``, which
      neither overflows nor takes ``log(0)``.
    - multiclass: cross-entropy of ``softmax(z)`` with labels as class ids, via a max-shifted
      log-sum-exp.
    """
    t = _targets(task, y, z)
    n = max(z.shape[0], 1)
    if task == "regression":
        residual = z - t
        loss = 0.5 * float(np.mean(residual**2)) if residual.size else 0.0
        return loss, residual / max(residual.size, 1)
    if task == "binary":
        loss = float(np.sum(np.logaddexp(0.0, z) - t * z)) / n
        return loss, (_sigmoid(z) - t) / n
    log_p = _log_softmax(z)
    rows = np.arange(z.shape[0])
    loss = -float(np.add.reduce(log_p[rows, t])) / n
    grad = np.exp(log_p)
    grad[rows, t] -= 1.0
    grad /= n
    return loss, grad


def head_loss(task: str, z: np.ndarray, y: np.ndarray) -> float:
    """Mean loss only (see :func:`head_loss_and_gradient`)."""
    t = _targets(task, y, z)
    n = max(z.shape[0], 1)
    if task == "regression":
        return 0.5 * float(np.mean((z - t) ** 2)) if z.size else 0.0
    if task == "binary":
        return float(np.sum(np.logaddexp(0.0, z) - t * z)) / n
    return -float(np.sum(_log_softmax(z)[np.arange(z.shape[0]), t])) / n


def head_predict(task: str, z: np.ndarray) -> np.ndarray:
    """Predictions from pre-activations: values, P(class 1), or class probabilities."""
    if task == "regression":
        return z[:, 0] if z.shape[1] == 1 else z
    if task == "binary":
        return _sigmoid(z)
    return np.exp(_log_softmax(z))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # exp(-logaddexp(0, -z)) == 1 / (1 + exp(-z)) without overflow for large |z|
    return np.exp(-np.logaddexp(0.0, -z))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    # the ufuncs' reductions themselves (what z.max and np.sum call, through Python wrappers)
    shifted = z - np.maximum.reduce(z, axis=1, keepdims=True)
    return shifted - np.log(np.add.reduce(np.exp(shifted), axis=1, keepdims=True))
