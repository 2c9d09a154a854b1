"""The server's Prometheus endpoint (``metrics_port``; needs ``fedpipe[prometheus]``).

Scraped values are read from the :class:`~fedpipe.server.monitor.ServerMonitor` at scrape time,
so the round loop and the transport only bump plain integers. prometheus-client serves them
from its own thread, on the server's host, over HTTPS with the server's certificate when the
server has one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from fedpipe.common.config import ConfigError, ServerConfig
from fedpipe.common.outcome import RunError
from fedpipe.server.monitor import ServerMonitor

__all__ = ["ROUND_SECONDS_BUCKETS", "MetricsEndpoint", "MonitorCollector"]

log = logging.getLogger(__name__)

#: Upper bounds (seconds) of the round duration histogram's buckets.
ROUND_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

MISSING = "metrics_port needs prometheus-client: pip install 'fedpipe[prometheus]'"


class MonitorCollector:
    """A prometheus-client collector over a :class:`ServerMonitor`."""

    def __init__(self, monitor: ServerMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
        )

        m = self.monitor
        yield InfoMetricFamily("fedpipe_run", "The run this server runs", {"run_id": m.run_id})
        yield CounterMetricFamily(
            "fedpipe_rounds_completed", "Rounds aggregated and recorded", m.rounds_completed
        )
        yield CounterMetricFamily(
            "fedpipe_rounds_failed", "Rounds below min_results (model unchanged)", m.rounds_failed
        )
        yield GaugeMetricFamily("fedpipe_round", "The round under way, else the last", m.round)
        yield GaugeMetricFamily("fedpipe_rounds", "Rounds the run is configured for", m.rounds)
        yield GaugeMetricFamily("fedpipe_clients_connected", "Clients in session", len(m.pool))
        yield CounterMetricFamily(
            "fedpipe_received_bytes", "Bytes of gRPC frames received", m.bytes_received
        )
        yield CounterMetricFamily("fedpipe_sent_bytes", "Bytes of gRPC frames sent", m.bytes_sent)
        yield _round_histogram(HistogramMetricFamily, list(m.round_seconds))
        rejected = CounterMetricFamily(
            "fedpipe_rejected_replies", "Client replies refused, by reason", labels=["reason"]
        )
        for reason, count in sorted(dict(m.rejected_replies).items()):
            rejected.add_metric([reason], count)
        yield rejected
        failed = CounterMetricFamily(
            "fedpipe_failed_authentications",
            "Credentials checked and refused, by service (grpc, status)",
            labels=["service"],
        )
        for service in ("grpc", "status"):
            failed.add_metric([service], m.failed_authentications.get(service, 0))
        yield failed
        latest = GaugeMetricFamily(
            "fedpipe_round_metric", "The latest value of each round metric", labels=["metric"]
        )
        for key, value in sorted(dict(m.latest).items()):
            latest.add_metric([key], value)
        yield latest


def _round_histogram(family: Any, seconds: list[float]) -> Any:
    buckets: list[tuple[str, float]] = []
    for bound in ROUND_SECONDS_BUCKETS:
        buckets.append((repr(bound), float(sum(1 for s in seconds if s <= bound))))
    buckets.append(("+Inf", float(len(seconds))))
    return family(
        "fedpipe_round_duration_seconds",
        "Wall time of each round this process ran",
        buckets=buckets,
        sum_value=sum(seconds),
    )


class MetricsEndpoint:
    """``/metrics`` on ``config.host:config.metrics_port``, served until :meth:`close`."""

    def __init__(self, config: ServerConfig, monitor: ServerMonitor) -> None:
        """Serve now.

        Raises
        ------
        ConfigError
            prometheus-client is not installed.
        RunError
            The port cannot be opened or the TLS files do not load.
        """
        try:
            from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith("prometheus_client"):
                raise
            raise ConfigError(MISSING) from None
        assert config.metrics_port is not None
        registry = CollectorRegistry(auto_describe=True)
        registry.register(MonitorCollector(monitor))  # type: ignore[arg-type]
        ProcessCollector(registry=registry)  # the server's memory, CPU and open files
        tls = config.tls_cert is not None and config.tls_key is not None
        try:
            self.server, self.thread = start_http_server(
                config.metrics_port,
                addr=config.host,
                registry=registry,
                certfile=str(config.tls_cert) if tls else None,
                keyfile=str(config.tls_key) if tls else None,
            )
        except OSError as exc:  # the port is taken, the TLS files do not load...
            where = f"{config.host}:{config.metrics_port}"
            raise RunError(f"cannot serve /metrics on {where}: {exc}") from None
        self.port = int(self.server.server_port)
        scheme = "https" if tls else "http"
        log.info("Prometheus metrics on %s://%s:%d/metrics", scheme, config.host, self.port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
