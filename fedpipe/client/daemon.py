"""The client process: dials the server, takes tasks, trains on private data, replies."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from typing import TYPE_CHECKING, Any, cast

import grpc
import numpy as np

from fedpipe.client.state_store import ClientStateStore
from fedpipe.client.tls_errors import explain_connection_failure
from fedpipe.common.codec import spec_from_wire
from fedpipe.common.config import ClientConfig
from fedpipe.common.devices import check_device, client_device, place_model
from fedpipe.common.framing import FrameReceiver, envelope_frames
from fedpipe.common.host_staging import HostStaging
from fedpipe.common.outcome import ExitCode, RunOutcome
from fedpipe.common.payload import encode_payload
from fedpipe.common.plugins import import_plugins
from fedpipe.common.protocol import PROTOCOL_VERSION, ProtocolError
from fedpipe.common.records import (
    eval_reply_parts,
    settings_data,
    settings_value,
    setup_chunk_bytes,
    summables_from,
    train_reply_parts,
    weights_from,
)
from fedpipe.common.tls_files import check_client_files
from fedpipe.common.train_fn import load_train_fn
from fedpipe.common.training import ClientData, LocalTrainer, RunSetup
from fedpipe.common.vector import ArraySpec, describe_spec_mismatch
from fedpipe.grpc_channel import SESSION_METHOD, channel_options
from fedpipe.proto.fedpipe.v1 import federation_pb2 as pb

if TYPE_CHECKING:  # the secagg extra
    from fedpipe.client.secure_session import SecureSession

__all__ = ["ClientDaemon", "ClientRefused"]

log = logging.getLogger(__name__)

#: Status codes after which reconnecting cannot help.
FINAL_CODES = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT,
}
#: How a stream ends besides a gRPC status: a write or read after the call finished, or a
#: connection torn down underneath. Each means "reconnect", never a crash.
STREAM_ENDED = (asyncio.InvalidStateError, grpc.aio.UsageError, ConnectionError)
CHUNK_BYTES = 4 << 20
#: Payload limit before the server has told the model's size.
DEFAULT_MAX_PAYLOAD = 1 << 30
#: Secure aggregation's stages that are tasks of their own (fedpipe.client.secure_session).
SECURE_STAGE_KINDS = (
    pb.TASK_KIND_SECAGG_ADVERTISE,
    pb.TASK_KIND_SECAGG_SHARE,
    pb.TASK_KIND_SECAGG_UNMASK,
)


class ClientRefused(RuntimeError):
    """The server refused this client for a reason retrying cannot fix."""


class ClientDaemon:
    """One client of a federation.

    Reconnects with exponential backoff (with jitter) while the server is unreachable, for
    at most ``config.retry_timeout`` seconds; keeps its optimizer state across reconnections.
    """

    def __init__(
        self, config: ClientConfig, train_data: ClientData, eval_data: ClientData | None
    ) -> None:
        import_plugins(config.plugins)  # only the client's own: the server never names any
        self.train_fn = load_train_fn(config.train_fn) if config.train_fn else None
        self.config = config
        self.name = config.name
        self.train_data = train_data
        self.eval_data = eval_data
        self.trainer: LocalTrainer | None = None
        self.specs: dict[str, ArraySpec] = {}
        self.max_payload = DEFAULT_MAX_PAYLOAD
        self.joined = False  # the current session was welcomed into the run
        self.setup_error: str | None = None  # why the last run setup failed here
        #: From the last Welcome: proves, when reconnecting, that a session under our name
        #: still open on the server is ours.
        self.session_secret = ""
        self.states = ClientStateStore(self.name, config.state_dir)
        #: Host memory each update leaves the device through (pinned, reused every round).
        self.staging = HostStaging()
        #: The chunk size of the payloads this client sends (the server's, at setup).
        self.chunk_bytes = CHUNK_BYTES
        #: Secure aggregation's round under way (the secagg extra: created at its first task).
        self.secure: SecureSession | None = None
        #: A round's start weights wait on disk (in ``state_dir``, else the system's temporary
        #: folder) while the model trains, where the pipeline allows it
        #: (:mod:`fedpipe.common.staged_start`): one model-sized array less in memory.
        self.stage_start = True

    async def run(self) -> int:
        """Take part in the run until the server says it is over; the process exit code
        (:class:`~fedpipe.common.outcome.ExitCode`: 0 only when the run completed).

        Any end of the stream short of a stop task (server restart, network cut, a write after
        the call finished, a server abort) means reconnecting with backoff. A server stopped
        by a signal (``stopped``) may resume: the client keeps reconnecting until
        ``retry_timeout``.
        """
        cfg = self.config
        check_client_files(cfg)  # a certificate of its own that cannot work stops it here
        check_device(client_device(cfg.device))  # so does a device this machine lacks
        delay = cfg.retry_initial
        give_up = time.monotonic() + cfg.retry_timeout
        while True:
            self.joined = False
            try:
                outcome = await self._session()
            except grpc.aio.AioRpcError as exc:
                if exc.code() in FINAL_CODES:
                    raise ClientRefused(f"server refused: {exc.details()}") from None
                why = await explain_connection_failure(exc, cfg) or _status_text(exc)
            except STREAM_ENDED as exc:
                why = f"{type(exc).__name__}: {exc}"
            else:
                if outcome is None:
                    why = "the stream ended without a stop task"
                elif outcome.status == "stopped":
                    why = f"the server stopped before the end of the run ({outcome.reason})"
                else:
                    return self._finish(outcome)
            if self.joined:  # a session that got in restarts the clock
                delay = cfg.retry_initial
                give_up = time.monotonic() + cfg.retry_timeout
            if time.monotonic() + delay > give_up:
                log.error(
                    "gave up reaching %s after %.0fs (%s)", cfg.server, cfg.retry_timeout, why
                )
                return ExitCode.FAILED
            log.warning("server %s: %s; reconnecting in %.1fs", cfg.server, why, delay)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, cfg.retry_max)

    def _finish(self, outcome: RunOutcome) -> int:
        if self.setup_error is not None and outcome.status == "completed":
            outcome = RunOutcome("rejected", f"this client failed the setup: {self.setup_error}")
        if outcome.status == "completed":
            log.info("the server ended the run; exiting")
            return ExitCode.OK
        if outcome.status == "rejected":
            log.error("the server dropped this client from the run: %s", outcome.reason)
            return ExitCode.REJECTED
        log.error("the server aborted the run: %s", outcome.reason)
        return ExitCode.FAILED

    async def _session(self) -> RunOutcome | None:
        """One stream with the server; the run's outcome when the server sent the stop task,
        None when the stream ended without one."""
        options = channel_options(CHUNK_BYTES)
        async with self._channel(options) as channel:
            call: Any = channel.stream_stream(SESSION_METHOD)()
            hello = pb.Hello(
                protocol_version=PROTOCOL_VERSION,
                client_name=self.name,
                token=self.config.token,
                session_secret=self.session_secret,
                data=pb.DataSummary(
                    n_train_samples=len(self.train_data),
                    n_eval_samples=len(self.eval_data) if self.eval_data is not None else 0,
                ),
            )
            await call.write(pb.ClientMessage(hello=hello).SerializeToString())
            receiver = FrameReceiver(pb.ServerMessage, self.max_payload)
            receiver.into = self._landing()
            while True:
                frame = await call.read()
                if frame is grpc.aio.EOF:
                    code = await call.code()
                    if code in FINAL_CODES:
                        raise ClientRefused(f"server refused: {await call.details()}")
                    return None
                try:
                    got = receiver.feed(frame)
                except ProtocolError as exc:
                    log.error("server broke the protocol: %s", exc)
                    call.cancel()
                    return None
                if got is None:
                    continue
                kind = got.message.WhichOneof("kind")
                if kind == "welcome":
                    self.joined = True
                    self.session_secret = got.message.welcome.session_secret
                    log.info("joined run %s as %s", got.message.welcome.run_id, self.name)
                    continue
                task = got.message.task
                if task.kind == pb.TASK_KIND_STOP:
                    with contextlib.suppress(*STREAM_ENDED, grpc.aio.AioRpcError):
                        await call.done_writing()
                    try:
                        # A stop without settings (an older server) ends a completed run.
                        data = settings_data(task.settings) if task.HasField("settings") else {}
                        return RunOutcome.from_data(data)
                    except ValueError as exc:
                        log.error("server sent an unreadable stop task: %s", exc)
                        return RunOutcome("failed", f"unreadable stop task: {exc}")
                reply, payload = await self._handle(task, got.payload)
                receiver.max_payload_bytes = self.max_payload
                receiver.into = self._landing()
                for out in envelope_frames(pb.ClientMessage(reply=reply), payload):
                    await call.write(out)
                # Model-sized: the global weights and our update must not live on while the
                # next task's payload arrives.
                del got, task, reply, payload

    def _landing(self) -> dict[str, dict[str, np.ndarray]] | None:
        """Where a task's global weights are received: straight into the model's own arrays
        (no model-sized copy; every task carries the whole weights, so a payload cut short
        leaves nothing the next task does not overwrite), or arrays of their own."""
        arrays = self.trainer.model.host_weights() if self.trainer is not None else None
        return None if arrays is None else {"weights": arrays}

    def _channel(self, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
        cfg = self.config
        if not cfg.use_tls:
            return grpc.aio.insecure_channel(cfg.server, options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=cfg.tls_ca.read_bytes() if cfg.tls_ca else None,
            private_key=cfg.tls_key.read_bytes() if cfg.tls_key else None,
            certificate_chain=cfg.tls_cert.read_bytes() if cfg.tls_cert else None,
        )
        return grpc.aio.secure_channel(cfg.server, credentials, options=options)

    async def _handle(self, task: Any, received: dict[str, Any]) -> tuple[Any, Any]:
        """Run one task; a failure becomes an error reply, never a crash."""
        reply = pb.Reply(task_id=task.task_id)
        try:
            if task.kind == pb.TASK_KIND_INITIALIZE:
                self.setup_error = None
                try:
                    await asyncio.to_thread(self._initialize, task)
                except Exception as exc:
                    self.setup_error = f"{type(exc).__name__}: {exc}"
                    raise
                return reply, None
            if task.kind in SECURE_STAGE_KINDS:
                await asyncio.to_thread(self._secure().stage, task, reply)
                return reply, None
            trainer = self._trainer()
            weights = weights_from(received)
            problem = describe_spec_mismatch(weights.specs(), self.specs)
            if problem:
                raise ProtocolError(f"global weights: {problem}")
            aux = summables_from(received.get("aux_vars", {}), "aux_vars")
            if task.kind in (pb.TASK_KIND_TRAIN, pb.TASK_KIND_TRAIN_MASKED):
                settings = settings_data(task.settings)
                work = functools.partial(
                    trainer.train,
                    self.train_data,
                    weights,
                    aux,
                    client=self.name,
                    round_number=task.round,
                    dp=settings.get("dp"),
                    stage_start=self.stage_start and task.kind == pb.TASK_KIND_TRAIN,
                    start_dir=self.config.state_dir,
                )
                base = settings.get("base_round")
                result = await asyncio.to_thread(self.states.train, trainer, base, task.round, work)
                if task.kind == pb.TASK_KIND_TRAIN_MASKED:
                    mask = self._secure().mask
                    result = await asyncio.to_thread(mask, task, trainer.aggregator, result)
                info, state = train_reply_parts(result)
                # the update's Vectors, streamed from the model's arrays (where none, as is)
                cast(dict[str, Any], state["partial"]).update(result.deferred)
                log.info(
                    "round %d: %d steps, train loss %.4f, %.2fs",
                    task.round,
                    result.n_steps,
                    result.mean_loss,
                    result.seconds,
                )
            elif task.kind == pb.TASK_KIND_EVALUATE:
                if self.eval_data is None:
                    raise ValueError("this client has no evaluation data")
                evaluation = await asyncio.to_thread(trainer.evaluate, self.eval_data, weights, aux)
                info, state = eval_reply_parts(evaluation)
            else:
                raise ProtocolError(f"unknown task kind {task.kind}")
        except (ValueError, TypeError, KeyError, ArithmeticError, ImportError) as exc:
            log.error("task %d failed: %s", task.task_id, exc)
            reply.error = f"{type(exc).__name__}: {exc}"
            return reply, None
        # The previous reply's frames are all written: its staging memory may be reused.
        payload = encode_payload(state, self.chunk_bytes, staging=self.staging)
        reply.info.CopyFrom(settings_value(info))
        reply.payload.CopyFrom(payload.header)
        return reply, payload

    def _initialize(self, task: Any) -> None:
        settings = settings_data(task.settings)
        setup = RunSetup.from_data(settings)
        specs = {s.name: spec_from_wire(s, f"weight {s.name!r}") for s in task.weight_specs}
        chunk_bytes = setup_chunk_bytes(settings, CHUNK_BYTES)
        model = str(setup.model.get("name", ""))
        if ":" in model and model not in self.config.trusted_models:
            # An import path runs code on this machine: only the client's owner may name one.
            raise ValueError(
                f"the server asks for model {model!r}, an import path this client does not "
                "trust; add it to 'trusted_models' in the client config to allow it"
            )
        trainer = LocalTrainer(
            setup,
            train_fn=self.train_fn,
            noise_seed=self.config.noise_seed,
            client=self.name,
            dp_sgd=self.config.dp_sgd,
        )
        place_model(trainer.model, client_device(self.config.device))
        problem = describe_spec_mismatch(trainer.model.weight_specs(), specs)
        if problem:
            raise ValueError(
                f"the model built from the setup does not match the server's: {problem}"
            )
        trainer.check_data(self.train_data)
        self.chunk_bytes = chunk_bytes
        if self.trainer is not None and self.trainer.setup == setup:
            return  # reconnected to the same run: keep the optimizer's state
        self.trainer, self.specs = trainer, specs
        self.states.start_run(trainer)
        model_bytes = sum(s.nbytes for s in specs.values())
        self.max_payload = 2 * model_bytes + (64 << 20)
        log.info(
            "run set up: model %r, %d trainable parameters (%d bytes) on %s",
            model,
            sum(s.size for s in specs.values()),
            model_bytes,
            client_device(self.config.device),
        )

    def _secure(self) -> SecureSession:
        if self.secure is None:
            from fedpipe.client.secure_session import SecureSession  # needs cryptography

            self.secure = SecureSession(self.name)
        return self.secure

    def _trainer(self) -> LocalTrainer:
        if self.trainer is None:
            raise ProtocolError("a task arrived before the run setup")
        return self.trainer


def _status_text(exc: grpc.aio.AioRpcError) -> str:
    """What a failed call's status says, and what it means where gRPC's words do not."""
    text = f"{exc.code().name}: {exc.details()}"
    if exc.code() == grpc.StatusCode.INTERNAL and "Internal error from Core" in str(exc.details()):
        # grpc/grpc#36066: a server that ends the stream while the hello is still being
        # written (too many connections awaiting admission) reaches an asyncio client so.
        text += " (the server ended the session before reading the hello; it may be busy)"
    return text
