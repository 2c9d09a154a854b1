"""``fedpipe plot``: PNG charts of one or several run directories, overlaid for comparison.

Reads what a run wrote (``metrics.jsonl``, ``clients.jsonl``) and draws, with matplotlib's
Agg backend (no display needed): each metric per round, the clients that replied per round,
the time each round took, and for each run a client x round participation map.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PlotError", "Run", "load_run", "plot_runs"]

#: Record keys that are not metrics (counts, time, client lists) or not numbers.
NOT_METRICS = frozenset({"round", "sampled", "replied", "seconds", "clients", "failed"})

FIGSIZE = (8.0, 5.0)  # inches, at DPI: 800 x 500 pixels
DPI = 100


class PlotError(ValueError):
    """A directory is not a run, or matplotlib is not installed."""


@dataclass
class Run:
    """What one run directory holds: its name in legends, its rounds and its client lines."""

    name: str
    path: Path
    records: list[dict[str, Any]]
    clients: list[dict[str, Any]] = field(default_factory=list)


def load_run(path: Path, name: str | None = None) -> Run:
    """Read a run directory.

    Raises
    ------
    PlotError
        ``path`` is not a directory with a ``metrics.jsonl``, or that file holds no round.
    """
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise PlotError(
            f"{path} is not a run directory: it has no metrics.jsonl "
            "(fedpipe server and fedpipe simulate write one per run)"
        )
    records = _read_jsonl(metrics)
    if not records:
        raise PlotError(f"{metrics} holds no round yet: nothing to plot")
    clients_path = path / "clients.jsonl"
    if clients_path.is_file():
        clients = _read_jsonl(clients_path)
    else:  # a run from before clients.jsonl: who replied is in metrics.jsonl
        clients = [
            {"round": r["round"], "client": c, "replied": True}
            for r in records
            for c in r.get("clients", [])
        ]
    return Run(name or path.name, path, records, clients)


def plot_runs(paths: list[Path], out: Path) -> list[Path]:
    """Write the charts of the runs in ``paths`` to ``out``; returns the files written.

    Raises
    ------
    PlotError
        A path is not a run directory, or matplotlib is missing.
    """
    runs = [load_run(p, name) for p, name in zip(paths, _legend_names(paths), strict=True)]
    _require_matplotlib()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for metric in _metric_names(runs):
        path = out / f"metric-{_safe(metric)}.png"
        _line_chart(runs, lambda r, m=metric: r.get(m), metric, f"{metric} per round", path)
        written.append(path)
    written.append(_participation_chart(runs, out / "participation.png"))
    path = out / "round-time.png"
    _line_chart(runs, lambda r: r.get("seconds"), "seconds", "time per round", path)
    written.append(path)
    written += [_client_map(run, out / f"clients-{_safe(run.name)}.png") for run in runs]
    return written


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash
        if isinstance(value, dict) and isinstance(value.get("round"), int):
            lines.append(value)
    return lines


def _require_matplotlib() -> None:
    try:
        import matplotlib
    except ImportError:
        raise PlotError(
            "plotting needs matplotlib: pip install 'fedpipe[plot]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")


def _legend_names(paths: list[Path]) -> list[str]:
    """Each run's folder name; with the folders above it where two runs share a name."""
    depth = 1
    while depth < 8:
        names = ["/".join(p.resolve().parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
        depth += 1
    return [str(p) for p in paths]


def _metric_names(runs: list[Run]) -> list[str]:
    names: list[str] = []
    for run in runs:
        for record in run.records:
            names += [
                k
                for k, v in record.items()
                if k not in NOT_METRICS and _is_number(v) and k not in names
            ]
    return names


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _figure() -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")


def _line_chart(runs: list[Run], value: Any, label: str, title: str, path: Path) -> None:
    """One line per run: ``value(record)`` against the round (rounds without it skipped)."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure()
    ax = fig.add_subplot()
    for run in runs:
        points = [(r["round"], value(r)) for r in run.records if _is_number(value(r))]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, label=run.name)
    ax.set(title=title, xlabel="round", ylabel=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(title="run")
    fig.savefig(path)


def _participation_chart(runs: list[Run], path: Path) -> Path:
    """Clients that replied per round (solid) and clients sampled (dashed), per run."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure()
    ax = fig.add_subplot()
    top = 1
    for run in runs:
        rounds = [r["round"] for r in run.records]
        sampled = [r.get("sampled", 0) for r in run.records]
        (line,) = ax.plot(rounds, sampled, ls="--", lw=3, alpha=0.45)  # under: seen when equal
        line.set_label(f"{run.name}: sampled")
        replied = [r.get("replied", 0) for r in run.records]
        ax.plot(rounds, replied, marker="o", color=line.get_color(), label=f"{run.name}: replied")
        top = max(top, *sampled, *replied)
    ax.set(title="participation: clients per round", xlabel="round", ylabel="clients")
    ax.set_ylim(0, top * 1.15 + 0.5)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path)
    return path


def _client_map(run: Run, path: Path) -> Path:
    """A client x round map: not sampled, sampled without an aggregated reply, replied."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    rounds = sorted({r["round"] for r in run.records})
    names = sorted({str(line["client"]) for line in run.clients if "client" in line})
    column = {r: i for i, r in enumerate(rounds)}
    row = {n: i for i, n in enumerate(names)}
    grid = [[0] * len(rounds) for _ in names]
    for line in run.clients:
        if line.get("round") in column and str(line.get("client")) in row:
            grid[row[str(line["client"])]][column[line["round"]]] = 2 if line.get("replied") else 1
    colors = ["#eeeeee", "#d62728", "#2ca02c"]
    fig = _figure()
    ax = fig.add_subplot()
    if names:
        extent = (rounds[0] - 0.5, rounds[-1] + 0.5, len(names) - 0.5, -0.5)
        ax.imshow(
            grid,
            cmap=ListedColormap(colors),
            vmin=0,
            vmax=2,
            aspect="auto",
            extent=extent,
            interpolation="nearest",
        )
    if len(names) <= 40:
        ax.set_yticks(range(len(names)), names)
    ax.set(title=f"{run.name}: clients per round", xlabel="round", ylabel="client")
    labels = ["not sampled", "sampled, no reply aggregated", "replied"]
    handles = [Patch(color=c, label=t) for c, t in zip(colors, labels, strict=True)]
    fig.legend(handles=handles, loc="outside lower center", ncols=3)
    fig.savefig(path)
    return path
