"""A client killed halfway through its reply's payload: the round's sum never holds any of
it, so the run ends with the weights of the same run without that client."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from tests.faults.conftest import finish, server_config, spawn_client, spawn_server


def final_model(path: Path) -> dict[str, np.ndarray]:
    with np.load(path / "model.npz") as npz:
        return {key: npz[key] for key in npz.files}


def run(
    tmp_path: Path, client_data: list[Path], procs: list[subprocess.Popen[str]], killed: bool
) -> dict[str, np.ndarray]:
    folder = tmp_path / ("killed" if killed else "clean")
    config = server_config(
        folder,
        rounds=1,
        min_clients=3 if killed else 2,
        min_results=2,
        eval_every=0,
        chunk_mib=0.0010004,  # 1049-byte chunks: floats cut across chunk boundaries
        stage_replies_from_bytes=0,  # this small model's replies are staged on disk too
    )
    server = spawn_server(config)
    procs.append(server)
    clients = [spawn_client(config.port, f"site-{i}", client_data[i]) for i in range(2)]
    if killed:
        module = "tests.faults.killed_mid_reply_client"
        clients.append(spawn_client(config.port, "site-2", client_data[2], module=module))
    procs += clients
    assert server.wait(90) == 0, (folder / "server.log").read_text()
    if killed:
        code, out = finish(clients[2], 30)
        assert code == -9 and "killed after" in out, out
    return final_model(Path(config.output_dir))


def test_a_client_killed_mid_payload_leaves_no_trace_in_the_sum(
    tmp_path: Path, client_data: list[Path], procs: list[subprocess.Popen[str]]
) -> None:
    with_kill = run(tmp_path, client_data, procs, killed=True)
    without = run(tmp_path, client_data, procs, killed=False)
    assert with_kill.keys() == without.keys()
    for key in without:
        np.testing.assert_array_equal(with_kill[key], without[key])
