"""The server daemon: a gRPC server around the round loop."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedpipe.common.config import ServerConfig
from fedpipe.common.outcome import RunError
from fedpipe.common.plugins import import_plugins
from fedpipe.common.tls_files import check_server_files
from fedpipe.grpc_channel import SERVICE_NAME, channel_options
from fedpipe.server.clients import ClientPool
from fedpipe.server.malloc_heap import limit_arenas
from fedpipe.server.monitoring import Monitoring
from fedpipe.server.rounds import FederatedRun, RunSummary
from fedpipe.server.transports.grpc.admission import server_options
from fedpipe.server.transports.grpc.receive_budget import ReceiveBudget
from fedpipe.server.transports.grpc.session import FederationServicer

__all__ = ["serve"]

log = logging.getLogger(__name__)


async def serve(
    config: ServerConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    on_listening: Callable[[int], None] | None = None,
) -> RunSummary:
    """Listen on ``config.host:config.port``, run the federated training, stop.

    SIGTERM and SIGINT end the run after the current round (a second one at once, dropping the
    round under way): the last checkpoint stays, clients are told and the final model is
    written. An output directory that holds a run is refused unless ``resume`` (continue it)
    or ``overwrite`` (replace it) is set.
    """
    import_plugins(config.plugins)  # the server owner's modules, before any name is built
    limit_arenas()  # before gRPC's threads start: they share the freed chunks
    pool = ClientPool()
    stop_event = asyncio.Event()
    # Build the run first: a bad model or optimizer config, or a run directory in use,
    # fails before the port opens. The directory stays locked until the server has stopped.
    with FederatedRun(
        config, pool, stop_event=stop_event, on_round=on_round, resume=resume, overwrite=overwrite
    ) as run:
        # Trackers, /metrics and the status page, before the port opens: a missing extra fails
        # now.
        monitoring = await Monitoring.start(config, run, resume=resume, overwrite=overwrite)
        try:
            return await _serve_run(config, run, monitoring, on_listening)
        finally:
            await monitoring.close()


async def _serve_run(
    config: ServerConfig,
    run: FederatedRun,
    monitoring: Monitoring,
    on_listening: Callable[[int], None] | None,
) -> RunSummary:
    """Open the gRPC port, run the rounds, stop the server (see :func:`serve`)."""
    pool = run.pool
    options, max_rpcs = server_options(config)
    server = grpc.aio.server(
        options=channel_options(config.chunk_bytes) + options, maximum_concurrent_rpcs=max_rpcs
    )
    model_bytes = sum(spec.nbytes for spec in run.specs.values())
    budget = ReceiveBudget(max(int(config.receive_budget_mib * (1 << 20)), model_bytes))
    servicer = FederationServicer(pool, config, budget, monitoring.monitor)
    server.add_generic_rpc_handlers((servicer.handler(),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = _bind(server, config)
    await server.start()
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("listening on %s:%d", config.host, port)
    if on_listening is not None:
        on_listening(port)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, _stop_requested, run, sig)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            log.debug("no %s handler: the caller stops the run another way", sig.name)
    try:
        summary = await run.run()
        monitoring.finished(summary)
        return summary
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await servicer.drained()  # clients still busy with a task hear the outcome too
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=2.0)  # time to flush what sessions already wrote


def _bind(server: grpc.aio.Server, config: ServerConfig) -> int:
    """Open the listening port; :class:`RunError` saying why when it cannot be opened."""
    address = f"{config.host}:{config.port}"
    credentials = server_credentials(config)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpcio's "Failed to bind": the cause is only in its debug log
        port = 0
    if port == 0:
        raise RunError(_bind_failure(config.host, config.port))
    return port


def _bind_failure(host: str, port: int) -> str:
    """Why ``host:port`` cannot be listened on, found out by binding a plain socket."""
    try:
        infos = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, _, _, sockaddr = infos[0]
        with socket.socket(family, kind) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return f"port {port} is in use (another server listens on {host}:{port})"
        return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return f"cannot listen on {host}:{port}"


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the config's files; mutual TLS when ``tls_client_ca`` is set."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    check_server_files(config)  # else gRPC only says "Failed to bind to address"
    pair = (config.tls_key.read_bytes(), config.tls_cert.read_bytes())
    if config.tls_client_ca is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair], root_certificates=config.tls_client_ca.read_bytes(), require_client_auth=True
    )


def _stop_requested(run: FederatedRun, sig: signal.Signals) -> None:
    if not run.stop_event.is_set():
        log.warning(
            "%s received: finishing the current round, then stopping (again: stop now)", sig.name
        )
        run.stop_event.set()
        return
    log.warning("%s received again: abandoning the current round", sig.name)
    run.abandon_round()
