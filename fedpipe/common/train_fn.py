"""A client's own local training function: any training loop in place of fedpipe's.

A client names it in its own config (``train_fn = "mypkg.train:train"``, never the server)::

    def train(module: torch.nn.Module, loader: DataLoader, round_config: dict
              ) -> tuple[int, dict[str, float]]:
        ...  # torch.optim, a Hugging Face Trainer...: update module's parameters in place
        return n_samples, {"loss": mean_training_loss}

A round with a train_fn (:class:`~fedpipe.common.training.LocalTrainer`):

1. the global weights are set into the model's trainable parameters, and copied (``start``);
2. ``train_fn(module, loader, round_config)`` trains the model's ``torch.nn.Module`` (put in
   training mode) in place on the client's train loader (``loaders`` in its config).
   ``round_config`` is plain data: ``round``, ``client``, ``seed`` (this client's seed for
   this round), and the run's ``epochs``, ``max_steps`` and ``batch_size``, for the function
   to honour or not;
3. the update is ``start - end`` over the trainable parameters;
4. the client optimizer's **modules** run once on that update, as if it were one gradient:
   ``update = modules(start - end)``. Clipping bounds its norm, noise is added to it (DP-FedAvg,
   McMahan et al., 2018), momentum carries across rounds. The client optimizer's ``lrate`` is
   the step size of fedpipe's own loop; a train_fn brings its own optimizer and learning rate,
   so ``lrate`` does not scale the update (with no module, it is exactly ``start - end``).
   Regularizers (FedProx), ``w_decay`` and modules that exchange auxiliary variables
   (SCAFFOLD) act on every local step, which fedpipe cannot reach inside a train_fn: a run
   setup with them is refused (implement a proximal term inside the function);
5. the aggregator prepares the update with the returned ``n_samples`` as the client's weight.

The returned metrics must hold ``"loss"``, the mean training loss (the server's
``train_loss``); ``"n_steps"``, if present, is the number of local steps (else epochs times
batches of the loader, capped by ``max_steps``); other metrics are logged by the client.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

from fedpipe.common.optim import Optimizer
from fedpipe.common.plugins import PluginError, import_object

__all__ = ["TrainFn", "check_train_fn_setup", "load_train_fn", "run_train_fn"]

#: ``train(module, loader, round_config) -> (n_samples, metrics)``.
TrainFn: TypeAlias = Callable[[Any, Any, dict[str, Any]], tuple[int, Mapping[str, float]]]


def load_train_fn(path: str) -> TrainFn:
    """The function named by ``path`` (``"package.module:function"``).

    Raises
    ------
    PluginError
        It cannot be imported, or is not callable.
    """
    fn = import_object(path, "train_fn")
    if not callable(fn):
        raise PluginError(f"train_fn {path!r} is a {type(fn).__name__}, not callable")
    return fn  # type: ignore[no-any-return]


def check_train_fn_setup(model: Any, optimizer: Optimizer, model_name: str) -> None:
    """Refuse a run setup a train_fn cannot honour (see the module docstring).

    Raises
    ------
    ValueError
        The model is not a torch model, or the client optimizer has regularizers, weight
        decay or modules exchanging auxiliary variables.
    """
    if getattr(model, "module", None) is None:
        raise ValueError(
            f"this client trains with its own train_fn, which takes a torch.nn.Module; the "
            f"run's model {model_name!r} is a {type(model).__name__}, not a TorchModel"
        )
    per_step = [f"regularizer {r.name!r}" for r in optimizer.regularizers]
    per_step += [f"w_decay={optimizer.w_decay}"] if optimizer.w_decay else []
    per_step += [f"module {m.name!r}" for m in optimizer.modules if m.aux_name is not None]
    if per_step:
        raise ValueError(
            f"the client optimizer has {', '.join(per_step)}, which act(s) on every local "
            "step; this client trains with its own train_fn, where fedpipe runs only the "
            "modules, once on the update: implement it inside the train_fn or drop it from "
            "the server's client_optimizer"
        )


def run_train_fn(
    fn: TrainFn, module: Any, loader: Any, round_config: dict[str, Any]
) -> tuple[int, dict[str, float]]:
    """Call ``fn`` and check what it returned: ``(n_samples, metrics)`` with a finite
    ``metrics["loss"]``.

    Raises
    ------
    ValueError
        The return value is not of that form.
    """
    name = getattr(fn, "__qualname__", repr(fn))
    returned = fn(module, loader, dict(round_config))
    expected = "expected (n_samples: int, metrics: dict with a 'loss')"
    if not isinstance(returned, tuple) or len(returned) != 2:
        raise ValueError(f"train_fn {name} returned {returned!r:.80}; {expected}")
    n_samples, metrics = returned
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"train_fn {name} returned n_samples={n_samples!r}; {expected} >= 1")
    if not isinstance(metrics, Mapping) or "loss" not in metrics:
        raise ValueError(f"train_fn {name} returned metrics {metrics!r:.80}; {expected}")
    try:
        values = {str(k): float(v) for k, v in metrics.items()}
    except (TypeError, ValueError):
        raise ValueError(f"train_fn {name} returned non-numeric metrics {metrics!r:.80}") from None
    if not math.isfinite(values["loss"]):
        raise ValueError(f"train_fn {name} returned loss {values['loss']}; expected a finite one")
    return n_samples, values
