"""fedpipe: federated learning with pipelines of stateful optimizer modules, over gRPC.

``fedpipe.simulate(config) -> fedpipe.RunHistory`` runs a simulation from Python (see
:mod:`fedpipe.api`). Both are imported on first use: ``import fedpipe`` stays cheap and
imports no numpy, so that ``fedpipe client --threads`` can still cap the math libraries'
threads before numpy loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["RunHistory", "__version__", "simulate"]

if TYPE_CHECKING:
    from fedpipe.api import RunHistory, simulate


def __getattr__(name: str) -> Any:
    if name in ("simulate", "RunHistory"):
        from fedpipe import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedpipe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
