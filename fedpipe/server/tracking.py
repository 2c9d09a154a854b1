"""Experiment trackers: every round's scalars and the run's config, sent to TensorBoard
(``tensorboardX``, ``fedpipe[tensorboard]``) and MLflow (``mlflow-skinny``, ``fedpipe[mlflow]``)
as ``[tracking]`` in the server config asks.

A tracker is opened before the first round (a missing extra, an unreachable MLflow server or a
TensorBoard folder holding another run's events stop the server before it admits anyone) and
fed from one worker thread, so that a slow tracking server never holds up the round loop. A
tracker that fails during the run is logged and dropped: the run goes on.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from fedpipe.common.config import ConfigError, ServerConfig
from fedpipe.server.monitor import round_scalars

__all__ = ["MlflowTracker", "TensorBoardTracker", "Tracker", "open_trackers", "run_params"]

log = logging.getLogger(__name__)

#: Config fields never sent to a tracker: secrets.
SECRET_FIELDS = frozenset({"tokens", "status_token"})
#: MLflow's longest parameter value.
MAX_PARAM_CHARS = 6000
#: MLflow's largest batch of parameters.
PARAMS_PER_BATCH = 100
EVENT_FILES = "events.out.tfevents.*"

#: How MLflow names the ways a run ends.
MLFLOW_STATUS = {"completed": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}


class Tracker(Protocol):
    """Where the run's rounds also go."""

    name: str

    def log_round(self, record: dict[str, Any]) -> None:
        """Record a round's scalars at step ``record["round"]``."""

    def close(self, status: str) -> None:
        """The run ended with ``status`` (``completed``, ``failed``, ``stopped``)."""


def run_params(config: ServerConfig) -> dict[str, str]:
    """The config as flat ``section.key -> text`` parameters, without its secrets."""
    data = config.model_dump(mode="json", exclude=set(SECRET_FIELDS))
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif value is not None:
            text = value if isinstance(value, str) else json.dumps(value)
            flat[prefix] = text[:MAX_PARAM_CHARS]

    walk("", data)
    return flat


def open_trackers(
    config: ServerConfig, *, resume_round: int | None = None, overwrite: bool = False
) -> list[Tracker]:
    """The trackers ``config.tracking`` asks for, opened; ``resume_round``: the run resumes
    after that round (its replayed rounds replace the tracked ones).

    Raises
    ------
    ConfigError
        An extra is not installed, the TensorBoard folder holds another run's events (and
        not ``overwrite``), or MLflow refused the run.
    """
    cfg = config.tracking
    params = run_params(config)
    trackers: list[Tracker] = []
    try:
        if cfg.tensorboard_dir is not None:
            logdir = cfg.tensorboard_dir / Path(config.output_dir).resolve().name
            trackers.append(TensorBoardTracker(logdir, params, resume_round, overwrite))
        if cfg.mlflow_uri is not None:
            name = Path(config.output_dir).resolve().name
            if resume_round is not None:
                name += f" (resumed after round {resume_round})"
            tags = {"fedpipe.run_id": config.run_id, "fedpipe.output_dir": str(config.output_dir)}
            trackers.append(
                MlflowTracker(cfg.mlflow_uri, cfg.mlflow_experiment, name, params, tags)
            )
    except BaseException:
        for tracker in trackers:
            tracker.close("failed")
        raise
    return trackers


def _missing(extra: str, package: str, field: str, exc: ModuleNotFoundError) -> ConfigError:
    if not (exc.name or "").startswith(package):
        raise exc
    return ConfigError(f"tracking.{field} needs {package}: pip install 'fedpipe[{extra}]'")


class TensorBoardTracker:
    """Event files in ``logdir``, one scalar per record key (as in ``metrics.jsonl``)."""

    name = "TensorBoard"

    def __init__(
        self, logdir: Path, params: dict[str, str], resume_round: int | None, overwrite: bool
    ) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ModuleNotFoundError as exc:
            raise _missing("tensorboard", "tensorboardX", "tensorboard_dir", exc) from None
        stale = sorted(logdir.glob(EVENT_FILES)) if resume_round is None else []
        if stale and not overwrite:
            raise ConfigError(
                f"{logdir} holds the TensorBoard events of an earlier run: pass --overwrite "
                "to replace them, or choose another output_dir or tracking.tensorboard_dir"
            )
        for path in stale:
            path.unlink()
        # purge_step: TensorBoard drops what an earlier process logged from that step on.
        purge = None if resume_round is None else resume_round + 1
        self.writer = SummaryWriter(logdir=str(logdir), purge_step=purge)
        self.writer.add_text("config", _markdown_table(params))
        self.writer.flush()
        log.info("TensorBoard events in %s", logdir)

    def log_round(self, record: dict[str, Any]) -> None:
        step = int(record["round"])
        for key, value in round_scalars(record).items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # the round is visible in TensorBoard now, not at the next flush

    def close(self, status: str) -> None:
        self.writer.add_text("status", status)
        self.writer.close()


def _markdown_table(params: dict[str, str]) -> str:
    rows = [f"| {key} | {value.replace('|', '/')} |" for key, value in params.items()]
    return "\n".join(["| field | value |", "|---|---|", *rows])


class MlflowTracker:
    """One MLflow run: the config as parameters, each round's scalars as metrics."""

    name = "MLflow"

    def __init__(
        self, uri: str, experiment: str, run_name: str, params: dict[str, str], tags: dict[str, str]
    ) -> None:
        if urlsplit(uri).scheme in ("", "file"):
            # MLflow 3 keeps its file store only for those who ask for it; this config does.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        # A federation's server reports nothing to third parties unless its owner says so.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        try:
            from mlflow.entities import Param
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ModuleNotFoundError as exc:
            raise _missing("mlflow", "mlflow", "mlflow_uri", exc) from None
        try:
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                experiment_id = self.client.create_experiment(experiment)
            else:
                experiment_id = found.experiment_id
            run = self.client.create_run(experiment_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
            items = [Param(key, value) for key, value in params.items()]
            for start in range(0, len(items), PARAMS_PER_BATCH):
                batch = items[start : start + PARAMS_PER_BATCH]
                self.client.log_batch(self.run_id, params=batch)
        except (MlflowException, OSError) as exc:
            raise ConfigError(
                f"tracking.mlflow_uri {uri!r}: MLflow refused the run: {exc}"
            ) from None
        log.info("MLflow run %s (%r), experiment %r, at %s", self.run_id, run_name, experiment, uri)

    def log_round(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step, stamp = int(record["round"]), int(time.time() * 1000)
        metrics = [Metric(k, v, stamp, step) for k, v in round_scalars(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FAILED"))
