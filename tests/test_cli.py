"""The ``fedpipe`` command as a user types it."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from fedpipe.cli import main
from fedpipe.common.config import ClientConfig, ServerConfig, SimulationConfig
from fedpipe.server.simulation import DEFAULT_CONFIG_TEXT

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_example_configs_are_valid(path: Path) -> None:
    data = tomllib.loads(path.read_text())
    cls = {"server.toml": ServerConfig, "client.toml": ClientConfig}.get(
        path.name, SimulationConfig
    )
    config = cls.model_validate(data)
    assert config.model_dump()  # validated, with every default filled in


def test_default_simulation_config_prints_and_validates(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert printed == DEFAULT_CONFIG_TEXT
    sim = SimulationConfig.model_validate(tomllib.loads(printed))
    assert sim.n_clients == 10 and sim.dataset == "digits" and sim.partition.scheme == "dirichlet"


def test_simulate_prints_accuracy_per_round(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["simulate", "--rounds", "3", "--clients", "4", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith("round")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all("accuracy" in line for line in lines)
    assert (tmp_path / "metrics.csv").exists() and (tmp_path / "model.npz").exists()


@pytest.mark.parametrize(
    "toml, expected",
    [
        ("rounds = 0", "server.rounds: Input should be greater than or equal to 1 (got 0)"),
        ("[partition]\nscheme = 'random'", "partition.scheme: Input should be 'iid'"),
        ("n_clientz = 3", "n_clientz: Extra inputs are not permitted"),
        (
            "transport = 'carrier-pigeon'",
            "transport: Input should be 'inprocess', 'grpc' or 'dask'",
        ),
    ],
)
def test_bad_config_fails_before_anything_starts_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, expected: str
) -> None:
    path = tmp_path / "sim.toml"
    text = toml if not toml.startswith("rounds") else f"[server]\n{toml}"
    path.write_text(text)
    assert main(["simulate", "--config", str(path), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and expected in err
    assert not (tmp_path / "o").exists()


def test_unknown_model_name_lists_the_known_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "server.toml"
    path.write_text("port = 0\n[model]\nname = 'resnet-9000'\n")
    assert main(["server", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnet-9000'" in err and "softmax-regression" in err


def test_split_writes_one_folder_per_client(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["split", "--dataset", "digits", "--clients", "3", "--scheme", "dirichlet"]
    assert main([*args, "--alpha", "0.3", "--out", str(tmp_path)]) == 0
    sizes = [len(np.load(tmp_path / f"client_{i}" / "y.npy")) for i in range(3)]
    assert sum(sizes) == 1797 and min(sizes) > 0
    assert capsys.readouterr().out.count("samples") == 3


def test_help_explains_each_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("server", "client", "simulate", "split"):
        assert command in out


def test_version_and_logging_flags_after_the_subcommand(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == "fedpipe 0.1.0"
    assert main(["simulate", "-q", "--print-config"]) == 0
    assert main(["simulate", "-v", "--print-config"]) == 0


def test_set_overrides_any_field_with_toml_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sets = ["server.rounds=2", "n_clients=3", 'server.model.name="mlp"', "server.eval_every=2"]
    args = ["simulate", "--output-dir", str(tmp_path)]
    assert main([*args, *(f"--set={s}" for s in sets)]) == 0
    out = capsys.readouterr().out
    assert "simulating 3 clients" in out and "2 rounds" in out
    with np.load(tmp_path / "model.npz") as model:
        assert len(model.files) > 2  # an MLP has more than one weight and one bias
    assert main(["simulate", "--set", "server.rounds"]) == 2
    assert "--set 'server.rounds': expected section.key=value" in capsys.readouterr().err


def test_a_missing_data_file_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere"
    code = main(["client", "--server", "127.0.0.1:1", "--data", str(missing)])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"fedpipe client: no dataset at {missing}\n"


def test_a_command_leaves_the_environment_as_it_found_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # It used to set DASK_LOGGING__DISTRIBUTED for the rest of the calling process.
    monkeypatch.delenv("DASK_LOGGING__DISTRIBUTED", raising=False)
    before = dict(os.environ)
    assert main(["simulate", "--print-config"]) == 0
    assert dict(os.environ) == before


# Dask's import sets its loggers' own level (INFO), as here; they log to the root's handler.
DASK_LOGS = """
import logging, sys
from fedpipe.cli import main
logging.getLogger("distributed").setLevel(logging.INFO)
main(sys.argv[1:])
logging.getLogger("distributed.scheduler").info("State start")
logging.getLogger("distributed.scheduler").warning("Event loop was unresponsive")
"""


@pytest.mark.parametrize(("verbose", "info_shown"), [([], False), (["-v"], True)])
def test_dasks_info_lines_show_only_with_verbose(verbose: list[str], info_shown: bool) -> None:
    command = [sys.executable, "-c", DASK_LOGS, *verbose, "simulate", "--print-config"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert " WARNING distributed.scheduler: Event loop was unresponsive" in done.stderr
    assert (" INFO distributed.scheduler: State start" in done.stderr) is info_shown


def test_simulate_on_dask_shows_rounds_not_the_clusters_log(tmp_path: Path) -> None:
    """Dask logs its cluster's start, connections and shutdown at INFO (some 30 lines); a
    ``fedpipe simulate`` without ``-v`` shows its round lines and none of those."""
    pytest.importorskip("dask.distributed")
    command = [sys.executable, "-m", "fedpipe", "simulate", "--rounds", "1", "--clients", "2"]
    command += ["--output-dir", str(tmp_path), "--set", 'transport="dask"']
    command += ["--set", "dask.workers=1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "round   1/1  clients 2/2" in done.stdout
    # (A loaded machine may still see Dask's warnings, "event loop was unresponsive"...)
    assert " INFO distributed." not in done.stderr, done.stderr[-2000:]
