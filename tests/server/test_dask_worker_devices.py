"""Which device each Dask worker puts its model on: a local cluster's workers go round the
GPUs the machine has, not all on the first."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("dask.distributed")

from fedpipe.server.transports.dask import worker as dask_worker


@pytest.mark.parametrize(
    ("names", "want"),
    [
        ([0, 1, 2, 3, 4], ["cuda:0", "cuda:1", "cuda:2", "cuda:0", "cuda:1"]),
        (["node-a"] * 3, ["cuda:1"] * 3),  # a named worker: a fixed pick, run after run
    ],
)
def test_workers_of_a_machine_with_several_gpus_each_take_one(
    monkeypatch: pytest.MonkeyPatch, names: list[Any], want: list[str]
) -> None:
    placed: list[list[str]] = []
    monkeypatch.setattr(
        dask_worker, "resolve_devices", lambda device: ["cuda:0", "cuda:1", "cuda:2"]
    )
    monkeypatch.setattr(dask_worker, "SharedModels", lambda devices: placed.append(devices))
    monkeypatch.setattr(dask_worker.RunSetup, "from_data", staticmethod(lambda data: None))
    plugin = dask_worker.WorkerClients(setup={}, plugins=[], device="cuda")
    for n, name in enumerate(names):
        plugin.setup(SimpleNamespace(name=name, address=f"tcp://127.0.0.1:{4000 + n}"))  # type: ignore[arg-type]
    assert placed == [[device] for device in want]


def test_a_worker_that_sees_one_gpu_uses_it_and_no_device_leaves_the_model_be(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    placed: list[list[str]] = []
    monkeypatch.setattr(dask_worker, "SharedModels", lambda devices: placed.append(devices))
    monkeypatch.setattr(dask_worker.RunSetup, "from_data", staticmethod(lambda data: None))
    monkeypatch.setattr(dask_worker, "resolve_devices", lambda device: ["cuda:0"])
    dask_worker.WorkerClients(setup={}, plugins=[], device="cuda").setup(
        SimpleNamespace(name=7, address="tcp://127.0.0.1:4001")  # type: ignore[arg-type]
    )
    monkeypatch.setattr(dask_worker, "resolve_devices", lambda device: [])
    dask_worker.WorkerClients(setup={}, plugins=[], device=None).setup(
        SimpleNamespace(name=7, address="tcp://127.0.0.1:4002")  # type: ignore[arg-type]
    )
    assert placed == [["cuda:0"], []]
