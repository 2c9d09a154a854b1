"""The files of a gRPC simulation are named by each client's position, never by its name:
a name is 1-128 printable characters, ``/`` and ``..`` included."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from fedpipe.common.config import SimulationConfig
from fedpipe.common.data import Dataset
from fedpipe.server.simulation import SimulationError, client_datasets, simulate_grpc

NAMES = ["../escape", "-a/b"]  # "-": not an option of the client command
MODEL = {"name": "softmax-regression", "config": {"n_features": 64, "n_classes": 10}}


def simulation(tmp_path: Path, rounds: int) -> SimulationConfig:
    server = {
        "rounds": rounds,
        "min_clients": 2,
        "output_dir": str(tmp_path / "run"),
        "model": MODEL,
    }
    return SimulationConfig.model_validate(
        {"n_clients": 2, "dataset": "digits", "partition": {"scheme": "iid"}, "server": server}
    )


@pytest.fixture
def temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The system temporary folder, inside ``tmp_path``: where a name's ``..`` would lead."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def named(sim: SimulationConfig, names: list[str]) -> list[tuple[str, Dataset, Dataset | None]]:
    return [
        (name, train, test)
        for name, (_, train, test) in zip(names, client_datasets(sim), strict=True)
    ]


def test_clients_with_slashes_in_their_names_write_only_their_run_folders(
    tmp_path: Path, temp_dir: Path
) -> None:
    sim = simulation(tmp_path, rounds=1)
    summary = simulate_grpc(sim, named(sim, NAMES), timeout=120.0)
    assert summary.status == "completed" and summary.rounds_completed == 1
    logs = tmp_path / "run" / "logs"
    assert {p.name for p in logs.iterdir()} == {"server.log", "client-0.log", "client-1.log"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tmp"]
    assert list(temp_dir.iterdir()) == []  # the clients' data folders went with the run
    assert " as ../escape\n" in (logs / "client-0.log").read_text()
    assert " as -a/b\n" in (logs / "client-1.log").read_text()
    lines = (tmp_path / "run" / "clients.jsonl").read_text().splitlines()
    assert {json.loads(line)["client"] for line in lines} == set(NAMES)


def test_a_failed_runs_report_shows_each_clients_log_under_its_name(
    tmp_path: Path, temp_dir: Path
) -> None:
    sim = simulation(tmp_path, rounds=1000)
    with pytest.raises(SimulationError) as err:
        simulate_grpc(sim, named(sim, ["-v", "a/b"]), timeout=4.0)
    message = str(err.value)
    assert message.startswith("gRPC simulation failed: the run took over 4s")
    # Each header names the client whose log follows (its lines may not name it yet).
    first = message.index("--- client-0.log (client '-v', last ")
    assert message.index("--- client-1.log (client 'a/b', last ") > first
    logs = tmp_path / "run" / "logs"
    assert message.endswith(f"all logs are in {logs}/")
    assert {p.name for p in logs.iterdir()} == {"server.log", "client-0.log", "client-1.log"}


def test_two_clients_of_one_name_are_refused_before_any_process_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The processes are kept by name: the first "a" would be dropped, never stopped after.
    from fedpipe.server import simulation as simulation_module

    def spawn(*args: object, **kwargs: object) -> None:
        raise AssertionError("a process started")

    monkeypatch.setattr(simulation_module, "_spawn", spawn)
    sim = simulation(tmp_path, rounds=1)
    clients = named(sim, ["a", "b"])
    with pytest.raises(ValueError, match=r"client names must be unique: 'a' is given 2 times"):
        simulate_grpc(sim, [clients[0], clients[1], clients[0]], timeout=10.0)


def test_an_in_process_simulation_refuses_two_clients_of_one_name(tmp_path: Path) -> None:
    # the client pool keeps clients by name: the second "a" would replace the first, silently
    import asyncio

    from fedpipe.server.simulation import simulate_inprocess

    sim = simulation(tmp_path, rounds=1)
    clients = named(sim, ["a", "b"])
    with pytest.raises(ValueError, match=r"client names must be unique: 'a' is given 2 times"):
        asyncio.run(simulate_inprocess(sim, [clients[0], clients[1], clients[0]]))
    assert not (tmp_path / "run" / "summary.json").exists()
