"""A user's own optimizer module, in a package of its own, used by name through real
``fedpipe server`` / ``fedpipe client`` / ``fedpipe simulate`` processes.

The package (the seed's tutorial RMSProp, registered as ``my-rmsprop``) is reachable only
through the PYTHONPATH of the processes: this test process never imports it. Its maths are
those of the built-in ``rmsprop``, so an in-process run with the built-in is the reference
the real processes must reproduce.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedpipe.common.config import ServerConfig, SimulationConfig
from fedpipe.common.data import load_dataset
from fedpipe.common.outcome import ExitCode
from fedpipe.common.vector import Vector
from fedpipe.server.simulation import (
    SimulationError,
    client_datasets,
    simulate,
    simulate_grpc,
    simulate_inprocess,
)
from tests.integration.conftest import finish, server_config
from tests.plugin_packages import RMSPROP_PACKAGE, write_dist_info, write_module
from tests.plugin_packages import write_rmsprop_package as write_package

PLUGIN = f"{RMSPROP_PACKAGE}.modules"
RMSPROP = {"beta": 0.9, "eps": 1e-7}
# float64: the reference and the real run differ only by the order replies are summed in.
MODEL = {
    "name": "softmax-regression",
    "config": {"n_features": 64, "n_classes": 10, "dtype": "float64"},
}
TIMEOUT = 120.0


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``source``: the package alone; ``installed``: its ``.dist-info`` with the entry point."""
    source = tmp_path_factory.mktemp("source")
    write_package(source)
    installed = tmp_path_factory.mktemp("installed")
    write_dist_info(installed, "fedext-rmsprop", "0.1", {"rmsprop": PLUGIN})
    return {"source": source, "installed": installed}


def env(*paths: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(map(str, paths)))


def fedpipe(args: list[str], environ: dict[str, str], **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fedpipe", "-v", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environ,
        **kwargs,
    )


def spawn_server(config: ServerConfig, environ: dict[str, str]) -> subprocess.Popen[str]:
    """A ``fedpipe server`` process; its log goes to ``<output_dir>/../server.log``."""
    out = Path(config.output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / "server.json"
    path.write_text(config.model_dump_json())
    args = ["-m", "fedpipe", "-v", "server", "--config", str(path), "--progress", "none"]
    with open(out.parent / "server.log", "w") as log:
        return subprocess.Popen(
            [sys.executable, *args],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=environ,
        )


def client_args(port: int, name: str, data: Path) -> list[str]:
    return ["client", "--server", f"127.0.0.1:{port}", "--name", name, "--data", str(data)]


def rmsprop_config(tmp_path: Path, module: str, **overrides: Any) -> ServerConfig:
    """Clients and server both run ``module`` (RMSProp) in their optimizer pipelines."""
    pipeline = [[module, RMSPROP]] if module else []
    return server_config(
        tmp_path,
        rounds=3,
        model=MODEL,
        client_optimizer={"lrate": 0.01, "modules": pipeline},
        server_optimizer={"lrate": 0.02, "modules": pipeline},
        **overrides,
    )


def reference(tmp_path: Path, client_data: list[Path], module: str) -> Vector:
    """The same run in this process, with the clients' data split as `fedpipe client` does."""
    clients = []
    for i, folder in enumerate(client_data[:3]):
        train, test = load_dataset(folder).split(1.0 - 0.2, seed=0)
        clients.append((f"site-{i}", train, test))
    config = rmsprop_config(tmp_path / f"reference-{module or 'none'}", module)
    sim = SimulationConfig(n_clients=3, server=config)
    return asyncio.run(simulate_inprocess(sim, clients)).weights


def final_weights(output_dir: Path) -> Vector:
    with np.load(output_dir / "model.npz", allow_pickle=False) as npz:
        return Vector({k: npz[k] for k in npz.files})


def rounds_in(output_dir: Path) -> list[int]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["round"] for line in lines]


@pytest.mark.parametrize("how", ["entry-point", "plugin-flag-and-config"])
def test_a_plugin_module_is_used_by_name_by_real_server_and_clients(
    tmp_path: Path,
    client_data: list[Path],
    processes: list[subprocess.Popen[str]],
    package: dict[str, Path],
    how: str,
) -> None:
    flags: list[list[str]]
    if how == "entry-point":  # installed: nothing names the plugin
        environ = env(package["source"], package["installed"])
        config = rmsprop_config(tmp_path, "my-rmsprop")
        flags = [[], [], []]
    else:  # the server's config, two clients' --plugin, one client's config file
        environ = env(package["source"])
        config = rmsprop_config(tmp_path, "my-rmsprop", plugins=[PLUGIN])
        (tmp_path / "client.toml").write_text(f'plugins = ["{PLUGIN}"]\n')
        flags = [
            ["--plugin", PLUGIN],
            ["--plugin", PLUGIN],
            ["--config", str(tmp_path / "client.toml")],
        ]
    processes.append(spawn_server(config, environ))
    clients = [
        fedpipe(
            [
                *client_args(config.port, f"site-{i}", client_data[i]),
                "--eval-fraction",
                "0.2",
                *flags[i],
            ],
            environ,
        )
        for i in range(3)
    ]
    processes.extend(clients)
    outcomes = [finish(proc, TIMEOUT) for proc in clients]
    assert [code for code, _ in outcomes] == [0, 0, 0], outcomes
    assert finish(processes[0], TIMEOUT)[0] == 0, (tmp_path / "server.log").read_text()
    out = Path(config.output_dir)
    assert rounds_in(out) == [1, 2, 3]
    weights = final_weights(out)
    # The user's module computes what the built-in rmsprop computes: the real processes ran it.
    assert weights.allclose(reference(tmp_path, client_data, "rmsprop"), rtol=1e-7, atol=1e-9)
    assert not weights.allclose(reference(tmp_path, client_data, ""), rtol=1e-2, atol=1e-3)


def test_a_server_never_makes_a_client_import_a_plugin(
    tmp_path: Path,
    client_data: list[Path],
    processes: list[subprocess.Popen[str]],
    package: dict[str, Path],
) -> None:
    # The package is importable by the client, but nothing the client's owner set names it.
    environ = env(package["source"])
    config = rmsprop_config(tmp_path, "my-rmsprop", plugins=[PLUGIN], min_clients=1)
    processes.append(spawn_server(config, environ))
    client = fedpipe(client_args(config.port, "site-0", client_data[0]), environ)
    processes.append(client)
    code, out = finish(client, TIMEOUT)
    assert code == ExitCode.REJECTED, out
    last = out.strip().splitlines()[-1]
    assert (
        "the server dropped this client from the run: client site-0: UnknownNameError: "
        "unknown module 'my-rmsprop'; known module names: adagrad, adam"
    ) in last, out
    assert "`--plugin mypkg.fedext`" in last and "'fedpipe.plugins' group" in last
    server_log = (tmp_path / "server.log").read_text()
    assert (
        "client site-0 failed: client site-0: UnknownNameError: unknown module 'my-rmsprop'"
        in server_log
    )


def write_simulation(tmp_path: Path, server: dict[str, Any]) -> Path:
    sim = {
        "n_clients": 2,
        "dataset": "digits",
        "transport": "grpc",
        "partition": {"scheme": "iid"},
        "server": {"rounds": 2, "min_clients": 2, "output_dir": str(tmp_path / "run"), **server},
    }
    path = tmp_path / "sim.json"
    path.write_text(json.dumps(sim))
    return path


def run_simulation(config: Path, environ: dict[str, str], *flags: str) -> tuple[int, str]:
    return finish(fedpipe(["simulate", "--config", str(config), *flags], environ), TIMEOUT)


def test_grpc_simulation_hands_its_plugins_to_the_processes_it_spawns(
    tmp_path: Path, package: dict[str, Path]
) -> None:
    optimizer = {"lrate": 0.01, "modules": [["my-rmsprop", RMSPROP]]}
    config = write_simulation(tmp_path, {"client_optimizer": optimizer, "model": MODEL})
    code, out = run_simulation(config, env(package["source"]), "--plugin", PLUGIN)
    assert code == 0, out
    assert rounds_in(tmp_path / "run") == [1, 2]
    assert {p.name for p in (tmp_path / "run" / "logs").iterdir()} == {
        "server.log",
        "client-0.log",
        "client-1.log",
    }
    builtin = json.loads(config.read_text())
    builtin["transport"] = "inprocess"
    builtin["server"]["client_optimizer"]["modules"] = [["rmsprop", RMSPROP]]
    builtin["server"]["output_dir"] = str(tmp_path / "reference")
    expected = simulate(SimulationConfig.model_validate(builtin)).weights
    assert final_weights(tmp_path / "run").allclose(expected, rtol=1e-7, atol=1e-9)


def test_grpc_simulation_with_a_model_import_path_completes(
    tmp_path: Path, package: dict[str, Path]
) -> None:
    # Its clients used to refuse the untrusted import path, and the server waited 300 s.
    model = {"name": f"{RMSPROP_PACKAGE}.models:build", "config": {"n_classes": 10}}
    config = write_simulation(tmp_path, {"model": model, "wait_timeout": 300.0})
    code, out = run_simulation(config, env(package["source"]))
    assert code == 0, out
    assert rounds_in(tmp_path / "run") == [1, 2]
    assert set(final_weights(tmp_path / "run").specs()) == {"kernel", "bias"}


def test_grpc_simulation_whose_clients_all_fail_stops_and_shows_their_logs(
    tmp_path: Path, package: dict[str, Path]
) -> None:
    write_module(
        package["source"],
        f"{RMSPROP_PACKAGE}.server_only",
        "import sys\nif 'client' in sys.argv:\n    raise ImportError('needs the licence server')\n",
    )
    config = write_simulation(tmp_path, {"wait_timeout": 300.0})
    code, out = run_simulation(
        config, env(package["source"]), "--plugin", f"{RMSPROP_PACKAGE}.server_only"
    )
    assert code == 1, out
    assert "gRPC simulation failed: every client process exited with an error" in out
    assert "--- client-0.log" in out and "needs the licence server" in out
    logs = tmp_path / "run" / "logs"
    assert f"all logs are in {logs}/" in out
    assert "needs the licence server" in (logs / "client-1.log").read_text()


def test_grpc_simulation_past_its_timeout_is_stopped_and_says_where_its_logs_are(
    tmp_path: Path,
) -> None:
    sim = SimulationConfig.model_validate(
        json.loads(write_simulation(tmp_path, {"rounds": 1000, "model": MODEL}).read_text())
    )
    clients = client_datasets(sim)
    with pytest.raises(SimulationError) as err:
        simulate_grpc(sim, clients, timeout=4.0)
    message = str(err.value)
    logs = tmp_path / "run" / "logs"
    assert message.startswith("gRPC simulation failed: the run took over 4s")
    assert "--- server.log" in message and "--- client-0.log" in message
    assert message.endswith(f"all logs are in {logs}/")
    assert {p.name for p in logs.iterdir()} == {"server.log", "client-0.log", "client-1.log"}
