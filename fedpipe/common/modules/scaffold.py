"""SCAFFOLD control variates (Karimireddy et al., 2020, "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning"), as a client module and a server module.

Exchange, each round (aux-var name ``"scaffold"``):

1. the server's ``collect_aux_var()`` gives ``{"global_state": c}``, the mean of the clients'
   control variates; each sampled client takes it in with ``process_aux_var``;
2. the client trains: ``run`` turns each gradient ``g`` into ``g - c_i + c``;
3. the client's ``collect_aux_var()`` updates ``c_i`` and returns ``{"delta": c_i_new -
   c_i_old, "new_clients": 1 on the client's first report, else 0}``;
4. the server sums those records over clients and calls its ``process_aux_var`` on the total.
"""

from __future__ import annotations

from typing import ClassVar

from fedpipe.common.modules.base import AuxVarError, OptiModule
from fedpipe.common.state import State, state_vector
from fedpipe.common.summable import Summable
from fedpipe.common.vector import Vector, VectorSpecs, describe_spec_mismatch

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
    problem = "" if specs is None else describe_spec_mismatch(value.specs(), specs)
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
        record = Summable({"delta": new - old, "new_clients": 0 if self.reported else 1})
        self.local_state, self.reported = new, True
        self.grad_sum, self.n_steps = None, 0
        return record

    def on_state_lost(self) -> None:
        """The server already counts this client and holds its lost ``c_i`` in its sum:
        report no newcomer, and take ``c`` (the clients' mean) for the lost ``c_i``. The
        server's sum then keeps ``c_i_lost - c`` for good (with zero it would keep all of
        ``c_i_lost``): only a restored state is exact."""
        self.reported = True

    def process_aux_var(self, aux_var: Summable) -> None:
        """Take in ``{"global_state": c}`` from the server; starts a new round."""
        value = _aux_vector(aux_var, {"global_state"}, "global_state", self.name)
        known = self.local_state if self.local_state is not None else self.global_state
        _check_aux_specs(value, None if known is None else known.specs(), "global_state", self.name)
        self.global_state = value.copy()
        if self.local_state is None:
            # A reported client without c_i lost its state: see on_state_lost.
            self.local_state = value.copy() if self.reported else value.zeros_like()
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
    """Server side of SCAFFOLD: keeps ``S``, the sum of the control variates of the ``N``
    distinct clients seen so far, and sends ``c = S / N`` (zeros before any report).

    ``run`` is the identity (it only learns the model's specs). The paper's server update
    ``c += |S_t| / N_total * mean(delta)`` assumes a known client population; keeping the sum
    over clients seen so far gives the same ``c`` once every client has reported, without
    knowing the population in advance.
    """

    name: ClassVar[str] = "scaffold-server"
    aux_name: ClassVar[str | None] = "scaffold"

    def __init__(self) -> None:
        self.state_sum: Vector | None = None
        self.n_clients = 0

    def run(self, gradients: Vector) -> Vector:
        if self.state_sum is None:
            self.state_sum = gradients.zeros_like()
        return gradients

    def collect_aux_var(self) -> Summable | None:
        """``{"global_state": S / N}``; ``None`` while the model's specs are unknown."""
        if self.state_sum is None:
            return None
        if self.n_clients == 0:
            return Summable({"global_state": self.state_sum.zeros_like()})
        return Summable({"global_state": self.state_sum / float(self.n_clients)})

    def check_aux_var(self, aux_var: Summable) -> None:
        """One client's record: a delta of the model's specs and ``new_clients`` 0 or 1."""
        self._checked(aux_var, max_new_clients=1)

    def _checked(self, aux_var: Summable, max_new_clients: float) -> tuple[Vector, int]:
        delta = _aux_vector(aux_var, {"delta", "new_clients"}, "delta", self.name)
        known = None if self.state_sum is None else self.state_sum.specs()
        _check_aux_specs(delta, known, "delta", self.name)
        new_clients = aux_var.fields["new_clients"]
        if (
            isinstance(new_clients, (Vector, bool))
            or not 0 <= new_clients <= max_new_clients
            or not float(new_clients).is_integer()
        ):
            raise AuxVarError(
                f"{self.name} aux var field 'new_clients' must be an integer in "
                f"[0, {max_new_clients:g}], got {new_clients!r}"
            )
        return delta, int(new_clients)

    def process_aux_var(self, aux_var: Summable) -> None:
        """Take in the sum over clients of their ``{"delta", "new_clients"}`` records."""
        delta, new_clients = self._checked(aux_var, max_new_clients=float(1 << 53))
        self.state_sum = delta.copy() if self.state_sum is None else self.state_sum + delta
        self.n_clients += new_clients

    def get_state(self) -> State:
        return {"state_sum": self.state_sum, "n_clients": self.n_clients}

    def set_state(self, state: State) -> None:
        self.state_sum = state_vector(state, "state_sum", self.name)
        self.n_clients = _state_int(state, "n_clients", self.name)
