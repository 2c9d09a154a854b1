"""What the server is doing right now, for the status page and the Prometheus endpoint.

The round loop and the gRPC transport report to a :class:`ServerMonitor` in a few cheap calls
(a task sent, bytes in and out, a reply rejected, an authentication failed, a round recorded);
the status page and the Prometheus endpoint read it. It holds counters and one bounded series
per metric, never a model. Prometheus reads it from its own thread: every field is replaced or
incremented whole, and readers copy the containers they walk.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

from fedpipe.common.config import ServerConfig
from fedpipe.server.clients import ClientPool

__all__ = ["SERIES_POINTS", "ServerMonitor", "round_scalars"]

#: Points kept per metric series (the latest rounds): bounds the status page's JSON.
SERIES_POINTS = 2000

#: Record keys that are not per-round measurements.
NOT_SCALARS = frozenset({"round", "sampled", "clients", "failed"})

#: The phase each kind of task puts the server in.
TASK_PHASES = {"initialize": "setting up clients", "train": "training", "evaluate": "evaluating"}


def round_scalars(record: dict[str, Any]) -> dict[str, float]:
    """A round record's finite numbers (metrics, ``train_loss``, ``replied``, ``seconds``)."""
    return {
        key: float(value)
        for key, value in record.items()
        if key not in NOT_SCALARS
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


class ServerMonitor:
    """The live state of one server's run: round and phase, clients, traffic, rejections.

    ``history`` is the run's records so far (a resumed run's), drawn on the status page;
    the counters count from this process's start.
    """

    def __init__(
        self, config: ServerConfig, pool: ClientPool, history: Sequence[dict[str, Any]] = ()
    ) -> None:
        self.run_id = config.run_id
        self.rounds = config.rounds
        self.min_clients = config.min_clients
        self.pool = pool
        self.started = time.time()
        self.round = 0  # the round under way, else the last one recorded
        self.phase = "waiting for clients"
        self.status = "running"
        self.reason = ""
        self.rounds_completed = 0
        self.rounds_failed = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.rejected_replies: Counter[str] = Counter()
        self.failed_authentications: Counter[str] = Counter()
        #: Seconds of each round this process ran (the Prometheus histogram).
        self.round_seconds: list[float] = []
        self.series: dict[str, deque[tuple[int, float]]] = {}
        self.latest: dict[str, float] = {}
        #: Rounds whose aggregate holds each client's reply.
        self.aggregated: Counter[str] = Counter()
        for record in history:
            self._add(record)

    # ---- what the round loop and the transport report ----------------------------------------

    def task_sent(self, kind: str, round_number: int) -> None:
        """A task of ``kind`` (``initialize``, ``train``, ``evaluate``) went to a client."""
        if kind == "train":
            self.round = round_number
        self.phase = TASK_PHASES.get(kind, self.phase)

    def received(self, nbytes: int) -> None:
        self.bytes_received += nbytes

    def sent(self, nbytes: int) -> None:
        self.bytes_sent += nbytes

    def reply_rejected(self, reason: str) -> None:
        """A client's reply was refused; ``reason`` is a short label (``invalid``...)."""
        self.rejected_replies[reason] += 1

    def authentication_failed(self, service: str) -> None:
        """A credential was checked and refused (``service``: ``grpc`` or ``status``)."""
        self.failed_authentications[service] += 1

    def round_done(self, record: dict[str, Any]) -> None:
        """A round was recorded (``metrics.jsonl`` has its line)."""
        self._add(record)
        self.round = int(record["round"])
        self.phase = "round done"
        if "seconds" in record:
            self.round_seconds.append(float(record["seconds"]))
        if record.get("failed"):
            self.rounds_failed += 1
        else:
            self.rounds_completed += 1

    def finished(self, status: str, reason: str) -> None:
        self.status = self.phase = status
        self.reason = reason

    def _add(self, record: dict[str, Any]) -> None:
        number = int(record["round"])
        for key, value in round_scalars(record).items():
            self.series.setdefault(key, deque(maxlen=SERIES_POINTS)).append((number, value))
            self.latest[key] = value
        if not record.get("failed"):
            self.aggregated.update(str(name) for name in record.get("clients", []))

    # ---- what readers see ---------------------------------------------------------------------

    def clients(self) -> list[dict[str, Any]]:
        """The connected clients, by name."""
        return [
            {
                "name": client.name,
                "train_samples": client.n_train_samples,
                "eval_samples": client.n_eval_samples,
                "set_up": client.initialized,
                "rounds_aggregated": self.aggregated.get(client.name, 0),
            }
            for client in self.pool.clients()
        ]

    def snapshot(self) -> dict[str, Any]:
        """Everything the status page shows, as JSON-ready data."""
        return {
            "run_id": self.run_id,
            "status": self.status,
            "reason": self.reason,
            "phase": self.phase,
            "round": self.round,
            "rounds": self.rounds,
            "rounds_completed": self.rounds_completed,
            "rounds_failed": self.rounds_failed,
            "min_clients": self.min_clients,
            "started": self.started,
            "now": time.time(),
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "clients": self.clients(),
            "series": {key: [list(p) for p in points] for key, points in self.series.items()},
            "latest": dict(self.latest),
        }
