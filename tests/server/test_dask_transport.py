"""``transport = "dask"``: the same round loop on a local Dask cluster (2 worker processes).

One cluster for the module, started with the options the transport gives its own local
cluster; the simulations join it by its address (``dask.scheduler``), the way a user joins an
existing cluster.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest

distributed = pytest.importorskip("dask.distributed")
psutil = pytest.importorskip("psutil")

from fedpipe.common.client_name import BadClientName  # noqa: E402
from fedpipe.common.config import DaskConfig, SimulationConfig  # noqa: E402
from fedpipe.common.data import Dataset  # noqa: E402
from fedpipe.common.privacy.accountant import PrivacyAccountant, RoundEvent  # noqa: E402
from fedpipe.server.simulation import simulate, simulate_inprocess  # noqa: E402
from fedpipe.server.transports.dask.run import local_cluster_options, simulate_dask  # noqa: E402

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    options = local_cluster_options(DaskConfig(workers=2))
    with distributed.LocalCluster(**options) as local:
        yield local


def config(tmp_path: Path, name: str, **changes: Any) -> SimulationConfig:
    server = {
        "rounds": 3,
        "seed": 7,
        "output_dir": str(tmp_path / name),
        "client_optimizer": {"lrate": 0.5},
        "training": {"epochs": 1, "max_steps": 2, "batch_size": 16},
        **changes.pop("server", {}),
    }
    return SimulationConfig.model_validate({"n_clients": 10, "server": server, **changes})


def sockets() -> list[tuple[int, str, Any, Any]]:
    """``(pid, status, local, remote)`` of the inet sockets of this process and its children
    (the cluster's scheduler and nannies live here, its workers are child processes)."""
    me = psutil.Process()
    found = []
    for proc in [me, *me.children(recursive=True)]:
        for conn in proc.net_connections(kind="inet"):
            found.append((proc.pid, conn.status, conn.laddr, conn.raddr))
    return found


def client_rows(run: Path) -> list[dict[str, Any]]:
    """``clients.jsonl`` of ``run`` without the timings."""
    rows = [json.loads(line) for line in (run / "clients.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in rows]


STACKING_OFF = "stacked training off"


def test_dask_trains_like_in_process_on_loopback_only(
    cluster: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Both train stacked (mode "auto", a numpy model): one call per worker and round.
    reference = simulate(config(tmp_path, "inprocess"))
    seen: list[tuple[int, str, Any, Any]] = []
    sim = config(tmp_path, "dask", transport="dask", dask={"scheduler": cluster.scheduler_address})
    with caplog.at_level(logging.INFO, logger="fedpipe.server.cohorts"):
        summary = simulate(sim, on_round=lambda _: seen.extend(sockets()))

    assert not [r for r in caplog.records if STACKING_OFF in r.getMessage()]
    assert summary.status == reference.status == "completed"
    for name, array in reference.weights.coefs.items():
        assert np.array_equal(summary.weights.coefs[name], array), name  # bit for bit
    assert summary.history[-1]["accuracy"] == reference.history[-1]["accuracy"] > 0.5
    assert [r["replied"] for r in summary.history] == [10, 10, 10]
    rows = client_rows(tmp_path / "dask")
    assert rows == client_rows(tmp_path / "inprocess") and len(rows) == 30
    # Every listener and connection of the scheduler, nannies, workers and this client.
    workers = {pid for pid, *_ in seen if pid != os.getpid()}
    assert len(workers) == 2
    assert any(status == psutil.CONN_LISTEN and pid in workers for pid, status, *_ in seen)
    outside = [
        (pid, status, local, remote)
        for pid, status, local, remote in seen
        if ipaddress.ip_address(local.ip) not in LOOPBACK
        or (remote and ipaddress.ip_address(remote.ip) not in LOOPBACK)
    ]
    assert outside == []


def test_a_local_cluster_gets_the_configs_threads_and_resources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No scheduler: the transport starts its own cluster (here in this process, so that the
    # test sees it): 2 workers of 2 threads with {GPU = 1} each, on 127.0.0.1, and the clients
    # train there to in-process's weights.
    started: list[Any] = []
    local = distributed.LocalCluster

    def seen(**options: Any) -> Any:
        started.append(local(**options))
        return started[-1]

    monkeypatch.setattr(distributed, "LocalCluster", seen)
    server = {"rounds": 1, "eval_every": 0}
    reference = simulate(config(tmp_path, "inprocess", n_clients=4, server=server))
    dask = {"workers": 2, "threads_per_worker": 2, "processes": False, "resources": {"GPU": 1}}
    sim = config(tmp_path, "dask", n_clients=4, transport="dask", dask=dask, server=server)
    workers: list[tuple[str, int, dict[str, float]]] = []

    def listed(_: Any) -> None:  # the scheduler runs in this process
        [cluster] = started
        for w in cluster.scheduler.workers.values():
            workers.append((w.address.rsplit(":", 1)[0], w.nthreads, dict(w.resources)))

    summary = simulate(sim, on_round=listed)

    assert workers == [("tcp://127.0.0.1", 2, {"GPU": 1})] * 2
    assert summary.status == "completed" and summary.history[-1]["replied"] == 4
    for name, array in reference.weights.coefs.items():
        assert np.array_equal(summary.weights.coefs[name], array), name


def test_each_worker_is_called_through_one_actor_not_a_task_per_round(
    cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The scheduler sees one task per worker and run (its actor's creation): every round's
    # init, training and evaluation calls go from the server straight to the workers, not
    # relayed by the scheduler (ProxyRPC).
    from fedpipe.server.transports.dask.worker import WorkerCalls

    submitted: list[tuple[Any, Any, tuple[str, ...]]] = []
    submit = distributed.Client.submit

    def counted(self: Any, func: Any, *args: Any, **kwargs: Any) -> Any:
        submitted.append((func, kwargs.get("actor"), tuple(kwargs.get("workers") or ())))
        return submit(self, func, *args, **kwargs)

    relayed: list[Any] = []
    relay = distributed.actor.ProxyRPC

    def through_the_scheduler(*args: Any) -> Any:
        relayed.append(args)
        return relay(*args)

    monkeypatch.setattr(distributed.Client, "submit", counted)
    monkeypatch.setattr(distributed.actor, "ProxyRPC", through_the_scheduler)
    sim = config(tmp_path, "dask", transport="dask", dask={"scheduler": cluster.scheduler_address})
    summary = simulate(sim)

    assert summary.status == "completed"
    assert [r["replied"] for r in summary.history] == [10, 10, 10]
    assert all("accuracy" in r for r in summary.history)  # evaluated each round too
    assert [(func, actor) for func, actor, _ in submitted] == [(WorkerCalls, True)] * 2
    assert {workers for _, _, workers in submitted} == {(w,) for w in cluster.scheduler.workers}
    assert relayed == []


def killing(
    cluster: Any, tmp_path: Path, server: dict[str, Any] | None = None, **changes: Any
) -> SimulationConfig:
    """10 clients, 5 per worker, 1 step each: a worker's 8th step is its 3rd client of round
    2, and that step SIGKILLs the first worker to take it."""
    with distributed.Client(cluster.scheduler_address) as client:
        client.wait_for_workers(2, timeout=180)  # a worker an earlier kill took is back
    model = {
        "name": "tests.dask_models:DyingSoftmax",
        "config": {
            "n_features": 64,
            "n_classes": 10,
            "kill_at": 8,
            "marker": str(tmp_path / "killed"),
        },
    }
    training = {"max_steps": 1, "batch_size": 16}
    # A lost worker the transport missed would hold round 2 until its deadline: a failure.
    server = {
        "model": model,
        "training": training,
        "eval_every": 0,
        "round_timeout": 60,
        **(server or {}),
    }
    return config(
        tmp_path,
        "kill",
        transport="dask",
        dask={"scheduler": cluster.scheduler_address},
        server=server,
        **changes,
    )


def test_dask_clients_that_cannot_train_stacked_train_one_by_one_like_in_process(
    cluster: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A momentum module keeps a state per client: the workers decline, nothing trained
    # twice, and every round goes client by client (said once).
    server = {"client_optimizer": {"lrate": 0.5, "modules": ["momentum"]}}
    reference = simulate(config(tmp_path, "inprocess", server=server))
    sim = config(
        tmp_path,
        "dask",
        transport="dask",
        dask={"scheduler": cluster.scheduler_address},
        server=server,
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fedpipe.server.cohorts"):
        summary = simulate(sim)

    said = [r.getMessage() for r in caplog.records if STACKING_OFF in r.getMessage()]
    assert said == [
        "stacked training off, clients train one after another: client optimizer module "
        "'momentum' runs client by client"
    ]
    assert summary.status == reference.status == "completed"
    for name, array in reference.weights.coefs.items():
        assert np.array_equal(summary.weights.coefs[name], array), name
    assert client_rows(tmp_path / "dask") == client_rows(tmp_path / "inprocess")


def test_a_worker_killed_mid_round_drops_only_its_clients(cluster: Any, tmp_path: Path) -> None:
    # Stacked: the worker dies in its one call of round 2, all its clients' steps at once.
    summary = simulate(killing(cluster, tmp_path))

    assert (tmp_path / "killed").exists()
    assert summary.status == "completed", summary.reason
    replied = [r["clients"] for r in summary.history]
    assert len(replied[0]) == len(replied[2]) == 10  # round 3: re-placed, all back
    names = [f"client-{i}" for i in range(10)]
    # Placement is round robin: the survivor's clients are every other one.
    assert replied[1] in (names[0::2], names[1::2])
    rows = [json.loads(line) for line in (tmp_path / "kill" / "clients.jsonl").open()]
    lost = {row["client"]: row.get("error", "") for row in rows if row["round"] == 2}
    assert sorted(n for n, why in lost.items() if "its Dask worker" in why) == sorted(
        set(names) - set(replied[1])
    )
    assert all(why.endswith(" died") for why in lost.values() if why)


def test_a_dp_sgd_client_placed_afresh_keeps_counting_its_privacy(
    cluster: Any, tmp_path: Path
) -> None:
    dp_sgd = {"clip": 1.0, "noise_multiplier": 1.2, "delta": 1e-5}
    summary = simulate(killing(cluster, tmp_path, dp_sgd=dp_sgd))
    assert summary.status == "completed", summary.reason
    lines = (tmp_path / "kill" / "clients.jsonl").read_text().splitlines()
    epsilons: dict[str, dict[int, float]] = {}
    sizes: dict[str, int] = {}
    for line in map(json.loads, lines):
        if line["replied"]:
            assert line["n_steps"] == 1
            epsilons.setdefault(line["client"], {})[line["round"]] = line["sample_epsilon"]
            sizes[line["client"]] = line["n_samples"]
    moved = sorted(name for name, seen in epsilons.items() if 2 not in seen)
    assert len(moved) == 5 and all(set(epsilons[name]) == {1, 3} for name in moved), epsilons

    def after(name: str, steps: int) -> float:
        """The accountant's ε for ``steps`` of the client's steps (rate batch_size / n)."""
        accountant = PrivacyAccountant("rdp", 1e-5)
        accountant.spend(RoundEvent(1.2, 16 / sizes[name]), steps)
        return accountant.epsilon()

    for name, seen in epsilons.items():
        # Placed afresh in round 3, a client counts its round-1 step too: 2 steps, not 1.
        rounds = [1, 3] if name in moved else [1, 2, 3]
        expected = {r: after(name, i) for i, r in enumerate(rounds, start=1)}
        assert seen == pytest.approx(expected, rel=1e-12), name


def test_dask_clients_train_with_dp_sgd_like_in_process(cluster: Any, tmp_path: Path) -> None:
    # The same client-local noise_seed draws the same batches and noise on a worker.
    dp_sgd = {"clip": 1.0, "noise_multiplier": 1.0}
    reference = simulate(config(tmp_path, "inprocess", noise_seed=5, dp_sgd=dp_sgd))
    sim = config(
        tmp_path,
        "dask",
        noise_seed=5,
        dp_sgd=dp_sgd,
        transport="dask",
        dask={"scheduler": cluster.scheduler_address},
    )
    summary = simulate(sim)
    assert summary.status == reference.status == "completed"
    for name, array in reference.weights.coefs.items():
        assert np.array_equal(summary.weights.coefs[name], array), name
    assert [r["sample_epsilon_max"] for r in summary.history] == [
        r["sample_epsilon_max"] for r in reference.history
    ]


SECURE = {"threshold": 5, "clip": 4.0, "max_weight": 400}


def test_dask_clients_aggregate_securely_like_in_process(cluster: Any, tmp_path: Path) -> None:
    # The masks cancel exactly: the same updates give the same unmasked sum, bit for bit.
    pytest.importorskip("cryptography")
    server = {"secure_aggregation": SECURE, "min_clients": 10, "rounds": 2}
    reference = simulate(config(tmp_path, "inprocess", server=server))
    sim = config(
        tmp_path,
        "dask",
        transport="dask",
        dask={"scheduler": cluster.scheduler_address},
        server=server,
    )
    summary = simulate(sim)
    assert summary.status == reference.status == "completed"
    for name, array in reference.weights.coefs.items():
        assert np.array_equal(summary.weights.coefs[name], array), name
    assert [r["replied"] for r in summary.history] == [10, 10]


def test_a_worker_killed_after_its_clients_shared_keys_leaves_a_recoverable_sum(
    cluster: Any, tmp_path: Path
) -> None:
    # Its 5 clients die in round 2's masked training, after sharing their keys: the 5 others
    # (the threshold) unmask the sum without them; round 3 has all 10 again.
    pytest.importorskip("cryptography")
    secure = {"secure_aggregation": SECURE, "min_clients": 10}
    summary = simulate(killing(cluster, tmp_path, server=secure))
    assert summary.status == "completed", summary.reason
    assert [len(r["clients"]) for r in summary.history] == [10, 5, 10]


@pytest.mark.parametrize(
    ("dask", "message"),
    [
        ({"scheduler": "tcp://10.0.0.5:8786", "workers": 4}, "workers shape a local cluster"),
        ({"workers": 0}, "greater than or equal to 1"),
    ],
)
def test_dask_config_says_what_is_wrong(dask: dict[str, Any], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        SimulationConfig.model_validate({"transport": "dask", "dask": dask})
    with pytest.raises(pydantic.ValidationError, match="with transport='dask', mode='auto'"):
        SimulationConfig.model_validate({"transport": "dask", "mode": "vectorized"})


def test_dask_clients_add_distributed_dp_noise_like_in_process(
    cluster: Any, tmp_path: Path
) -> None:
    # Each client clips and noises its own update: on a Dask worker as in-process (the same
    # client-local noise_seed gives the same noise, so the same weights bit for bit).
    privacy = {"mode": "distributed", "clip": 0.5, "noise_multiplier": 50.0}
    server = {
        "sampler": ["uniform", {"count": 10}],
        "aggregator": ["averaging", {"weighting": "uniform"}],
        "privacy": privacy,
        "rounds": 2,
    }
    reference = simulate(config(tmp_path, "inprocess", noise_seed=3, server=server))
    sim = config(
        tmp_path,
        "dask",
        noise_seed=3,
        transport="dask",
        dask={"scheduler": cluster.scheduler_address},
        server=server,
    )
    summary = simulate(sim)
    assert summary.status == reference.status == "completed"
    for name, array in reference.weights.coefs.items():
        assert np.array_equal(summary.weights.coefs[name], array), name


def test_dask_clients_evaluate_with_the_travelling_global_buffers(
    cluster: Any, tmp_path: Path
) -> None:
    # model.buffers = "average": evaluation uses the server's averaged statistics, on a Dask
    # worker as in-process (not the statistics the client was left with after training).
    pytest.importorskip("torch")
    model = {
        "name": "tests.common.torch_models:build_batchnorm",
        "buffers": "average",
        "config": {"n_features": 64, "n_classes": 10},
    }
    server = {"model": model, "rounds": 2}
    reference = simulate(config(tmp_path, "inprocess", server=server))
    sim = config(
        tmp_path,
        "dask",
        transport="dask",
        dask={"scheduler": cluster.scheduler_address},
        server=server,
    )
    summary = simulate(sim)
    assert summary.status == reference.status == "completed"
    # torch in another process may sum in another order (its own thread count): 1e-6, not bits
    for key in ("loss", "accuracy"):
        want = [r[key] for r in reference.history]
        assert [r[key] for r in summary.history] == pytest.approx(want, rel=1e-6), key


def test_a_client_whose_data_the_stacked_engine_rejects_fails_alone_like_in_process(
    cluster: Any, tmp_path: Path
) -> None:
    # Client 4's labels are out of range: its worker's engine raises, then trains its clients
    # one at a time; only client 4 fails, with in-process's reason, and the others fold.
    rng = np.random.default_rng(1)
    data: list[tuple[str, Dataset, Dataset | None]] = []
    for i, n in enumerate([11, 5, 16, 3, 9, 8]):
        x = rng.standard_normal((n, 6)).astype(np.float32)
        y = np.full(n, 7) if i == 4 else rng.integers(0, 3, n)  # 3 classes
        data.append((f"c{i}", Dataset(x, y), None))
    model = {"name": "softmax-regression", "config": {"n_features": 6, "n_classes": 3}}
    server = {"model": model, "min_clients": 6, "eval_every": 0}
    reference = asyncio.run(simulate_inprocess(config(tmp_path, "inprocess", server=server), data))
    dask = {"scheduler": cluster.scheduler_address}
    sim = config(tmp_path, "dask", transport="dask", dask=dask, server=server)
    summary = asyncio.run(simulate_dask(sim, data))

    assert summary.status == reference.status == "completed"
    for name, array in reference.weights.coefs.items():
        assert np.array_equal(summary.weights.coefs[name], array), name
    rows, expected = client_rows(tmp_path / "dask"), client_rows(tmp_path / "inprocess")
    assert [row["client"] for row in rows if not row["replied"]] == ["c4"] * 3
    for row in expected:  # a worker names the exception, as for any client it trains
        if "error" in row:
            row["error"] = f"ValueError: {row['error']}"
    assert rows == expected
    assert "integer class ids" in rows[4]["error"]


@pytest.mark.parametrize("transport", ["inprocess", "dask"])
def test_a_client_name_ending_in_nul_is_refused_before_any_round(
    cluster: Any, tmp_path: Path, transport: str
) -> None:
    # A worker keeps its clients' names in a numpy string array, which drops a trailing
    # "\x00": "c1\x00" came back as "c1" (a KeyError on the worker). Every transport refuses
    # such a name up front, by the rule a gRPC hello and a client config follow.
    rng = np.random.default_rng(2)
    data: list[tuple[str, Dataset, Dataset | None]] = [
        (name, Dataset(rng.standard_normal((8, 6)).astype(np.float32), np.arange(8) % 3), None)
        for name in ("c0", "c1\x00")
    ]
    model = {"name": "softmax-regression", "config": {"n_features": 6, "n_classes": 3}}
    server = {"model": model, "min_clients": 2, "eval_every": 0}
    dask = {"scheduler": cluster.scheduler_address}
    sim = config(tmp_path, transport, transport=transport, dask=dask, server=server)
    run = simulate_dask if transport == "dask" else simulate_inprocess
    with pytest.raises(BadClientName) as refused:
        asyncio.run(run(sim, data))
    assert str(refused.value) == (
        "client name 'c1\\x00' must be 1-128 printable characters "
        "(no control characters such as '\\x00' or line breaks)"
    )
    assert not (tmp_path / transport).exists()  # no round ran, no run directory


@pytest.mark.parametrize("mode", ["auto", "sequential"])
def test_user_code_failing_a_workers_call_fails_its_clients_not_the_round_deadline(
    cluster: Any, tmp_path: Path, mode: str
) -> None:
    # The model raises an exception class the server cannot rebuild from its pickle, in the
    # worker's own code (not one client's training). Dask never resolves an actor call whose
    # answer the server cannot read: the clients waited for the round deadline, and said so.
    model = {
        "name": "tests.dask_models:RefusingSoftmax",
        "config": {"n_features": 64, "n_classes": 10},
    }
    server = {"model": model, "rounds": 1, "eval_every": 0, "round_timeout": 60}
    dask = {"scheduler": cluster.scheduler_address}
    sim = config(tmp_path, "dask", transport="dask", dask=dask, server=server, mode=mode)
    summary = simulate(sim)

    assert summary.status == "failed"
    rows = client_rows(tmp_path / "dask")
    assert [row["error"] for row in rows] == [
        "RefusedWeights: model softmax-regression: no weights for the worker today"
    ] * 10
