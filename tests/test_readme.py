"""The README's code is what a new user copies first: it must work as written."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedpipe.common import registry
from fedpipe.common.codec import state_from_bytes, state_to_bytes
from fedpipe.common.config import OptimizerConfig
from fedpipe.common.vector import Vector

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_readme_module_example_registers_trains_and_round_trips_its_state() -> None:
    (source,) = [b for b in blocks("python") if "class RMSProp" in b]
    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(source, "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    assert "my-rmsprop" in registry.names("module")
    module = registry.build("module", "my-rmsprop", {"beta": 0.5})
    g = Vector({"w": np.array([2.0, -4.0], np.float32)})
    out = module.run(g)
    # v = 0.5 * g^2 ; out = g / (sqrt(v) + eps) = sign(g) * sqrt(2)
    assert np.allclose(out["w"], [np.sqrt(2), -np.sqrt(2)], rtol=1e-6)
    clone = registry.build("module", "my-rmsprop", module.get_config())
    clone.set_state(state_from_bytes(state_to_bytes(module.get_state())))
    assert module.run(g).array_equal(clone.run(g))


def test_readme_optimizer_toml_builds_the_documented_pipelines() -> None:
    (toml,) = [b for b in blocks("toml") if "client_optimizer" in b]
    server = tomllib.loads(toml)["server"]
    client = OptimizerConfig.model_validate(server["client_optimizer"]).build()
    assert [m.name for m in client.modules] == ["momentum", "l2-global-clipping"]
    assert [r.name for r in client.regularizers] == ["fedprox"]
    fedadam = OptimizerConfig.model_validate(server["server_optimizer"]).build()
    assert [m.name for m in fedadam.modules] == ["adam"]


def test_readme_notebook_example_runs_and_its_histories_hold_the_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (source,) = [b for b in blocks("python") if "fedpipe.simulate" in b]
    monkeypatch.chdir(tmp_path)  # its runs/ folders go here
    namespace: dict[str, Any] = {"__name__": "readme_notebook"}
    exec(compile(source, "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in lines] == ["FedAvg: completed", "FedAdam: completed"]
    fedavg, fedadam = namespace["fedavg"], namespace["fedadam"]
    for history, folder in ((fedavg, "fedavg"), (fedadam, "fedadam")):
        assert history.rounds_completed == 5
        assert [r for r, _ in history.metric("accuracy")] == [1, 2, 3, 4, 5]
        with np.load(tmp_path / "runs" / folder / "model.npz") as npz:
            assert np.array_equal(npz["kernel"], history.weights["kernel"])
        assert history.metric("accuracy")[-1][1] > 0.8  # digits, 10 classes: it learned
    assert [m.name for m in fedadam.config.server.server_optimizer.build().modules] == ["adam"]
    assert namespace["kernel"] is fedadam.weights["kernel"]


def test_readme_gpu_simulation_config_is_valid_and_names_every_gpu() -> None:
    from fedpipe.common.config import SimulationConfig

    (toml,) = [b for b in blocks("toml") if 'device = "cuda"' in b]
    sim = SimulationConfig.model_validate(tomllib.loads(toml))
    assert (sim.device, sim.mode, sim.transport) == ("cuda", "vectorized", "inprocess")
    assert sim.stack_clients == 1024
    assert sim.server.model.name == "mypkg.models:build" and sim.n_clients == 100


def test_readme_dask_configs_are_valid_for_all_cores_and_a_cluster() -> None:
    from fedpipe.common.config import SimulationConfig

    laptop, slurm = [
        SimulationConfig.model_validate(tomllib.loads(b))
        for b in blocks("toml")
        if 'transport = "dask"' in b
    ]
    assert (laptop.transport, laptop.dask.workers, laptop.dask.scheduler) == ("dask", 8, None)
    assert slurm.dask.scheduler == "tcp://10.1.2.3:8786" and slurm.n_clients == 10000
