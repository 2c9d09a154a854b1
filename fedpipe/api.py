"""The Python API for notebooks and scripts: :func:`simulate`.

``fedpipe.simulate(config)`` runs what ``fedpipe simulate --config`` runs, with the same
validation, the same round loop and the same files, and returns a :class:`RunHistory`
instead of printing. It works inside a running event loop (Jupyter's): the simulation then
runs in a worker thread of its own.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fedpipe.common.config import (
    ConfigError,
    SimulationConfig,
    apply_overrides,
    format_validation_error,
    load_config,
)
from fedpipe.run_history import RunHistory

__all__ = ["ConfigSource", "RunHistory", "resolve_config", "simulate"]

#: What :func:`simulate` accepts as its configuration.
ConfigSource = SimulationConfig | Mapping[str, Any] | str | os.PathLike[str] | None


def simulate(
    config: ConfigSource = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    check: bool = True,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> RunHistory:
    """Run a whole federation on this machine and return its history.

    Parameters
    ----------
    config:
        A :class:`~fedpipe.common.config.SimulationConfig`; a dict with the layout of a
        simulation TOML file (validated the same way; missing fields take their defaults);
        the path of a TOML or JSON file; or None for the built-in default simulation (what
        ``fedpipe simulate`` runs without ``--config``).
    overrides:
        Dotted keys set on top of ``config``, as ``--set`` does:
        ``{"server.rounds": 5, "server.client_optimizer.lrate": 0.1}``.
    check:
        Raise :class:`~fedpipe.common.outcome.RunError` when the run failed (the default);
        with False, return the history of a failed run too (see ``status``/``reason``).
    on_round:
        Called with each round's record as the round ends (progress display).

    Returns
    -------
    RunHistory
        The per-round records, the final weights and how the run ended. The run's files
        (``metrics.jsonl``, ``model.npz``, ``summary.json``...) are in
        ``history.output_dir`` as after ``fedpipe simulate``.

    Raises
    ------
    ConfigError
        The configuration is invalid: the message names the field, the value and what was
        expected. Unknown module, model or aggregator names raise
        :class:`~fedpipe.common.registry.UnknownNameError`.
    RunError
        The run failed and ``check`` is True.
    SimulationError
        A gRPC simulation's processes failed before the run could say how it ended.
    """
    sim = resolve_config(config, overrides)
    history = _run_outside_event_loop(lambda: _simulate(sim, on_round))
    return history.raise_for_status() if check else history


def resolve_config(
    config: ConfigSource = None, overrides: Mapping[str, Any] | None = None
) -> SimulationConfig:
    """The validated :class:`SimulationConfig` that :func:`simulate` runs (see there).

    Raises
    ------
    ConfigError
        The file is missing or unreadable, or a field is invalid.
    TypeError
        ``config`` is none of the accepted kinds.
    """
    from fedpipe.server.simulation import DEFAULT_CONFIG_TEXT

    extra = dict(overrides or {})
    if config is None:
        return load_config(SimulationConfig, None, extra, default_text=DEFAULT_CONFIG_TEXT)
    if isinstance(config, (str, os.PathLike)):
        return load_config(SimulationConfig, Path(config), extra)
    if isinstance(config, SimulationConfig):
        if not extra:
            return config.model_copy(deep=True)
        return _validate(config.model_dump(), extra, "the given SimulationConfig")
    if isinstance(config, Mapping):
        return _validate(dict(config), extra, "the given dict")
    raise TypeError(
        f"config is a {type(config).__name__}; expected a SimulationConfig, a dict, "
        "the path of a TOML/JSON file, or None for the built-in default"
    )


def _validate(data: dict[str, Any], overrides: dict[str, Any], source: str) -> SimulationConfig:
    try:
        return SimulationConfig.model_validate(apply_overrides(data, overrides))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def _simulate(
    sim: SimulationConfig, on_round: Callable[[dict[str, Any]], None] | None
) -> RunHistory:
    from fedpipe.server.simulation import simulate as run_simulation

    summary = run_simulation(sim, on_round=on_round)
    return RunHistory.from_summary(summary, sim)


def _run_outside_event_loop(work: Callable[[], RunHistory]) -> RunHistory:
    """Run ``work`` here, or in a worker thread when this thread already runs an event loop
    (a notebook's): the simulation runs a loop of its own, and one thread holds one loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return work()
    with ThreadPoolExecutor(1, thread_name_prefix="fedpipe-simulate") as pool:
        return pool.submit(work).result()
