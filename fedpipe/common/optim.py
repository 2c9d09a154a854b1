"""The optimizer: regularizers, a pipeline of modules, a learning rate and weight decay.

Clients use it to turn loss gradients into weight updates. The server holds one too, with the
aggregated client updates (start minus end weights, i.e. pseudo-gradients) as its gradients:
``lrate=1`` with no module is FedAvg (McMahan et al., 2017), and the ``adam``, ``yogi``,
``adagrad`` and ``momentum`` modules give FedAdam, FedYogi, FedAdagrad and FedAvgM (Reddi et
al., 2021, "Adaptive Federated Optimization"; Hsu et al., 2019).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, Self

from fedpipe.common.modules.base import AuxVarError, OptiModule
from fedpipe.common.registry import build_spec, spec_of
from fedpipe.common.regularizers.base import Regularizer
from fedpipe.common.schedulers.base import Scheduler
from fedpipe.common.state import State, StateValue
from fedpipe.common.summable import Summable
from fedpipe.common.vector import Vector, VectorSpecs

__all__ = ["BareWeights", "Optimizer", "TrainableModel"]


class TrainableModel(Protocol):
    """What the optimizer needs from a model."""

    def get_weights(self, copy: bool = ...) -> Vector: ...

    def apply_updates(self, updates: Vector) -> None: ...


class BareWeights:
    """Weights with nothing around them: what the server steps with its optimizer.

    Takes ownership of ``weights``: updates are added in place, so a server never holds two
    copies of the global model. Half-precision weights (float16, bfloat16) are the exception:
    the optimizer steps a float32 :attr:`master` copy of them (Micikevicius et al., 2018,
    "Mixed Precision Training"), so that server steps below half an ulp of a weight add up over
    rounds instead of rounding away (a bfloat16 weight of 0.1 ignores any step below 2.5e-4,
    FedAdam's steps are about its learning rate). The server optimizer's state takes the
    master's dtypes (float32 Adam moments). :attr:`weights`, what clients receive and files
    hold, is the master rounded to the model's dtypes once per step.
    """

    def __init__(self, weights: Vector) -> None:
        #: The model's specs: the dtypes of :attr:`weights`.
        self.specs = weights.specs()
        self._master = weights.widened()
        self._weights: Vector | None = weights

    @property
    def master(self) -> Vector:
        """The weights the optimizer steps: :attr:`weights` itself, or its float32 copy."""
        return self._master

    @master.setter
    def master(self, master: Vector) -> None:
        master.check_specs(self._master.specs(), "master weights")
        self._master = master
        self._weights = master if master.specs() == self.specs else None

    @property
    def weights(self) -> Vector:
        """The global weights in the model's dtypes."""
        if self._weights is None:
            self._weights = self._master.astype(self.specs)
        return self._weights

    def get_weights(self, copy: bool = False) -> Vector:
        return self._master.copy() if copy else self._master

    def apply_updates(self, updates: Vector) -> None:
        self._master.add_(updates)
        if self._weights is not self._master:
            self._weights = None


class Optimizer:
    """Turns gradients into weight updates.

    Each step computes ``g = gradients + sum of the regularizers' penalty gradients`` (at the
    current weights), runs ``g`` through the modules in order, and returns the updates
    ``-lr * (g + w_decay * weights)``. The weight decay is decoupled from the gradients
    (Loshchilov & Hutter, 2019, "Decoupled Weight Decay Regularization") and scaled by the
    learning rate as torch's ``AdamW`` does; L2-coupled decay is the ``ridge`` regularizer.

    Parameters
    ----------
    lrate:
        Learning rate: a number, or a scheduler (instance, name or ``[name, config]``) that
        maps the optimizer's step count (0 at the first step) to a rate.
    w_decay:
        Decoupled weight decay coefficient (non-negative).
    regularizers:
        Regularizers (instances, names or ``[name, config]`` pairs).
    modules:
        The module pipeline (instances, names or ``[name, config]`` pairs), run in order.
    """

    def __init__(
        self,
        lrate: float | Scheduler | str | Sequence[Any] = 0.01,
        w_decay: float = 0.0,
        regularizers: Sequence[Any] = (),
        modules: Sequence[Any] = (),
    ) -> None:
        if isinstance(lrate, (int, float)) and not isinstance(lrate, bool):
            self.lrate: float | Scheduler = float(lrate)
        else:
            self.lrate = build_spec("scheduler", lrate)
        if not w_decay >= 0:
            raise ValueError(f"w_decay={w_decay}; expected a non-negative number")
        self.w_decay = float(w_decay)
        self.regularizers: list[Regularizer] = [
            build_spec("regularizer", spec) for spec in regularizers
        ]
        self.modules: list[OptiModule] = [build_spec("module", spec) for spec in modules]
        self._aux_modules: dict[str, OptiModule] = {}
        for module in self.modules:
            if module.aux_name is None:
                continue
            if module.aux_name in self._aux_modules:
                raise ValueError(
                    f"modules {self._aux_modules[module.aux_name].name!r} and {module.name!r} "
                    f"both use aux-var name {module.aux_name!r}; keep only one of them"
                )
            self._aux_modules[module.aux_name] = module
        self.step = 0

    # ---- configuration ---------------------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        """The constructor's arguments as plain data (``[name, config]`` pairs)."""
        return {
            "lrate": self.lrate if isinstance(self.lrate, float) else spec_of(self.lrate),
            "w_decay": self.w_decay,
            "regularizers": [spec_of(r) for r in self.regularizers],
            "modules": [spec_of(m) for m in self.modules],
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        try:
            return cls(**dict(config))
        except TypeError as exc:
            raise TypeError(f"invalid optimizer config: {exc}") from exc

    # ---- steps -----------------------------------------------------------------------------

    def learning_rate(self) -> float:
        """The learning rate of the next step."""
        if isinstance(self.lrate, float):
            return self.lrate
        return self.lrate.value(self.step)

    def start_round(self, weights: Vector) -> None:
        """Tell the regularizers a federated round starts from ``weights``."""
        for regularizer in self.regularizers:
            regularizer.on_round_start(weights)

    def compute_updates(
        self, model: TrainableModel, gradients: Vector, *, consume: bool = False
    ) -> Vector:
        """The updates to add to ``model``'s weights for these ``gradients`` (one step).

        With ``consume=True`` the caller hands ``gradients`` over: when no module stands in
        between (module outputs may be their own state), the learning rate is applied in
        place, sparing a model-sized allocation per step.
        """
        needs_weights = bool(self.regularizers) or self.w_decay != 0.0
        # a model may have to copy its weights out (torch): only ask when they are used
        weights = model.get_weights(copy=False) if needs_weights else gradients
        owned = consume
        for regularizer in self.regularizers:
            result = regularizer.run(gradients, weights)
            owned = owned if result is gradients else True  # a penalty adds into a new Vector
            gradients = result
        if self.modules:
            gradients = self.run_modules(gradients)
            owned = False
        if self.w_decay != 0.0:
            gradients = gradients + self.w_decay * weights
            owned = True
        rate = -self.learning_rate()
        updates = gradients.mul_(rate) if owned else gradients * rate
        self.step += 1
        return updates

    def run_modules(self, gradients: Vector) -> Vector:
        """``gradients`` through the module pipeline alone: no regularizer, learning rate or
        weight decay, and no step counted (a client's own training function uses it on its
        round's update).

        Half-precision gradients (float16, bfloat16) go through the modules as float32 and
        come out rounded to their own dtypes, so the modules' state (momentum, Adam's moments)
        is float32 (Micikevicius et al., 2018, "Mixed Precision Training"): in float16, Adam's
        ``eps=1e-8`` is 0 and ``(1 - beta_2) g^2`` underflows, and ``m / (sqrt(v) + eps)``
        turns into inf or NaN. Other dtypes pass through as they are, bit for bit.
        """
        wide = gradients.widened()
        out = wide
        for module in self.modules:
            out = module.run(out)
        return out if wide is gradients else out.astype(gradients.specs())

    def apply(self, model: TrainableModel, gradients: Vector, *, consume: bool = False) -> None:
        """One step: compute the updates and add them to ``model``'s weights."""
        model.apply_updates(self.compute_updates(model, gradients, consume=consume))

    # ---- state -----------------------------------------------------------------------------

    def get_state(self) -> State:
        """Step count and the state of every regularizer and module, by position and name."""
        return {
            "step": self.step,
            "regularizers": [{"name": r.name, "state": r.get_state()} for r in self.regularizers],
            "modules": [{"name": m.name, "state": m.get_state()} for m in self.modules],
        }

    def set_state(self, state: State) -> None:
        """Resume from :meth:`get_state`'s output; the pipeline must be the same."""
        step = state.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"optimizer state 'step' must be a non-negative int, got {step!r}")
        reg_states = _pipeline_states(state, "regularizers", [r.name for r in self.regularizers])
        mod_states = _pipeline_states(state, "modules", [m.name for m in self.modules])
        for regularizer, reg_state in zip(self.regularizers, reg_states, strict=True):
            regularizer.set_state(reg_state)
        for module, mod_state in zip(self.modules, mod_states, strict=True):
            # float32, as run_modules keeps it, for a half-precision state saved before it did
            module.set_state(_mapped(mod_state, Vector.widened))  # type: ignore[arg-type]
        self.step = step

    def place_like(self, like: Vector) -> None:
        """Move every module and regularizer state to ``like``'s backend and device (a torch
        model's GPU, say), once, rather than at every step that would mix them."""
        if like.backend == "numpy":
            return
        parts: list[Regularizer | OptiModule] = [*self.regularizers, *self.modules]
        for part in parts:
            state = part.get_state()
            placed = _mapped(state, lambda vector: vector.like(like))
            if placed is not state:
                part.set_state(placed)  # type: ignore[arg-type]

    def on_state_lost(self) -> None:
        """Tell every module that this fresh state replaces a lost one (see
        :meth:`~fedpipe.common.modules.base.OptiModule.on_state_lost`)."""
        for module in self.modules:
            module.on_state_lost()

    # ---- auxiliary variables -----------------------------------------------------------------

    def collect_aux_var(self, specs: VectorSpecs | None = None) -> dict[str, Summable]:
        """Aux vars of the modules that have one to send, keyed by their ``aux_name``; with
        ``specs`` (a client's model's), their Vectors rounded to its dtypes: what travels is
        in the model's dtype, and the modules of a half-precision model keep float32 state
        (see :meth:`run_modules`)."""
        collected = {}
        for aux_name, module in self._aux_modules.items():
            aux_var = module.collect_aux_var()
            if aux_var is not None:
                collected[aux_name] = aux_var if specs is None else _rounded(aux_var, specs)
        return collected

    def process_aux_var(
        self, aux_vars: Mapping[str, Summable], senders: Sequence[str] = ()
    ) -> None:
        """Route each aux var to the module with that ``aux_name``; on the server, ``senders``
        names the clients whose records were summed into them."""
        for aux_name, aux_var in aux_vars.items():
            self._aux_module(aux_name).process_aux_var(aux_var, senders)

    def check_aux_var(self, aux_vars: Mapping[str, Summable]) -> None:
        """Validate one peer's aux vars (names and contents) before they are summed."""
        for aux_name, aux_var in aux_vars.items():
            self._aux_module(aux_name).check_aux_var(aux_var)

    def _aux_module(self, aux_name: str) -> OptiModule:
        module = self._aux_modules.get(aux_name)
        if module is None:
            raise AuxVarError(
                f"no module of this optimizer takes aux var {aux_name!r}; "
                f"known aux-var names: {sorted(self._aux_modules) or 'none'}"
            )
        return module


def _rounded(aux_var: Summable, specs: VectorSpecs) -> Summable:
    """``aux_var`` with its Vectors of ``specs``' names and shapes in ``specs``' dtypes (the
    others as they are, for the server to reject)."""
    fields = dict(aux_var.fields)
    for key, value in fields.items():
        if isinstance(value, Vector) and all(
            n in specs and tuple(a.shape) == specs[n].shape for n, a in value.coefs.items()
        ):
            fields[key] = value.astype(specs)
    return Summable(fields)


def _mapped(value: StateValue, change: Callable[[Vector], Vector]) -> StateValue:
    """``value`` with ``change`` applied to its Vectors (itself if none changed)."""
    if isinstance(value, Vector):
        return change(value)
    if isinstance(value, dict):
        items = {key: _mapped(item, change) for key, item in value.items()}
        return items if any(items[k] is not value[k] for k in value) else value
    if isinstance(value, list):
        listed = [_mapped(item, change) for item in value]
        return listed if any(a is not b for a, b in zip(listed, value, strict=True)) else value
    return value


def _pipeline_states(state: State, key: str, names: list[str]) -> list[State]:
    entries: StateValue = state.get(key)
    if not isinstance(entries, list):
        raise ValueError(f"optimizer state {key!r} must be a list, got {entries!r}")
    found = [e.get("name") if isinstance(e, dict) else None for e in entries]
    if found != names:
        raise ValueError(
            f"optimizer state holds {key} {found}, but this optimizer has {names}: "
            f"the state comes from a different pipeline"
        )
    states = []
    for entry, name in zip(entries, names, strict=True):
        sub = entry.get("state") if isinstance(entry, dict) else None
        if not isinstance(sub, dict):
            raise ValueError(f"optimizer state of {key[:-1]} {name!r} must be a dict, got {sub!r}")
        states.append(sub)
    return states
