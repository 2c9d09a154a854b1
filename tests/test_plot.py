"""``fedpipe plot``: PNG charts of real runs, and clear errors for what is not a run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedpipe.cli import main
from fedpipe.plot import DPI, FIGSIZE

pytest.importorskip("matplotlib")  # the `plot` extra (in `dev`)
Image = pytest.importorskip("PIL.Image")  # matplotlib's own dependency

SIZE = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))
CHARTS = [
    "metric-train_loss.png",
    "metric-loss.png",
    "metric-accuracy.png",
    "participation.png",
    "round-time.png",
    "clients-fast.png",
    "clients-slow.png",
]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two real simulations that differ in their learning rate and participation."""
    root = tmp_path_factory.mktemp("runs")
    common = ["simulate", "--rounds", "4", "--clients", "4", "-q"]
    assert (
        main(
            [
                *common,
                "--output-dir",
                str(root / "fast"),
                "--set",
                'server.sampler=["uniform", {fraction = 0.5}]',
            ]
        )
        == 0
    )
    slow = ["--set", "server.client_optimizer.lrate=0.05"]
    assert main([*common, "--output-dir", str(root / "slow"), *slow]) == 0
    return [root / "fast", root / "slow"]


def test_plot_writes_readable_charts_of_two_runs(
    two_runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "charts"
    assert main(["plot", *map(str, two_runs), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(CHARTS)
    assert capsys.readouterr().out.split() == [str(out / name) for name in CHARTS]
    for name in CHARTS:
        path = out / name
        assert path.stat().st_size > 10_000, name  # axes, lines, legend: not an empty canvas
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == SIZE, name
            colors = image.convert("RGB").getcolors(maxcolors=1 << 16)
            assert colors is None or len(colors) > 50, name  # drawn, not blank


def test_plot_of_one_run_goes_to_its_plots_folder(two_runs: list[Path]) -> None:
    assert main(["plot", str(two_runs[0])]) == 0
    assert (two_runs[0] / "plots" / "metric-accuracy.png").stat().st_size > 10_000


def test_plot_of_a_folder_that_is_not_a_run_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], two_runs: list[Path]
) -> None:
    assert main(["plot", str(two_runs[0]), str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"fedpipe plot: {tmp_path} is not a run directory: it has no metrics.jsonl "
        "(fedpipe server and fedpipe simulate write one per run)\n"
    )
    assert not (tmp_path / "o").exists()


def test_plot_without_matplotlib_says_how_to_install_it(
    two_runs: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["plot", str(two_runs[0]), "--out", str(tmp_path / "o")]) == 2
    assert "pip install 'fedpipe[plot]'" in capsys.readouterr().err
