"""SCAFFOLD control variates (Karimireddy et al., 2020, "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning"), as a client module and a server module.

Exchange, each round (aux-var name ``"scaffold"``):

1. the server's ``collect_aux_var()`` gives ``{"global_state": c}``, the mean of the clients'
   control variates; each sampled client takes it in with ``process_aux_var``;
2. the client trains: ``run`` turns each gradient ``g`` into ``g - c_i + c``;
3. the client's ``collect_aux_var()`` updates ``c_i`` and returns ``{"delta": c_i_new -
   c_i_old}``;
4. the server sums those records over the replies it aggregates and calls its
   ``process_aux_var`` on the total, with the names of the clients that sent them: the server
   counts clients by name, so that a reply it never aggregated counts for nothing and a
   client that re-joins under its name counts once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from fedpipe.common.modules.base import AuxVarError, OptiModule
from fedpipe.common.state import State, StateValue, state_vector
from fedpipe.common.summable import Summable
from fedpipe.common.vector import Vector, VectorSpecs, describe_spec_mismatch, widened_specs

__all__ = ["ScaffoldClient", "ScaffoldServer"]


def _aux_vector(aux_var: Summable, fields: set[str], key: str, module: str) -> Vector:
    if not isinstance(aux_var, Summable) or set(aux_var.fields) != fields:
        got = sorted(aux_var.fields) if isinstance(aux_var, Summable) else type(aux_var).__name__
        raise AuxVarError(f"{module} expects an aux var with fields {sorted(fields)}, got {got}")
    value = aux_var.fields[key]
    if not isinstance(value, Vector):
        raise AuxVarError(f"{module} aux var field {key!r} must be a Vector, got {value!r}")
    if not value.is_finite():
        raise AuxVarError(f"{module} aux var field {key!r} holds NaN or infinite values")
    return value


def _check_aux_specs(value: Vector, specs: VectorSpecs | None, key: str, module: str) -> None:
    """Raise unless ``value`` fits ``specs``, a half-precision array its float32 counterpart:
    what travels is in the model's dtype, a half-precision model's control variates are
    float32 (see :meth:`~fedpipe.common.optim.Optimizer.run_modules`)."""
    problem = (
        ""
        if specs is None
        else describe_spec_mismatch(widened_specs(value.specs()), widened_specs(specs))
    )
    if problem:
        raise AuxVarError(f"{module} aux var field {key!r} does not fit the model: {problem}")


def _state_int(state: State, key: str, module: str) -> int:
    value = state.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{module} state {key!r} must be a non-negative int, got {value!r}")
    return value


class ScaffoldClient(OptiModule):
    """Client side of SCAFFOLD: corrects gradients into ``g - c_i + c``.

    ``c_i`` (local control variate) and ``c`` (global one, from the server) start at zero.
    At ``collect_aux_var`` time the new ``c_i`` is the average of the raw gradients seen since
    the last report. That is the paper's option II, ``c_i+ = c_i - c + (x - y_i) / (K lr)``,
    exactly when the K local steps are plain SGD at a constant ``lr``: then ``x - y_i = lr
    sum_k (g_k - c_i + c)``. Unlike option II it stays right whatever modules, learning-rate
    schedule or weight decay follow in the pipeline, and costs no extra gradient pass (option
    I's full gradient at the server model). declearn makes the same choice.
    """

    name: ClassVar[str] = "scaffold-client"
    aux_name: ClassVar[str | None] = "scaffold"

    def __init__(self) -> None:
        self.local_state: Vector | None = None
        self.global_state: Vector | None = None
        self.grad_sum: Vector | None = None
        self.n_steps = 0
        self.reported = False

    def run(self, gradients: Vector) -> Vector:
        if self.local_state is None:
            self.local_state = gradients.zeros_like()
        if self.global_state is None:
            self.global_state = gradients.zeros_like()
        if self.grad_sum is None:
            self.grad_sum = gradients.copy()
        else:
            self.grad_sum = self.grad_sum + gradients
        self.n_steps += 1
        return gradients - self.local_state + self.global_state

    def collect_aux_var(self) -> Summable | None:
        """Update ``c_i`` from this round's gradients and report its change (``None`` if the
        module never saw a gradient nor a global state: specs are unknown)."""
        old = self.local_state if self.local_state is not None else self.global_state
        if old is None:
            return None
        new = old if self.grad_sum is None else self.grad_sum / float(self.n_steps)
        record = Summable({"delta": new - old})
        self.local_state, self.reported = new, True
        self.grad_sum, self.n_steps = None, 0
        return record

    def on_state_lost(self) -> None:
        """The server holds this client's lost ``c_i`` in its sum: take ``c`` (the clients'
        mean) for it. The server's sum then keeps ``c_i_lost - c`` for good (with zero it
        would keep all of ``c_i_lost``): only a restored state is exact."""
        self.reported = True

    def process_aux_var(self, aux_var: Summable, senders: Sequence[str] = ()) -> None:
        """Take in ``{"global_state": c}`` from the server; starts a new round."""
        value = _aux_vector(aux_var, {"global_state"}, "global_state", self.name)
        known = self.local_state if self.local_state is not None else self.global_state
        _check_aux_specs(value, None if known is None else known.specs(), "global_state", self.name)
        self.global_state = value.widened(copy=True)
        if self.local_state is None:
            # A reported client without c_i lost its state: see on_state_lost.
            self.local_state = (
                self.global_state.copy() if self.reported else self.global_state.zeros_like()
            )
        self.grad_sum, self.n_steps = None, 0

    def get_state(self) -> State:
        return {
            "local_state": self.local_state,
            "global_state": self.global_state,
            "grad_sum": self.grad_sum,
            "n_steps": self.n_steps,
            "reported": self.reported,
        }

    def set_state(self, state: State) -> None:
        self.local_state = state_vector(state, "local_state", self.name)
        self.global_state = state_vector(state, "global_state", self.name)
        self.grad_sum = state_vector(state, "grad_sum", self.name)
        self.n_steps = _state_int(state, "n_steps", self.name)
        reported = state.get("reported", False)
        if not isinstance(reported, bool):
            raise ValueError(f"{self.name} state 'reported' must be a bool, got {reported!r}")
        self.reported = reported


class ScaffoldServer(OptiModule):
    """Server side of SCAFFOLD: keeps ``S``, the sum of the clients' control variates (each
    client's deltas add up to its ``c_i``), and the names of the clients it came from.

    ``run`` is the identity (it only learns the model's specs). The global control variate:

    - ``population=None``: ``c = S / N_seen``, the mean over the distinct clients whose replies
      were aggregated so far (zeros before any). It needs no known client population, and
      equals the paper's ``c`` once every client has reported;
    - ``population=N``: ``c = S / N``, that is Karimireddy et al. 2020, eq. (5),
      ``c += |S_t| / N * mean_{i in S_t} delta c_i`` from ``c = 0``, clients that never
      reported holding ``c_i = 0``. More distinct clients than ``N`` is an error.

    Parameters
    ----------
    population:
        ``N``, the number of clients in the federation (None: count the clients seen).
    """

    name: ClassVar[str] = "scaffold-server"
    aux_name: ClassVar[str | None] = "scaffold"

    def __init__(self, population: int | None = None) -> None:
        if population is not None and (
            isinstance(population, bool) or not isinstance(population, int) or population < 1
        ):
            raise ValueError(
                f"scaffold-server population={population!r}; expected a positive int or None"
            )
        self.population = population
        self.state_sum: Vector | None = None
        self.clients: set[str] = set()

    def get_config(self) -> dict[str, int | None]:
        return {"population": self.population}

    def run(self, gradients: Vector) -> Vector:
        if self.state_sum is None:
            self.state_sum = gradients.zeros_like()
        return gradients

    def collect_aux_var(self) -> Summable | None:
        """``{"global_state": c}``; ``None`` while the model's specs are unknown."""
        if self.state_sum is None:
            return None
        count = self.population if self.population is not None else len(self.clients)
        if count == 0:
            return Summable({"global_state": self.state_sum.zeros_like()})
        return Summable({"global_state": self.state_sum / float(count)})

    def check_aux_var(self, aux_var: Summable) -> None:
        """One client's record: ``{"delta"}``, a finite Vector of the model's specs."""
        delta = _aux_vector(aux_var, {"delta"}, "delta", self.name)
        known = None if self.state_sum is None else self.state_sum.specs()
        _check_aux_specs(delta, known, "delta", self.name)

    def process_aux_var(self, aux_var: Summable, senders: Sequence[str] = ()) -> None:
        """Take in the sum of the ``{"delta"}`` records of the clients named in ``senders``."""
        self.check_aux_var(aux_var)
        if not senders:
            raise AuxVarError(f"{self.name} takes a sum of client records with their senders")
        clients = self.clients.union(senders)
        if self.population is not None and len(clients) > self.population:
            raise AuxVarError(
                f"{self.name} population={self.population}, but {len(clients)} distinct "
                f"clients reported; set population to the number of clients"
            )
        delta = aux_var.vector("delta")
        self.state_sum = delta.copy() if self.state_sum is None else self.state_sum + delta
        self.clients = clients

    def get_state(self) -> State:
        names: list[StateValue] = [*sorted(self.clients)]
        return {"state_sum": self.state_sum, "clients": names}

    def set_state(self, state: State) -> None:
        clients = state.get("clients", [])
        if not isinstance(clients, list) or not all(isinstance(c, str) for c in clients):
            raise ValueError(
                f"{self.name} state 'clients' must be a list of client names, got {clients!r}"
            )
        self.state_sum = state_vector(state, "state_sum", self.name)
        self.clients = {name for name in clients if isinstance(name, str)}
