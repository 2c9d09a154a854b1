"""The client-side optimizer of K clients, applied to their stacked gradients.

:class:`~fedpipe.common.vectorized.VectorizedTrainer` computes the gradients of K clients at
once (a leading client axis on every tensor); this is the one place where each client's own
:class:`~fedpipe.common.optim.Optimizer` (regularizers, module pipeline, weight decay, learning
rate) turns its slice into updates, so that the maths stays the optimizer's own.

Two ways, chosen per round:

- plain SGD (no module, no regularizer, no weight decay, a constant rate): ``-lr * g`` on
  the stacked tensors, in one operation for all clients;
- anything else: client by client, through ``optimizer.compute_updates`` on
  :class:`~fedpipe.common.vector.Vector` views of the client's slice. Running the modules
  inside ``torch.func.vmap`` (each client's module state a slice of stacked state) needs a
  Vector that holds torch tensors; until it does, :func:`module_pipeline_reason` says so in
  the one log line of the engine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedpipe.common.optim import BareWeights, Optimizer
from fedpipe.common.vector import Vector

__all__ = ["ClientOptimizers", "module_pipeline_reason"]

Tensors = dict[str, torch.Tensor]


def _is_plain_sgd(optimizer: Optimizer) -> bool:
    return (
        not optimizer.modules
        and not optimizer.regularizers
        and optimizer.w_decay == 0.0
        and isinstance(optimizer.lrate, float)
    )


def module_pipeline_reason(optimizers: Sequence[Optimizer]) -> str | None:
    """Why these optimizers run client by client (None: they run on the stacked tensors)."""
    if all(_is_plain_sgd(o) for o in optimizers):
        return None
    first = optimizers[0]
    parts = [m.name for m in first.modules] + [r.name for r in first.regularizers]
    if first.w_decay != 0.0:
        parts.append("w_decay")
    if not isinstance(first.lrate, float):
        parts.append(f"scheduler {first.lrate.name}")
    return (
        f"client optimizer [{', '.join(parts)}] runs client by client: "
        "fedpipe.common.vector.Vector holds numpy arrays only, so the modules cannot run "
        "inside torch.func.vmap"
    )


class ClientOptimizers:
    """The optimizers of the K clients of a chunk, by position on the client axis."""

    def __init__(self, optimizers: Sequence[Optimizer]) -> None:
        self.optimizers = list(optimizers)
        self.stacked = module_pipeline_reason(self.optimizers) is None

    def updates(self, members: Sequence[int], grads: Tensors, params: Tensors) -> Tensors:
        """Updates (to add to ``params``) of the clients at positions ``members``, whose
        gradients and current weights are ``grads[name][i]`` and ``params[name][i]``."""
        if self.stacked:
            return self._sgd(members, grads)
        outs: dict[str, list[torch.Tensor]] = {name: [] for name in grads}
        for i, k in enumerate(members):
            gradients = Vector({n: _host(g[i]) for n, g in grads.items()})
            weights = BareWeights(Vector({n: _host(p[i]) for n, p in params.items()}))
            result = self.optimizers[k].compute_updates(weights, gradients, consume=True)
            for name, out in outs.items():
                out.append(torch.as_tensor(result[name]))
        return {
            name: torch.stack(out).to(grads[name].device, non_blocking=True)
            for name, out in outs.items()
        }

    def _sgd(self, members: Sequence[int], grads: Tensors) -> Tensors:
        rates = [-self.optimizers[k].learning_rate() for k in members]
        for k in members:
            self.optimizers[k].step += 1
        if len(set(rates)) == 1:
            return {n: g.mul_(rates[0]) for n, g in grads.items()}
        any_grad = next(iter(grads.values()))
        column = torch.tensor(rates, dtype=any_grad.dtype, device=any_grad.device)
        return {n: g.mul_(column.view(-1, *([1] * (g.dim() - 1)))) for n, g in grads.items()}


def _host(tensor: torch.Tensor) -> object:
    """A numpy view of a CPU tensor (a copy for a device tensor)."""
    return tensor.detach().cpu().numpy()
