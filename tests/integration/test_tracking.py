"""TensorBoard and MLflow, switched on from the server config, read back with their own
libraries: every round's scalars as ``metrics.jsonl`` has them, the config as parameters
(never its secrets), how the run ended; and one clear line when an extra is missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedpipe.common.config import ConfigError, SimulationConfig
from fedpipe.server.simulation import free_port, simulate

pytest.importorskip("tensorboardX", reason="fedpipe[tensorboard]")
pytest.importorskip("mlflow", reason="fedpipe[mlflow]")
event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator", reason="tensorboard reads events"
)

ROOT = Path(__file__).resolve().parents[2]
SCALARS = ("loss", "accuracy", "train_loss", "replied", "seconds")


def sim_config(tmp_path: Path, rounds: int = 3, **tracking: Any) -> SimulationConfig:
    return SimulationConfig.model_validate(
        {
            "n_clients": 3,
            "dataset": "digits",
            "server": {
                "rounds": rounds,
                "min_clients": 3,
                "client_optimizer": {"lrate": 0.5},
                "output_dir": str(tmp_path / "exp-a"),
                "tokens": {"client-0": "never-tracked-secret"},
                "tracking": tracking,
            },
        }
    )


def records_of(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(logdir: Path) -> tuple[dict[str, list[tuple[int, float]]], Any]:
    events = event_accumulator.EventAccumulator(str(logdir))
    events.Reload()
    scalars = {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}
    return scalars, events


def test_tensorboard_and_mlflow_get_each_rounds_scalars_and_the_config(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"file:{tmp_path / 'mlruns'}"
    tracking = {"tensorboard_dir": str(tmp_path / "tb"), "mlflow_uri": uri}
    summary = simulate(sim_config(tmp_path, mlflow_experiment="trial", **tracking))
    assert summary.status == "completed"
    records = records_of(tmp_path / "exp-a")
    assert [r["round"] for r in records] == [1, 2, 3]

    scalars, events = tensorboard_scalars(tmp_path / "tb" / "exp-a")
    assert set(SCALARS) <= set(scalars)
    for key in SCALARS:  # TensorBoard keeps float32
        assert scalars[key] == [(r["round"], pytest.approx(r[key], rel=1e-6)) for r in records]
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| rounds | 3 |" in config_text and "never-tracked-secret" not in config_text

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("trial")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert (run.info.run_name, run.info.status) == ("exp-a", "FINISHED")
    assert run.data.params["rounds"] == "3"
    assert run.data.params["client_optimizer.lrate"] == "0.5"
    assert not any("never-tracked-secret" in v for v in run.data.params.values())
    assert not any(k.startswith("tokens") for k in run.data.params)
    assert run.data.tags["fedpipe.output_dir"] == str(tmp_path / "exp-a")
    for key in SCALARS:
        history = client.get_metric_history(run.info.run_id, key)
        got = sorted((m.step, m.value) for m in history)
        assert got == [(r["round"], pytest.approx(r[key])) for r in records]


def test_a_tensorboard_folder_of_an_earlier_run_is_refused_then_replaced(tmp_path: Path) -> None:
    sim = sim_config(tmp_path, rounds=2, tensorboard_dir=str(tmp_path / "tb"))
    simulate(sim)
    shutil.rmtree(tmp_path / "exp-a")  # the run is gone by hand; its events are still there
    with pytest.raises(ConfigError, match=r"holds the TensorBoard events of an earlier run"):
        simulate(sim)
    assert not (tmp_path / "exp-a" / "metrics.jsonl").exists()
    simulate(sim, overwrite=True)
    scalars, _ = tensorboard_scalars(tmp_path / "tb" / "exp-a")
    assert [step for step, _ in scalars["loss"]] == [1, 2]  # the new run's, once each
    assert len(list((tmp_path / "tb" / "exp-a").glob("events.out.tfevents.*"))) == 1


@pytest.mark.parametrize(
    "module, setting, expected",
    [
        (
            "tensorboardX",
            'tracking.tensorboard_dir="tb"',
            "tracking.tensorboard_dir needs tensorboardX: pip install 'fedpipe[tensorboard]'",
        ),
        (
            "mlflow",
            'tracking.mlflow_uri="file:./mlruns"',
            "tracking.mlflow_uri needs mlflow: pip install 'fedpipe[mlflow]'",
        ),
        (
            "prometheus_client",
            "metrics_port=0",
            "metrics_port needs prometheus-client: pip install 'fedpipe[prometheus]'",
        ),
    ],
    ids=["tensorboard", "mlflow", "prometheus"],
)
def test_a_missing_extra_is_one_line_and_exit_2_before_the_port_opens(
    tmp_path: Path, module: str, setting: str, expected: str
) -> None:
    # The package is hidden from this process only: an import of it fails as if absent.
    hide = f"import sys; sys.modules[{module!r}] = None; from fedpipe.cli import main; "
    port = free_port()
    model = ["--set", "model.config.n_features=64", "--set", "model.config.n_classes=10"]
    argv = ["server", "--port", str(port), "--output-dir", "run", *model, "--set", setting]
    result = subprocess.run(
        [sys.executable, "-c", hide + "sys.exit(main(sys.argv[1:]))", *argv],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),  # this checkout's fedpipe, from tmp_path
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"fedpipe server: {expected}"
    assert "Traceback" not in result.stderr
    assert "listening on" not in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_grpc_simulation_tracks_from_its_server_process_and_overwrites_its_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # this test reads the file store
    uri = f"file:{tmp_path / 'mlruns'}"
    tracking = {"tensorboard_dir": str(tmp_path / "tb"), "mlflow_uri": uri}
    sim = sim_config(tmp_path, rounds=2, **tracking)
    server = sim.server.model_copy(update={"tokens": {}})  # spawned clients present none
    sim = sim.model_copy(update={"transport": "grpc", "server": server})
    for overwrite in (False, True):  # the second run replaces the first, its events too
        assert simulate(sim, overwrite=overwrite).status == "completed"
    scalars, _ = tensorboard_scalars(tmp_path / "tb" / "exp-a")
    records = records_of(tmp_path / "exp-a")
    assert scalars["accuracy"] == [(r["round"], pytest.approx(r["accuracy"])) for r in records]
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("fedpipe")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]  # one MLflow run each
