"""Everything that watches a run besides its own files: the live :class:`ServerMonitor`, the
trackers (TensorBoard, MLflow), the Prometheus endpoint and the status page.

:meth:`Monitoring.start` hooks them to a :class:`FederatedRun` before its first round (what the
config asks for and cannot be had stops the server before any client is admitted);
:meth:`Monitoring.close` stops them when the run has ended.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fedpipe.common.config import ServerConfig
from fedpipe.server.monitor import ServerMonitor
from fedpipe.server.prometheus import MetricsEndpoint
from fedpipe.server.rounds import FederatedRun, RunSummary
from fedpipe.server.status_page import StatusPage
from fedpipe.server.tracking import Tracker, open_trackers

__all__ = ["Monitoring"]

log = logging.getLogger(__name__)


class Monitoring:
    """The watchers of one run; feed it through ``run.on_round`` (set by :meth:`start`)."""

    def __init__(self, monitor: ServerMonitor, run: FederatedRun, trackers: list[Tracker]) -> None:
        self.monitor = monitor
        self.trackers = trackers
        self._dropped: set[str] = set()
        # One worker, in order: a slow tracking server never holds up the round loop.
        self._executor = ThreadPoolExecutor(1, "fedpipe-tracking") if trackers else None
        self._display = run.on_round
        self._summary: RunSummary | None = None
        self.metrics: MetricsEndpoint | None = None
        self.status_page: StatusPage | None = None
        run.on_round = self.on_round
        run.on_rejected = monitor.reply_rejected

    @classmethod
    async def start(
        cls,
        config: ServerConfig,
        run: FederatedRun,
        *,
        resume: bool = False,
        overwrite: bool = False,
    ) -> Monitoring:
        """Open what ``config`` asks for (trackers, ``metrics_port``, ``status_port``).

        Raises
        ------
        ConfigError
            An optional extra is missing, or a tracker refused the run.
        RunError
            A port cannot be opened.
        """
        monitor = ServerMonitor(config, run.pool, run.history.records)
        trackers = await asyncio.to_thread(
            open_trackers, config, resume_round=run.round if resume else None, overwrite=overwrite
        )
        self = cls(monitor, run, trackers)
        try:
            if config.metrics_port is not None:
                self.metrics = await asyncio.to_thread(MetricsEndpoint, config, monitor)
            if config.status_port is not None:
                self.status_page = await StatusPage.start(config, monitor)
        except BaseException:
            await self.close()
            raise
        return self

    def on_round(self, record: dict[str, Any]) -> None:
        """A round was recorded: the monitor first, then the trackers, then the display."""
        self.monitor.round_done(record)
        if self._executor is not None:
            for tracker in self.trackers:
                self._executor.submit(self._log_round, tracker, dict(record))
        if self._display is not None:
            self._display(record)

    def _log_round(self, tracker: Tracker, record: dict[str, Any]) -> None:
        if tracker.name in self._dropped:
            return
        try:
            tracker.log_round(record)
        except Exception as exc:  # its disk, its server or its library: never the run's end
            self._dropped.add(tracker.name)
            log.error(
                "%s: cannot record round %s (%s: %s); the run goes on without %s",
                tracker.name,
                record.get("round"),
                type(exc).__name__,
                exc,
                tracker.name,
            )

    def finished(self, summary: RunSummary) -> None:
        """The run ended as ``summary`` says (the trackers are told so on :meth:`close`)."""
        self._summary = summary
        self.monitor.finished(summary.status, summary.reason)

    async def close(self) -> None:
        """Stop serving, flush the trackers; a run that never said how it ended failed."""
        if self._summary is None:
            self.monitor.finished("failed", "the server stopped before the run ended")
        if self.status_page is not None:
            await self.status_page.close()
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.close)
        if self._executor is not None:
            for tracker in self.trackers:
                self._executor.submit(self._close_tracker, tracker, self.monitor.status)
            await asyncio.to_thread(self._executor.shutdown, wait=True)

    def _close_tracker(self, tracker: Tracker, status: str) -> None:
        try:
            tracker.close(status)
        except Exception as exc:  # as in _log_round: reported, and the others still close
            log.error("%s: cannot close its run (%s: %s)", tracker.name, type(exc).__name__, exc)
