"""One run per directory: a run's files are never overwritten or appended to by another run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedpipe.cli import main
from fedpipe.common.config import ConfigError, ServerConfig
from fedpipe.server.clients import ClientPool
from fedpipe.server.rounds import FederatedRun
from fedpipe.server.run_dir import RunDirectoryTaken, fresh_run_dir, prepare_run_dir

SIMULATE = ["simulate", "--rounds", "2", "--clients", "3"]


def rounds_in(run: Path) -> list[int]:
    return [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_simulate_refuses_a_directory_that_holds_a_run_and_leaves_it_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert main([*SIMULATE, "--output-dir", str(run)]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main([*SIMULATE, "--output-dir", str(run), "--rounds", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"fedpipe simulate: {run} already holds a run (")
    assert "metrics.jsonl" in err and "--overwrite" in err and "--resume" not in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_overwrite_replaces_the_run_files_and_keeps_the_others(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main([*SIMULATE, "--output-dir", str(run)]) == 0
    (run / "notes.txt").write_text("mine")
    (run / "plots").mkdir()
    (run / "plots" / "metric-loss.png").write_bytes(b"old chart")
    (run / ".checkpoint.fpk.tmp-123").write_bytes(b"torn")
    assert main([*SIMULATE, "--output-dir", str(run), "--rounds", "3", "--overwrite"]) == 0
    assert rounds_in(run) == [1, 2, 3]  # replaced, not appended to
    assert (run / "notes.txt").read_text() == "mine"
    assert not (run / "plots" / "metric-loss.png").exists()
    assert not (run / ".checkpoint.fpk.tmp-123").exists()
    lines = (run / "clients.jsonl").read_text().splitlines()
    assert sorted({json.loads(line)["round"] for line in lines}) == [1, 2, 3]


def test_server_refuses_a_run_directory_unless_resumed_or_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.fpk").write_bytes(b"an earlier run's")
    config = tmp_path / "server.toml"
    model = "[model]\nconfig = { n_features = 4, n_classes = 3 }\n"
    config.write_text(f'port = 0\noutput_dir = "{run}"\n{model}')
    assert main(["server", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"fedpipe server: {run} already holds a run (checkpoint.fpk)" in err
    assert "--overwrite" in err and "--resume to continue it" in err
    assert (run / "checkpoint.fpk").read_bytes() == b"an earlier run's"
    assert main(["server", "--config", str(config), "--resume", "--overwrite"]) == 2
    assert "--resume continues the run in the directory, --overwrite deletes it" in (
        capsys.readouterr().err
    )


def test_resume_takes_the_directory_and_overwrite_clears_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"round": 1}\n')
    config = ServerConfig.model_validate(
        {"output_dir": str(run), "model": {"config": {"n_features": 4, "n_classes": 3}}}
    )
    with pytest.raises(RunDirectoryTaken, match="already holds a run"):
        FederatedRun(config, ClientPool())
    FederatedRun(config, ClientPool(), resume=True)  # no checkpoint: starts at round 0
    FederatedRun(config, ClientPool(), overwrite=True)
    assert not (run / "metrics.jsonl").exists()
    FederatedRun(config, ClientPool())  # nothing of a run is left to refuse
    with pytest.raises(ConfigError):
        prepare_run_dir(run, resume=True, overwrite=True)


def test_what_a_run_stopped_before_its_first_round_left_is_no_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text('{"status": "stopped", "rounds_completed": 0}')
    (run / "model.npz").write_bytes(b"initial weights")
    prepare_run_dir(run)  # nothing recorded: the directory is free
    assert (run / "model.npz").exists()  # replaced at the new run's end, not before
    (run / "metrics.jsonl").write_text('{"round": 1}\n')
    with pytest.raises(RunDirectoryTaken, match=r"\(metrics.jsonl, summary.json, model.npz\)"):
        prepare_run_dir(run)


def test_simulate_without_a_directory_writes_a_new_one_each_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(SIMULATE) == 0
    assert main(SIMULATE) == 0  # `make run` twice
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2
    for run in runs:
        assert re.fullmatch(r"simulation-\d{8}-\d{6}(-\d+)?", run.name), run.name
        assert rounds_in(run) == [1, 2]
        assert (run / "model.npz").exists() and (run / "summary.json").exists()
    out = capsys.readouterr().out
    for run in runs:
        assert f"in runs/{run.name}/" in out and f"metrics and model in runs/{run.name}/" in out


def test_fresh_run_dirs_started_in_the_same_second_differ(tmp_path: Path) -> None:
    made = [fresh_run_dir(tmp_path, "simulation") for _ in range(3)]
    assert len(set(made)) == 3 and all(p.is_dir() for p in made)


def test_grpc_simulation_overwrites_its_directory_and_its_server_process_accepts_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    args = [*SIMULATE, "--clients", "2", "--transport", "grpc", "--output-dir", str(run)]
    assert main(args) == 0
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main([*args, "--rounds", "3", "--overwrite"]) == 0
    assert rounds_in(run) == [1, 2, 3]
    server_log = (run / "logs" / "server.log").read_text()
    assert "already holds a run" not in server_log
    clients = [json.loads(line) for line in (run / "clients.jsonl").read_text().splitlines()]
    assert len(clients) == 3 * 2 and all(c["replied"] for c in clients)
