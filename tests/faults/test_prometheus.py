"""/metrics of a real ``fedpipe server`` scraped during a real run, against the run's own files;
and the trackers that server's config switched on, read back with their libraries."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.faults.monitored_federation import (
    CLIENTS,
    Samples,
    assert_stopped,
    fedpipe_samples,
    scrape,
    start_monitored_federation,
)

pytest.importorskip("prometheus_client.parser", reason="fedpipe[prometheus]")


def test_prometheus_counts_what_the_run_files_record(
    tmp_path: Path,
    client_data: list[Path],
    procs: list[subprocess.Popen[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("tensorboardX", reason="fedpipe[tensorboard]")
    pytest.importorskip("mlflow", reason="fedpipe[mlflow]")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # this test reads the file store too
    uri = f"file:{tmp_path / 'mlruns'}"
    tracking = {"tensorboard_dir": str(tmp_path / "tb"), "mlflow_uri": uri}
    fed = start_monitored_federation(
        tmp_path, client_data, procs, tracking=tracking, round_timeout=120.0
    )
    fed.wait_for_round(3)
    # Frozen clients: the server waits in the next round, its counters still.
    for client in fed.clients:
        client.send_signal(signal.SIGSTOP)
    try:
        # Settled: the next round started (its tasks are out) and two scrapes agree.
        deadline = time.monotonic() + 30
        previous: Samples = {}
        while True:
            samples, records = fedpipe_samples(fed.metrics_port), fed.records()
            if samples == previous and samples[("fedpipe_round", ())] == records[-1]["round"] + 1:
                break
            assert time.monotonic() < deadline, "the server never settled in the next round"
            previous = samples
            time.sleep(0.2)
        process_memory = scrape(fed.metrics_port)[("process_resident_memory_bytes", ())]
    finally:
        for client in fed.clients:
            client.send_signal(signal.SIGCONT)

    assert samples[("fedpipe_rounds_completed_total", ())] == len(records) >= 3
    assert samples[("fedpipe_rounds_failed_total", ())] == 0
    assert samples[("fedpipe_rounds", ())] == 100_000
    assert samples[("fedpipe_clients_connected", ())] == len(CLIENTS)
    assert records[-1]["clients"] == sorted(CLIENTS)
    seconds = [r["seconds"] for r in records]
    assert samples[("fedpipe_round_duration_seconds_count", ())] == len(records)
    assert samples[("fedpipe_round_duration_seconds_sum", ())] == pytest.approx(sum(seconds))
    slowest = max(seconds)
    for (name, labels), value in samples.items():
        if name == "fedpipe_round_duration_seconds_bucket":
            bound = float(dict(labels)["le"])
            assert value == sum(1 for s in seconds if s <= bound), labels
    for metric in ("loss", "accuracy", "train_loss"):
        latest = samples[("fedpipe_round_metric", (("metric", metric),))]
        assert latest == pytest.approx(records[-1][metric])
    # Each round sends the model to each client and gets a model-sized update back.
    with np.load(fed.run_dir / "best_model.npz") as npz:
        model_bytes = sum(npz[k].nbytes for k in npz.files)
    assert samples[("fedpipe_sent_bytes_total", ())] > len(records) * len(CLIENTS) * model_bytes
    assert samples[("fedpipe_received_bytes_total", ())] > len(records) * len(CLIENTS) * model_bytes
    assert not [k for k in samples if k[0] == "fedpipe_rejected_replies_total"]
    assert samples[("fedpipe_failed_authentications_total", (("service", "grpc"),))] == 0
    assert samples[("fedpipe_run_info", (("run_id", "fedpipe-run"),))] == 1
    assert process_memory > 0
    assert slowest < 120

    fed.wait_for_round(len(records) + 2)  # thawed, the federation goes on
    assert_stopped(fed, fed.stop())
    _assert_tracked(tmp_path, uri, [r["round"] for r in fed.records()])


def _assert_tracked(tmp_path: Path, uri: str, rounds: list[int]) -> None:
    """The server process's trackers hold every recorded round, and how the run ended."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb" / "run"))
    events.Reload()
    assert [e.step for e in events.Scalars("accuracy")] == rounds
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("fedpipe")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "KILLED"  # stopped by SIGTERM: MLflow's word for it
    history = client.get_metric_history(run.info.run_id, "accuracy")
    assert sorted(m.step for m in history) == rounds
