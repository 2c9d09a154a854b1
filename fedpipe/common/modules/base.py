"""The optimizer-module API: one gradient transformation with explicit, serializable state."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from fedpipe.common.registry import Registrable, declare_family
from fedpipe.common.state import State
from fedpipe.common.summable import Summable
from fedpipe.common.vector import Vector

__all__ = ["AuxVarError", "OptiModule"]


class AuxVarError(ValueError):
    """An auxiliary variable does not fit the module it was routed to."""


@declare_family
class OptiModule(Registrable):
    """A stateful transformation of gradients, chained in an optimizer's pipeline.

    Subclasses set a unique ``name`` (the registry key used in configs) and implement
    :meth:`run`. Stateful modules override :meth:`get_state` / :meth:`set_state`: the state
    holds everything needed to resume the module or mirror it in another process. Its Vectors
    take the dtypes of the gradients :meth:`run` is given: float32 for a half-precision model
    (float16, bfloat16), whose gradients the optimizer widens for its modules. Modules
    that talk to their counterpart on the other side (Scaffold) set ``aux_name`` and implement
    :meth:`collect_aux_var` / :meth:`process_aux_var`; client-to-server aux vars are
    :class:`~fedpipe.common.summable.Summable` so the server can add them up as they arrive.
    """

    family: ClassVar[str] = "module"
    name: ClassVar[str]
    aux_name: ClassVar[str | None] = None

    @abstractmethod
    def run(self, gradients: Vector) -> Vector:
        """Transform ``gradients``; the output has the input's specs."""

    def get_state(self) -> State:
        return {}

    def set_state(self, state: State) -> None:
        if state:
            raise ValueError(f"module {self.name!r} is stateless, got state keys {sorted(state)}")

    def on_state_lost(self) -> None:
        """This fresh module replaces one whose state was lost, in a run its counterpart
        already knows (a client that lost its saved state re-joins): forget nothing, but do
        not announce a newcomer. The default does nothing."""

    def collect_aux_var(self) -> Summable | None:
        """Auxiliary variable to send to the other side after a step, if any."""
        return None

    def process_aux_var(self, aux_var: Summable, senders: Sequence[str] = ()) -> None:
        """Take in an auxiliary variable from the other side: on a client, the server's; on
        the server, the sum of the records of the clients named in ``senders``."""
        raise AuxVarError(f"module {self.name!r} takes no auxiliary variables")

    def check_aux_var(self, aux_var: Summable) -> None:
        """Validate ONE peer's aux var before it is added to the others (the server calls it
        on every client reply, so a bad one is rejected alone); raise :class:`AuxVarError`.
        The default accepts anything for a module that has an ``aux_name``."""
        if self.aux_name is None:
            raise AuxVarError(f"module {self.name!r} takes no auxiliary variables")
