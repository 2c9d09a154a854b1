"""kill -9 of the server and of clients, then resume: final weights equal an uninterrupted
run's bit for bit, with stateful client optimizers (momentum, Scaffold).

Two clients: the server sums replies in arrival order, and with two replies that order cannot
change a bit (float addition commutes), so a replayed round must give the very same sum.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedpipe.common.config import ServerConfig
from fedpipe.server.checkpoint import load_checkpoint
from tests.faults.conftest import server_config, spawn_client, spawn_server

ROUNDS = 4
WAIT = 60.0  # seconds any one step may take on a slow, shared machine

ALGORITHMS: dict[str, dict[str, Any]] = {
    "momentum": {
        "client_optimizer": {"lrate": 0.1, "modules": [["momentum", {"beta": 0.9}]]},
        "server_optimizer": {"lrate": 1.0, "modules": [["adam", {"eps": 1e-3}]]},
    },
    "adam": {
        "client_optimizer": {"lrate": 0.01, "modules": ["adam"]},
        "server_optimizer": {"lrate": 1.0, "modules": [["momentum", {"beta": 0.5}]]},
    },
    "scaffold": {
        "client_optimizer": {"lrate": 0.2, "modules": ["scaffold-client"]},
        "server_optimizer": {"lrate": 1.0, "modules": ["scaffold-server"]},
    },
}


class Tail:
    """A process's stdout lines, gathered by a thread so that every wait has a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.lines.append("<EOF>")
            self._changed.notify_all()

    def wait(self, predicate: Callable[[str], bool], timeout: float = WAIT) -> str:
        with self._changed:
            found = self._changed.wait_for(
                lambda: any(predicate(x) for x in self.lines) or "<EOF>" in self.lines, timeout
            )
            hits = [x for x in self.lines if predicate(x)]
        assert found and hits, f"no such line from pid {self.proc.pid}: {self.lines[-20:]}"
        return hits[0]

    def text(self) -> str:
        with self._changed:
            return "\n".join(self.lines)


def round_line(number: int) -> Callable[[str], bool]:
    """The server's JSON progress line of round ``number``."""
    return lambda line: line.startswith("{") and json.loads(line).get("round") == number


class Federation:
    """One run: a server process and two client processes on a free loopback port."""

    def __init__(
        self,
        tmp_path: Path,
        data: list[Path],
        procs: list[Any],
        algorithm: str,
        state_dir: Path | None = None,
    ) -> None:
        self.config: ServerConfig = server_config(
            tmp_path,
            rounds=ROUNDS,
            min_clients=2,
            round_timeout=20.0,
            **ALGORITHMS[algorithm],
        )
        self.out = Path(self.config.output_dir)
        self.data, self.procs = data, procs
        client_toml = tmp_path / "client.toml"
        client_toml.write_text("retry_initial = 0.2\nretry_max = 1.0\nretry_timeout = 120.0\n")
        self.client_args = ["--config", str(client_toml)]
        self.state_dir = state_dir  # site-0's, if it keeps its state on disk
        self.server = self.start_server()
        self.clients = [self.start_client(i) for i in range(2)]

    def start_server(self, *extra: str) -> Tail:
        proc = spawn_server(self.config, *extra)
        self.procs.append(proc)
        return Tail(proc)

    def start_client(self, index: int, state_dir: Path | None = None) -> Tail:
        state_dir = state_dir or (self.state_dir if index == 0 else None)
        extra = ["--state-dir", str(state_dir)] if state_dir else []
        proc = spawn_client(
            self.config.port, f"site-{index}", self.data[index], *self.client_args, *extra
        )
        self.procs.append(proc)
        return Tail(proc)

    def kill_server(self) -> None:
        self.server.proc.send_signal(signal.SIGKILL)
        self.server.proc.wait(WAIT)

    def resume(self) -> int:
        """Restart the server with ``--resume``; the round it resumed from."""
        self.server = self.start_server("--resume")
        pattern = re.compile(r"resumed from .* at round (\d+)|no checkpoint at")
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            found = pattern.search(self.log())
            if found:
                return int(found.group(1) or 0)
            time.sleep(0.05)
        raise AssertionError(f"the server did not resume: {self.log()[-2000:]}")

    def log(self) -> str:
        return (self.out.parent / "server.log").read_text()

    def finish(self) -> dict[str, np.ndarray]:
        """Wait for the end of the run; the final weights (every process exited 0)."""
        for tail in (self.server, *self.clients):
            code = tail.proc.wait(WAIT)
            assert code == 0, f"pid {tail.proc.pid} exited {code}: {tail.text()[-3000:]}"
        with np.load(self.out / "model.npz", allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}

    def metric_rounds(self) -> list[int]:
        lines = (self.out / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["round"] for line in lines]

    def scaffold_clients(self) -> int:
        """The number of clients Scaffold's server module counts (final checkpoint)."""
        modules = load_checkpoint(self.out / "checkpoint.fpk")["optimizer"]["modules"]  # type: ignore[index]
        return len(modules[0]["state"]["clients"])  # type: ignore[index]


def same_weights(left: dict[str, np.ndarray], right: dict[str, np.ndarray]) -> bool:
    return left.keys() == right.keys() and all(np.array_equal(left[k], right[k]) for k in left)


@pytest.fixture(scope="module")
def references(
    tmp_path_factory: pytest.TempPathFactory, client_data: list[Path]
) -> dict[str, dict[str, np.ndarray]]:
    """Final weights of an uninterrupted run, per algorithm (the runs go side by side)."""
    procs: list[Any] = []
    try:
        runs = {
            algorithm: Federation(tmp_path_factory.mktemp(algorithm), client_data, procs, algorithm)
            for algorithm in ALGORITHMS
        }
        weights = {algorithm: run.finish() for algorithm, run in runs.items()}
        assert all(run.metric_rounds() == [1, 2, 3, 4] for run in runs.values())
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(WAIT)
    return weights


def trained(number: int) -> Callable[[str], bool]:
    """A client's log line: it trained round ``number`` and is about to send its reply."""
    return lambda line: f"round {number}:" in line and "steps" in line


def after_round_1(run: Federation) -> None:
    """Between rounds: round 1 checkpointed, round 2 starting."""
    run.server.wait(round_line(1))


def after_site_0_trained_round_3(run: Federation) -> None:
    """Mid-round: one reply on its way or folded, the other client may be training."""
    run.clients[0].wait(trained(3))


def after_both_trained_round_2(run: Federation) -> None:
    """Late in a round: both replies sent; folding, evaluating or checkpointing."""
    for client in run.clients:
        client.wait(trained(2))


TRIALS = [
    (after_round_1, "momentum"),
    (after_round_1, "scaffold"),
    (after_site_0_trained_round_3, "momentum"),
    (after_site_0_trained_round_3, "adam"),
    (after_site_0_trained_round_3, "scaffold"),
    (after_both_trained_round_2, "momentum"),
    (after_both_trained_round_2, "scaffold"),
]


@pytest.mark.parametrize(
    ("moment", "algorithm"), TRIALS, ids=[f"{m.__name__}-{a}" for m, a in TRIALS]
)
def test_server_killed_then_resumed_gives_the_uninterrupted_weights(
    tmp_path: Path,
    client_data: list[Path],
    procs: list[Any],
    references: dict[str, dict[str, np.ndarray]],
    algorithm: str,
    moment: Callable[[Federation], None],
) -> None:
    run = Federation(tmp_path, client_data, procs, algorithm)
    moment(run)
    run.kill_server()
    # What a crash between a round's metrics line and its checkpoint leaves, torn tail included.
    lost = int(load_checkpoint(run.out / "checkpoint.fpk")["round"]) + 1  # type: ignore[arg-type]
    with open(run.out / "metrics.jsonl", "a") as fh:
        fh.write(f'{{"round": {lost}, "stale": true}}\n{{"round": 4, "sta')
    resumed_at = run.resume()
    weights = run.finish()
    rolled_back = [c.text().count("rolling back") for c in run.clients]
    print(f"resumed at round {resumed_at}; rollbacks per client {rolled_back}")  # for -rP
    assert resumed_at < ROUNDS
    assert same_weights(weights, references[algorithm]), f"resumed at round {resumed_at}"
    if moment is after_site_0_trained_round_3 and resumed_at == 2:
        assert "round 3: the server continues from this client's round 2, not 3: rolling back" in (
            run.clients[0].text()
        )
    assert run.metric_rounds() == [1, 2, 3, 4]
    assert "stale" not in (run.out / "metrics.jsonl").read_text()
    csv_rounds = [line.split(",")[0] for line in (run.out / "metrics.csv").read_text().split()]
    assert csv_rounds == ["round", "1", "2", "3", "4"]
    if algorithm == "scaffold":
        assert run.scaffold_clients() == 2


@pytest.mark.parametrize("keeps_state", [True, False], ids=["state-dir", "state-lost"])
def test_client_and_server_killed_together(
    tmp_path: Path,
    client_data: list[Path],
    procs: list[Any],
    references: dict[str, dict[str, np.ndarray]],
    keeps_state: bool,
) -> None:
    """A power cut: site-0 and the server die; site-0 restarts with its state dir (exact) or
    with an empty one (it re-joins, and Scaffold still counts two clients)."""
    state_dir = tmp_path / "site-0-state"
    run = Federation(tmp_path, client_data, procs, "scaffold", state_dir)
    run.server.wait(round_line(2))
    run.clients[0].proc.send_signal(signal.SIGKILL)
    run.kill_server()
    assert sorted(p.name for p in state_dir.iterdir())[-1].startswith("state-")
    run.clients[0] = run.start_client(0, state_dir if keeps_state else tmp_path / "empty")
    resumed_at = run.resume()
    weights = run.finish()
    assert resumed_at >= 2
    assert run.metric_rounds() == [1, 2, 3, 4]
    assert run.scaffold_clients() == 2  # never counted twice
    site_0 = run.clients[0].text()
    if keeps_state:
        assert f"continuing from the state of round {resumed_at} in {state_dir}" in site_0
        assert same_weights(weights, references["scaffold"])
    else:
        assert "re-joining with a fresh module state" in site_0
        assert not same_weights(weights, references["scaffold"])  # the lost state mattered


def test_client_killed_mid_round_rejoins_with_its_saved_state(
    tmp_path: Path, client_data: list[Path], procs: list[Any]
) -> None:
    """site-0 dies while the server waits in a round (site-1 frozen); restarted with its state
    dir, it trains the next rounds from its saved state and is not counted twice."""
    state_dir = tmp_path / "site-0-state"
    run = Federation(tmp_path, client_data, procs, "scaffold", state_dir)
    run.server.wait(round_line(1))
    run.clients[1].proc.send_signal(signal.SIGSTOP)  # the round now waits for site-1
    run.clients[0].proc.send_signal(signal.SIGKILL)
    run.clients[0].proc.wait(WAIT)
    run.clients[0] = run.start_client(0)
    run.clients[0].wait(lambda line: "joined run" in line)
    run.clients[1].proc.send_signal(signal.SIGCONT)
    run.finish()
    site_0 = run.clients[0].text()
    assert re.search(
        rf"continuing from the state of round \d in {re.escape(str(state_dir))}", site_0
    )
    last = json.loads((run.out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["clients"] == ["site-0", "site-1"]
    assert run.scaffold_clients() == 2
