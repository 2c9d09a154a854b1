"""``fedpipe.simulate``: the Python API a notebook uses, against the CLI it stands for."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedpipe
from fedpipe.common.config import ConfigError, SimulationConfig
from fedpipe.common.outcome import RunError
from fedpipe.common.vector import Vector
from fedpipe.run_history import RunHistory, UnknownMetricError

ROOT = Path(__file__).resolve().parent.parent

SIM_TOML = """\
n_clients = 3
dataset = "digits"
eval_fraction = 0.25

[partition]
scheme = "dirichlet"
alpha = 0.5

[server]
rounds = 3
min_clients = 3
eval_every = 1

[server.client_optimizer]
lrate = 0.3
modules = [["momentum", { beta = 0.5 }]]

[server.training]
batch_size = 32
"""
SIM = tomllib.loads(SIM_TOML)


def out(tmp_path: Path, name: str) -> dict[str, Any]:
    return {"server.output_dir": str(tmp_path / name)}


def npz(path: Path) -> Vector:
    with np.load(path, allow_pickle=False) as data:
        return Vector({k: data[k] for k in data.files})


def without_seconds(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def cli(*args: str, cwd: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedpipe", "simulate", *args],
        cwd=cwd,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


def test_import_fedpipe_loads_no_numpy_and_simulate_on_first_use() -> None:
    code = (
        "import sys, fedpipe\n"
        "assert 'numpy' not in sys.modules, 'import fedpipe loaded numpy'\n"
        "assert 'simulate' in dir(fedpipe) and 'RunHistory' in dir(fedpipe)\n"
        "from fedpipe.api import simulate\n"
        "assert fedpipe.simulate is simulate and 'numpy' in sys.modules\n"
        "try:\n    fedpipe.nothing\nexcept AttributeError as e:\n    print(e)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "module 'fedpipe' has no attribute 'nothing'"


def test_every_config_form_runs_the_same_simulation_as_the_cli(tmp_path: Path) -> None:
    toml_path = tmp_path / "sim.toml"
    toml_path.write_text(SIM_TOML)
    json_path = tmp_path / "sim.json"
    json_path.write_text(json.dumps(SIM))
    runs = {
        "dict": fedpipe.simulate(SIM, overrides=out(tmp_path, "dict")),
        "model": fedpipe.simulate(
            SimulationConfig.model_validate(SIM), overrides=out(tmp_path, "m")
        ),
        "toml": fedpipe.simulate(toml_path, overrides=out(tmp_path, "toml")),
        "json": fedpipe.simulate(str(json_path), overrides=out(tmp_path, "json")),
    }
    cli("--config", str(toml_path), "--output-dir", str(tmp_path / "cli"), cwd=tmp_path)
    cli_weights = npz(tmp_path / "cli" / "model.npz")
    cli_records = [json.loads(line) for line in (tmp_path / "cli" / "metrics.jsonl").open()]
    for form, history in runs.items():
        assert history.status == "completed", form
        assert history.rounds_completed == 3 and len(history.records) == 3, form
        assert history.weights.array_equal(cli_weights), form
        assert without_seconds(history.records) == without_seconds(cli_records), form
        # The returned history is what the run wrote.
        assert history.weights.array_equal(npz(history.output_dir / "model.npz")), form
        summary = json.loads((history.output_dir / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["rounds_completed"] == 3
    assert runs["toml"].metric("accuracy")[-1][1] > 0.5  # it learned: digits, 10 classes


def test_no_config_is_the_cli_default_and_overrides_are_dotted_keys(tmp_path: Path) -> None:
    sets = {"server.rounds": 2, "n_clients": 4, "server.client_optimizer.lrate": 0.2}
    history = fedpipe.simulate(overrides={**sets, **out(tmp_path, "api")})
    cli(
        *(f"--set={k}={v}" for k, v in sets.items()),
        "--output-dir",
        str(tmp_path / "cli"),
        cwd=tmp_path,
    )
    assert history.weights.array_equal(npz(tmp_path / "cli" / "model.npz"))
    assert history.config.n_clients == 4 and history.config.dataset == "digits"
    assert history.config.server.client_optimizer.lrate == 0.2
    assert [r["round"] for r in history.records] == [1, 2]
    assert [r["sampled"] for r in history.records] == [4, 4]


def test_invalid_configs_fail_with_the_field_the_value_and_the_expectation(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError) as err:
        fedpipe.simulate({**SIM, "server": {"rounds": 0}})
    assert str(err.value) == (
        "invalid configuration in the given dict:\n"
        "  server.rounds: Input should be greater than or equal to 1 (got 0)"
    )
    with pytest.raises(ConfigError, match="n_client: Extra inputs are not permitted"):
        fedpipe.simulate({"n_client": 3})
    with pytest.raises(
        ConfigError, match="transport: Input should be 'inprocess', 'grpc' or 'dask'"
    ):
        fedpipe.simulate(SimulationConfig(), overrides={"transport": "carrier-pigeon"})
    with pytest.raises(ConfigError, match=r"config file .*missing.toml does not exist"):
        fedpipe.simulate(tmp_path / "missing.toml")
    with pytest.raises(TypeError, match="config is a int; expected a SimulationConfig, a dict"):
        fedpipe.simulate(42)  # type: ignore[arg-type]


FAILING = {
    **SIM,
    "n_clients": 2,
    "server": {
        **SIM["server"],
        "min_clients": 2,
        "min_results": 2,
        "sampler": ["uniform", {"count": 1}],
    },
}
FAILURE = "round 1: too few results (1 of 1 sampled client(s) replied, min_results=2)"


def test_a_failed_run_raises_unless_check_is_false(tmp_path: Path) -> None:
    with pytest.raises(RunError) as err:
        fedpipe.simulate(FAILING, overrides=out(tmp_path, "raised"))
    assert str(err.value) == FAILURE
    history = fedpipe.simulate(FAILING, overrides=out(tmp_path, "kept"), check=False)
    assert (history.status, history.reason, history.rounds_completed) == ("failed", FAILURE, 0)
    assert history.records[0]["failed"] == "too few results"
    summary = json.loads((tmp_path / "kept" / "summary.json").read_text())
    assert (summary["status"], summary["reason"]) == ("failed", FAILURE)
    with pytest.raises(RunError, match="too few results"):
        history.raise_for_status()


def test_metric_gives_round_value_pairs_of_the_rounds_that_recorded_it(tmp_path: Path) -> None:
    seen: list[int] = []
    history = fedpipe.simulate(
        SIM,
        overrides={"server.rounds": 4, "server.eval_every": 2, **out(tmp_path, "run")},
        on_round=lambda record: seen.append(record["round"]),
    )
    assert seen == [1, 2, 3, 4]
    assert [r for r, _ in history.metric("train_loss")] == [1, 2, 3, 4]
    accuracy = history.metric("accuracy")
    assert [r for r, _ in accuracy] == [2, 4]  # evaluated every 2 rounds
    assert accuracy == [(r["round"], r["accuracy"]) for r in history.records if "accuracy" in r]
    assert history.metric_names == [
        "sampled",
        "replied",
        "train_loss",
        "seconds",
        "loss",
        "accuracy",
    ]
    for name in ("f1", "clients"):
        with pytest.raises(UnknownMetricError) as err:
            history.metric(name)
        assert str(err.value) == (
            f"no round recorded a metric {name!r}; recorded metrics: sampled, replied, "
            "train_loss, seconds, loss, accuracy"
        )
    assert set(history.arrays) == {"kernel", "bias"}
    assert history.arrays["kernel"] is history.weights["kernel"]
    assert history.arrays["kernel"].shape == (64, 10)


def test_to_pandas_says_how_to_get_pandas_when_it_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    history = RunHistory(
        [{"round": 1, "loss": 0.5}], Vector({}), "completed", "", 1, False, SimulationConfig()
    )
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if not installed
    with pytest.raises(ImportError, match=r"needs pandas.*`pip install pandas`"):
        history.to_pandas()


def test_to_pandas_has_one_row_per_round_and_no_client_lists() -> None:
    pd = pytest.importorskip("pandas")
    records = [
        {"round": 1, "train_loss": 0.9, "clients": ["a", "b"]},
        {"round": 2, "train_loss": 0.7, "accuracy": 0.8, "clients": ["a"]},
    ]
    history = RunHistory(records, Vector({}), "completed", "", 2, False, SimulationConfig())
    frame = history.to_pandas()
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.index) == [1, 2] and "clients" not in frame.columns
    assert frame.loc[2, "accuracy"] == 0.8


async def test_simulate_runs_inside_a_running_event_loop_as_in_a_notebook(tmp_path: Path) -> None:
    history = fedpipe.simulate(SIM, overrides=out(tmp_path, "in-loop"))  # Jupyter's case
    reference = fedpipe.simulate(SIM, overrides=out(tmp_path, "reference"))
    assert history.status == "completed"
    assert history.weights.array_equal(reference.weights)


def test_grpc_transport_returns_the_history_of_real_processes(tmp_path: Path) -> None:
    sim = {**SIM, "n_clients": 2, "server": {**SIM["server"], "rounds": 2, "min_clients": 2}}
    grpc = fedpipe.simulate(sim, overrides={"transport": "grpc", **out(tmp_path, "grpc")})
    local = fedpipe.simulate(sim, overrides=out(tmp_path, "local"))
    assert grpc.status == "completed" and grpc.rounds_completed == 2
    assert (tmp_path / "grpc" / "logs" / "server.log").exists()
    # The same seed gives the same model with both transports, up to summation order.
    assert grpc.weights.allclose(local.weights, rtol=1e-5, atol=1e-6)
    assert [r["replied"] for r in grpc.records] == [2, 2]
