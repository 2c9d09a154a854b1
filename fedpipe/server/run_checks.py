"""Checks a run's config passes before it starts: settings that cannot work together.

Privacy, secure aggregation and validation each refuse some combinations (a module whose aux
vars would escape the clip, the noise or the mask; statistics that would travel in the
clear...). They share the two helpers here, so each says what it refuses in one table.
"""

from __future__ import annotations

from collections.abc import Mapping

from fedpipe.common.config import ConfigError, ServerConfig
from fedpipe.common.optim import Optimizer

__all__ = ["aux_var_modules", "refuse_any"]


def aux_var_modules(config: ServerConfig, server_optimizer: Optimizer) -> list[str]:
    """``"<side> module '<name>' (aux var '<aux>')"`` for each module of either pipeline
    that exchanges aux vars with the other side (SCAFFOLD's control variates...)."""
    found = []
    client_optimizer = config.client_optimizer.build()
    for side, built in (
        ("server_optimizer", server_optimizer),
        ("client_optimizer", client_optimizer),
    ):
        found += [
            f"{side} module {m.name!r} (aux var {m.aux_name!r})"
            for m in built.modules
            if m.aux_name is not None
        ]
    return found


def refuse_any(feature: str, refused: Mapping[str, bool], why: str) -> None:
    """Raise :class:`ConfigError` ``"<feature> with <what>: <why>"`` for the first ``what``
    of ``refused`` that is present."""
    for what, present in refused.items():
        if present:
            raise ConfigError(f"{feature} with {what}: {why}")
