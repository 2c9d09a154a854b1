"""The client-side optimizers of K clients, applied to their stacked gradients.

:class:`~fedpipe.common.vectorized.VectorizedTrainer` computes the gradients of K clients at
once (a leading client axis on every tensor); this is the one place where each client's own
:class:`~fedpipe.common.optim.Optimizer` (regularizers, module pipeline, weight decay,
learning rate) turns its slice into updates.

**Stacked** (the default): the pipeline runs inside ``torch.func.vmap``. Every tensor of the
clients' optimizer states (momentum buffers, Adam moments, FedProx anchors: the Vectors of
``get_state()``, float32 module states for a half-precision model) is stacked on the client
axis; at each step one template optimizer gets a client's slice with ``set_state``, runs
``compute_updates`` on torch Vectors, and gives the new slice back with ``get_state``, for all
clients at once. The plain values of the states (step counters, ``None`` before a first step)
are each client's own: at each step the clients are **grouped by equal plain values** and each
group is one vmapped call on its rows (a client alone in its group, a plain call on its rows:
one vmapped call costs several plain ones). One call for clients that started equal and took
the same number of steps; after a round of clients of different sizes, or with clients that
never trained next to ones that did, one call per distinct plain state at that step (until
every client's step count is its own, which partial participation over many rounds tends to:
then as many calls as client by client). A tensor that some clients' states hold and others' do
not (Adam's moments before a first step) is stacked for all, zeros where a client has none,
which its plain values never read. The learning rate is each client's own (its own step count,
scheduler included). Per-client norms (clipping) are per client inside vmap
(``Vector.clip_norm``), but a module that turns a tensor into a Python number (``float(norm)``,
``if norm > c``) cannot run there.

**Client by client** otherwise, through each client's own ``compute_updates`` on Vector views
of its slice, with one log line saying why: a module that cannot run inside vmap (named),
that exchanges auxiliary variables (Scaffold), or that draws random numbers (each client its
own noise).
"""

from __future__ import annotations

import copy
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.func import vmap

from fedpipe.common.modules.base import OptiModule
from fedpipe.common.optim import Optimizer
from fedpipe.common.regularizers.base import Regularizer
from fedpipe.common.state import State, copy_state
from fedpipe.common.vector import Vector

__all__ = ["ClientOptimizers"]

Tensors = dict[str, torch.Tensor]


class _Slot:
    """Where a Vector of a state sits in the flattened leaves: ``key/name`` per array."""

    def __init__(self, key: str, names: tuple[str, ...]) -> None:
        self.key, self.names = key, names

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Slot) and (self.key, self.names) == (other.key, other.names)

    def __hash__(self) -> int:
        return hash((self.key, self.names))


def _flatten(value: Any, key: str, leaves: Tensors) -> Any:
    """The state with every Vector replaced by a :class:`_Slot`, its arrays put in ``leaves``."""
    if isinstance(value, Vector):
        for name, array in value.coefs.items():
            leaves[f"{key}/{name}"] = torch.as_tensor(array)
        return _Slot(key, tuple(value.coefs))
    if isinstance(value, dict):
        return {k: _flatten(v, f"{key}/{k}", leaves) for k, v in value.items()}
    if isinstance(value, list):
        return [_flatten(v, f"{key}/{i}", leaves) for i, v in enumerate(value)]
    return value


def _unflatten(skeleton: Any, leaves: Tensors) -> Any:
    if isinstance(skeleton, _Slot):
        return Vector({name: leaves[f"{skeleton.key}/{name}"] for name in skeleton.names})
    if isinstance(skeleton, dict):
        return {k: _unflatten(v, leaves) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [_unflatten(v, leaves) for v in skeleton]
    return skeleton


class _ClientWeights:
    """A client's weights as its optimizer sees them in :class:`LocalTrainer`'s training: in
    the model's dtypes. Not :class:`~fedpipe.common.optim.BareWeights`, the server's, whose
    regularizers and weight decay see a float32 master copy of half-precision weights (a
    bfloat16 FedProx anchor minus float32 weights is refused)."""

    def __init__(self, weights: Vector) -> None:
        self.weights = weights

    def get_weights(self, copy: bool = False) -> Vector:
        return self.weights.copy() if copy else self.weights

    def apply_updates(self, updates: Vector) -> None:
        self.weights.add_(updates)


def _pipeline_state(optimizer: Optimizer) -> State:
    """The optimizer's state less its step count (the learning rate is applied per client)."""
    return {k: v for k, v in optimizer.get_state().items() if k != "step"}


def _static_reason(optimizers: Sequence[Optimizer]) -> str | None:
    first = optimizers[0]
    for part in [*first.modules, *first.regularizers]:
        if getattr(part, "aux_name", None) is not None:
            return f"module {part.name} exchanges auxiliary variables"
        if hasattr(part, "rng"):
            return f"module {part.name} draws random numbers (each client its own)"
    return None


def _key(skeleton: Any) -> Any:
    """A hashable value equal for equal skeletons (types kept apart: ``1``, ``1.0``, ``True``);
    a value that has no hash (a user module's) is equal only to itself."""
    if isinstance(skeleton, dict):
        return ("dict", tuple((k, _key(v)) for k, v in skeleton.items()))
    if isinstance(skeleton, (list, tuple)):
        return (type(skeleton).__name__, tuple(_key(v) for v in skeleton))
    if isinstance(skeleton, np.ndarray):
        return ("array", skeleton.dtype.str, skeleton.shape, skeleton.tobytes())
    if isinstance(skeleton, float) and skeleton != skeleton:
        return ("nan",)
    try:
        hash(skeleton)
    except TypeError:  # kept alive in ClientOptimizers.skeletons: its id is its own
        return ("object", id(skeleton))
    return (type(skeleton).__name__, skeleton)


def _culprit(exc: BaseException) -> str:
    """The module or regularizer in whose code ``exc`` was raised (the innermost one)."""
    name = "the optimizer"
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        owner = frame.f_locals.get("self")
        if isinstance(owner, (OptiModule, Regularizer)):
            name = f"module {owner.name}"
    return name


class ClientOptimizers:
    """The optimizers of the K clients of a chunk, by position on the client axis.

    Parameters
    ----------
    optimizers:
        Each client's own optimizer, round already started (aux vars processed).
    params:
        The stacked weights ``[K, ...]`` (their device and shapes; not changed here).

    ``reason`` is None when the pipeline runs stacked, else why it runs client by client.
    Stacked, client ``k``'s state is row ``k`` of every stacked tensor (:attr:`leaves`) and
    its plain values, ``skeletons[plain[k]]``; the clients of a step are grouped by
    ``plain[k]``, one vmapped call per group (a plain call for a group of one).
    """

    def __init__(self, optimizers: Sequence[Optimizer], params: Tensors) -> None:
        self.optimizers = list(optimizers)
        self.reason = _static_reason(self.optimizers)
        self.leaves: Tensors = {}
        self.skeletons: list[Any] = []  # the distinct plain states met, by number
        self._numbers: dict[Any, int] = {}  # a skeleton's _key: its number
        self.plain: list[int] = []  # each client's plain state now: a skeleton's number
        self._out: Any = None
        self._steps = [optimizer.step for optimizer in self.optimizers]  # see restore()
        self._saved: list[State] | None = None
        #: No module and no regularizer: no state but the step counts, which updates() moves
        #: (nothing to flatten per client, nothing to give back in finish()).
        self.stateless = not self.optimizers[0].modules and not self.optimizers[0].regularizers
        if self.reason is not None:
            return
        self.template = copy.deepcopy(self.optimizers[0])  # user modules need no registry name
        self.template.lrate = 1.0
        if self.stateless:
            plain = self._number(_flatten(_pipeline_state(self.optimizers[0]), "", {}))
            self.plain = [plain] * len(self.optimizers)
            return
        per_client: list[Tensors] = [{} for _ in self.optimizers]
        for optimizer, leaves in zip(self.optimizers, per_client, strict=True):
            skeleton = _flatten(_pipeline_state(optimizer), "", leaves)
            self.plain.append(self._number(skeleton))
        self.leaves = _stacked(per_client, next(iter(params.values())).device)
        self.reason = self._probe(params)

    def _number(self, skeleton: Any) -> int:
        """The number of ``skeleton`` in :attr:`skeletons` (added when new)."""
        key = _key(skeleton)
        if key not in self._numbers:
            self._numbers[key] = len(self.skeletons)
            self.skeletons.append(skeleton)
        return self._numbers[key]

    def _probe(self, params: Tensors) -> str | None:
        """Two pipeline steps on zero gradients, on copies of client 0's state: does the
        pipeline run in vmap?"""
        leaves = {k: v[:1].clone() for k, v in self.leaves.items()}
        weights = {n: p[:1].clone() for n, p in params.items()}
        skeleton = self.skeletons[self.plain[0]]
        try:
            for _ in range(2):
                grads = {n: torch.zeros_like(w) for n, w in weights.items()}
                _, leaves = vmap(self._run_fn(skeleton))(grads, weights, leaves)
                skeleton = self._out
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            return f"{_culprit(exc)} cannot run inside torch.func.vmap ({first})"
        return None

    def _run_fn(self, skeleton: Any) -> Any:
        def run(grads: Tensors, params: Tensors, leaves: Tensors) -> tuple[Tensors, Tensors]:
            self.template.set_state({**_unflatten(skeleton, leaves), "step": 0})
            model = _ClientWeights(Vector(params))
            updates = self.template.compute_updates(model, Vector(grads), consume=True)
            new_leaves: Tensors = {}
            self._out = _flatten(_pipeline_state(self.template), "", new_leaves)
            return dict(updates.coefs), new_leaves

        return run

    def updates(
        self, members: Sequence[int], sel: torch.Tensor, grads: Tensors, params: Tensors
    ) -> Tensors:
        """A step of the clients at positions ``members`` (``sel``: the same positions on
        the device): their updates (to add to ``params``), from ``grads[name][i]`` and
        ``params[name][i]`` of ``members[i]``."""
        if self.reason is not None:
            return self._client_by_client(members, grads, params)
        rates = [self.optimizers[k].learning_rate() for k in members]
        for k in members:
            self.optimizers[k].step += 1
        groups: dict[int, list[int]] = {}
        for i, k in enumerate(members):
            groups.setdefault(self.plain[k], []).append(i)
        if len(groups) == 1:
            updates = self._group(members, sel, grads, params)
        else:
            updates = self._by_group(members, sel, list(groups.values()), grads, params)
        return _scaled(updates, rates)

    def _by_group(
        self,
        members: Sequence[int],
        sel: torch.Tensor,
        groups: list[list[int]],
        grads: Tensors,
        params: Tensors,
    ) -> Tensors:
        """The updates of ``members``, one vmapped call per group of positions ``i`` in
        ``members`` (clients of equal plain state), in ``members`` order."""
        updates: Tensors = {}
        for rows in groups:
            at = torch.tensor(rows, dtype=torch.int64).to(sel.device, non_blocking=True)
            done = self._group(
                [members[i] for i in rows],
                sel.index_select(0, at),
                {n: g.index_select(0, at) for n, g in grads.items()},
                {n: p.index_select(0, at) for n, p in params.items()},
            )
            for name, value in done.items():
                if name not in updates:
                    updates[name] = value.new_empty((len(members), *value.shape[1:]))
                updates[name].index_copy_(0, at, value)
        return updates

    def _group(
        self, members: Sequence[int], sel: torch.Tensor, grads: Tensors, params: Tensors
    ) -> Tensors:
        """One pipeline step of ``members``, all of one plain state, vmapped (one client alone
        runs it on its rows: vmap's cost per call is several plain calls'): their updates at
        a learning rate of 1; their rows of :attr:`leaves` and their plain state move on."""
        everyone = len(members) == len(self.optimizers)
        mine = (
            self.leaves if everyone else {k: v.index_select(0, sel) for k, v in self.leaves.items()}
        )
        run = self._run_fn(self.skeletons[self.plain[members[0]]])
        updates, new = (vmap(run) if len(members) > 1 else _alone(run))(grads, params, mine)
        after = self._number(self._out)
        for k in members:
            self.plain[k] = after
        for key, value in new.items():
            if everyone:
                self.leaves[key] = value
            else:
                if key not in self.leaves:
                    shape = (len(self.optimizers), *value.shape[1:])
                    self.leaves[key] = value.new_zeros(shape)
                self.leaves[key].index_copy_(0, sel, value)
        return updates

    def _client_by_client(self, members: Sequence[int], grads: Tensors, params: Tensors) -> Tensors:
        if self._saved is None:  # before the first step changes them: see restore()
            self._saved = [copy_state(optimizer.get_state()) for optimizer in self.optimizers]
        outs: dict[str, list[torch.Tensor]] = {name: [] for name in grads}
        for i, k in enumerate(members):
            optimizer = self.optimizers[k]
            gradients = Vector({n: g[i] for n, g in grads.items()})
            weights = _ClientWeights(Vector({n: p[i] for n, p in params.items()}))
            result = optimizer.compute_updates(weights, gradients, consume=True)
            for name, out in outs.items():
                out.append(torch.as_tensor(result[name]).to(grads[name].device))
        return {name: torch.stack(out) for name, out in outs.items()}

    def restore(self) -> None:
        """Put every optimizer back as it was before the first step (a failed chunk, whose
        clients are then trained again one by one): the stacked pipeline only moved the step
        counts; client by client, the states are restored from their copies."""
        if self._saved is not None:
            for optimizer, state in zip(self.optimizers, self._saved, strict=True):
                optimizer.set_state(state)
            return
        for optimizer, step in zip(self.optimizers, self._steps, strict=True):
            optimizer.step = step

    def finish(self) -> None:
        """Give each client its slice of the stacked state and its own plain values."""
        if self.reason is not None or self.stateless:
            return
        for k, optimizer in enumerate(self.optimizers):
            skeleton = self.skeletons[self.plain[k]]
            mine = {key: value[k].clone() for key, value in self.leaves.items()}
            optimizer.set_state({**_unflatten(skeleton, mine), "step": optimizer.step})


def _alone(run: Any) -> Any:
    """``run`` (of :meth:`ClientOptimizers._run_fn`) on stacks of one row, without vmap."""

    def on_row(grads: Tensors, params: Tensors, leaves: Tensors) -> tuple[Tensors, Tensors]:
        rows = run(*({k: v[0] for k, v in d.items()} for d in (grads, params, leaves)))
        updates, new = ({k: v.unsqueeze(0) for k, v in d.items()} for d in rows)
        return updates, new

    return on_row


def _stacked(per_client: list[Tensors], device: torch.device) -> Tensors:
    """Each key's tensors of ``per_client`` stacked on a client axis on ``device``; zeros for
    a client without it (a fresh state next to trained ones: its plain values never read it)."""
    keys = dict.fromkeys(key for leaves in per_client for key in leaves)
    stacked: Tensors = {}
    for key in keys:
        have = [k for k, leaves in enumerate(per_client) if key in leaves]
        rows = torch.stack([per_client[k][key] for k in have]).to(device)
        if len(have) < len(per_client):
            at = torch.tensor(have, dtype=torch.int64, device=device)
            rows = rows.new_zeros((len(per_client), *rows.shape[1:])).index_copy_(0, at, rows)
        stacked[key] = rows
    return stacked


def _scaled(updates: Tensors, rates: list[float]) -> Tensors:
    """``updates[i] * rates[i]`` (the template's updates are ``-g``: a rate of 1), rounded
    once, as a Python float rate multiplies: half-precision updates by float32 rates, not
    by rates rounded to their own dtype first."""
    if len(set(rates)) == 1:
        return {n: u.mul_(rates[0]) for n, u in updates.items()}
    any_update = next(iter(updates.values()))
    dtype = torch.promote_types(any_update.dtype, torch.float32)
    column = torch.tensor(rates, dtype=dtype, device=any_update.device)
    return {n: u.mul_(column.view(-1, *([1] * (u.dim() - 1)))) for n, u in updates.items()}
