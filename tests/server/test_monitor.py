"""The live monitor: what the round loop and the transport report, as the status page and
Prometheus read it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedpipe.common.config import ServerConfig
from fedpipe.server.clients import ClientPool
from fedpipe.server.monitor import SERIES_POINTS, ServerMonitor
from fedpipe.server.tracking import run_params
from fedpipe.server.transports.inprocess import InProcessClient, SharedModels

prometheus_client = pytest.importorskip("prometheus_client", reason="fedpipe[prometheus]")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from fedpipe.server.prometheus import MonitorCollector  # noqa: E402


def record(n: int, **extra: Any) -> dict[str, Any]:
    return {"round": n, "sampled": 2, "replied": 2, "clients": ["a", "b"], "seconds": 0.5} | extra


async def pool_of(*names: str) -> ClientPool:
    from fedpipe.common.data import load_builtin

    pool, data, models = ClientPool(), load_builtin("digits"), SharedModels()
    for name in names:
        await pool.add(InProcessClient(name, data, None, models))
    return pool


async def test_the_monitor_follows_the_round_loop_and_the_transport() -> None:
    pool = await pool_of("a", "b")
    monitor = ServerMonitor(ServerConfig(rounds=5, min_clients=2), pool)
    assert (monitor.phase, monitor.round) == ("waiting for clients", 0)
    monitor.task_sent("initialize", 0)
    assert monitor.phase == "setting up clients"
    monitor.task_sent("train", 1)
    assert (monitor.phase, monitor.round) == ("training", 1)
    monitor.task_sent("evaluate", 1)
    assert monitor.phase == "evaluating"
    monitor.round_done(record(1, loss=2.0, accuracy=0.5, train_loss=2.5))
    monitor.round_done(record(2, loss=1.5, accuracy=0.6, failed="too few results", clients=["a"]))
    monitor.received(100)
    monitor.sent(250)
    monitor.reply_rejected("invalid")
    monitor.reply_rejected("invalid")
    monitor.authentication_failed("status")

    snap = json.loads(json.dumps(monitor.snapshot(), allow_nan=False))
    assert (snap["phase"], snap["round"], snap["rounds"]) == ("round done", 2, 5)
    assert (snap["rounds_completed"], snap["rounds_failed"]) == (1, 1)
    assert snap["series"]["loss"] == [[1, 2.0], [2, 1.5]]
    assert snap["series"]["replied"] == [[1, 2.0], [2, 2.0]]
    assert "clients" not in snap["series"] and "sampled" not in snap["series"]
    # A failed round's clients were not aggregated.
    assert [(c["name"], c["rounds_aggregated"]) for c in snap["clients"]] == [("a", 1), ("b", 1)]
    assert (snap["bytes_received"], snap["bytes_sent"]) == (100, 250)
    monitor.finished("completed", "")
    assert monitor.snapshot()["status"] == monitor.snapshot()["phase"] == "completed"


async def test_a_resumed_runs_history_is_drawn_and_series_stay_bounded() -> None:
    history = [record(n, loss=1.0 / n) for n in range(1, SERIES_POINTS + 11)]
    monitor = ServerMonitor(ServerConfig(), await pool_of(), history)
    points = monitor.snapshot()["series"]["loss"]
    assert len(points) == SERIES_POINTS
    assert points[-1] == [SERIES_POINTS + 10, pytest.approx(1.0 / (SERIES_POINTS + 10))]
    assert monitor.rounds_completed == 0  # counters count this process's rounds


async def test_prometheus_exposes_what_the_monitor_holds() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    monitor = ServerMonitor(ServerConfig(run_id="exp-7", rounds=9), await pool_of("a", "b", "c"))
    for n, seconds in enumerate([0.05, 0.3, 4.0], start=1):
        monitor.task_sent("train", n)
        monitor.round_done(record(n, seconds=seconds, accuracy=0.5 + n / 10))
    monitor.task_sent("train", 4)
    monitor.received(1234)
    monitor.sent(5678)
    monitor.reply_rejected("limits")
    monitor.reply_rejected("invalid")
    monitor.reply_rejected("invalid")
    monitor.authentication_failed("grpc")
    registry = CollectorRegistry()
    registry.register(MonitorCollector(monitor))  # type: ignore[arg-type]
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }
    assert samples[("fedpipe_run_info", (("run_id", "exp-7"),))] == 1
    assert samples[("fedpipe_rounds_completed_total", ())] == 3
    assert samples[("fedpipe_round", ())] == 4
    assert samples[("fedpipe_rounds", ())] == 9
    assert samples[("fedpipe_clients_connected", ())] == 3
    assert samples[("fedpipe_received_bytes_total", ())] == 1234
    assert samples[("fedpipe_sent_bytes_total", ())] == 5678
    assert samples[("fedpipe_round_duration_seconds_count", ())] == 3
    assert samples[("fedpipe_round_duration_seconds_sum", ())] == pytest.approx(4.35)
    assert samples[("fedpipe_round_duration_seconds_bucket", (("le", "0.25"),))] == 1
    assert samples[("fedpipe_round_duration_seconds_bucket", (("le", "0.5"),))] == 2
    assert samples[("fedpipe_round_duration_seconds_bucket", (("le", "+Inf"),))] == 3
    assert samples[("fedpipe_rejected_replies_total", (("reason", "invalid"),))] == 2
    assert samples[("fedpipe_rejected_replies_total", (("reason", "limits"),))] == 1
    assert samples[("fedpipe_failed_authentications_total", (("service", "grpc"),))] == 1
    assert samples[("fedpipe_failed_authentications_total", (("service", "status"),))] == 0
    assert samples[("fedpipe_round_metric", (("metric", "accuracy"),))] == pytest.approx(0.8)


def test_tracked_parameters_hold_the_config_but_never_its_secrets(tmp_path: Path) -> None:
    config = ServerConfig(
        rounds=7,
        tokens={"hospital-a": "client-secret"},
        status_port=8080,
        status_token="page-secret",
        model={"name": "softmax-regression", "config": {"n_features": 64}},
        client_optimizer={"lrate": 0.5, "modules": [["adam", {"beta_1": 0.8}]]},
    )
    params = run_params(config)
    assert params["rounds"] == "7"
    assert params["model.name"] == "softmax-regression"
    assert params["model.config.n_features"] == "64"
    assert json.loads(params["client_optimizer.modules"]) == [["adam", {"beta_1": 0.8}]]
    assert params["status_port"] == "8080"
    text = json.dumps(params)
    assert "client-secret" not in text and "page-secret" not in text
    assert not any(key.startswith(("tokens", "status_token")) for key in params)
