"""The live round bar in a terminal; plain lines when stdout is not one."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from fedpipe.cli import main

rich_console = pytest.importorskip("rich.console")  # the `rich` extra (in `dev`)

from fedpipe.progress import RoundBar  # noqa: E402  (needs rich)

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_the_bar_shows_rounds_clients_eta_and_the_latest_metrics() -> None:
    out = io.StringIO()
    console = rich_console.Console(file=out, force_terminal=True, width=200)
    with RoundBar(3, "server", console=console) as on_round:
        on_round({"round": 1, "sampled": 4, "replied": 4, "loss": 1.5, "seconds": 0.1})
        on_round({"round": 2, "sampled": 4, "replied": 3, "accuracy": 0.8125, "seconds": 0.1})
        on_round({"round": 3, "sampled": 4, "replied": 1, "failed": "too few results"})
    last = ANSI.sub("", out.getvalue()).replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("server") and "3/3 rounds" in last and "clients 1/4" in last
    assert "ETA" in last and "(too few results: model unchanged)" in last
    assert "accuracy" not in last  # the latest round's metrics, not an older round's


def test_without_a_terminal_each_round_is_one_plain_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["simulate", "--rounds", "2", "--clients", "2", "--output-dir", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out
    rounds = [line.split()[:2] for line in out.splitlines() if line.startswith("round")]
    assert rounds == [["round", "1/2"], ["round", "2/2"]]
