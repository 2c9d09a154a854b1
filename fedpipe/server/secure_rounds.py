"""A round's training under secure aggregation (Bonawitz et al., 2017; SecAgg+ of Bell et al.,
2020 with ``neighbours``): the round loop's stages around :class:`~fedpipe.common.secagg.
SecAggServer`, in place of the plain fold.

Before training, the sampled clients advertise keys and share their secrets (stages 0 and 1);
each then trains and replies with its update masked, added to one running sum as it arrives
(stage 2); the clients that sent one reveal the shares that remove the masks (stage 3). The
unmasked weighted sum goes to the aggregator's ``finalize`` as if it were the plain fold's.
Every stage shares the round's deadline; a client failing at any stage is one more dropout.
Losses and sample counts stay in the clear (the round's records show them per client).

When the sum cannot be recovered (fewer than ``threshold`` clients at some stage), the round
fails with the reason in its record, the global model unchanged: never a crash.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from fedpipe.common.aggregators import Aggregator
from fedpipe.common.config import ConfigError, SecureAggregationConfig, ServerConfig
from fedpipe.common.optim import Optimizer
from fedpipe.common.training import TrainResult
from fedpipe.server.client_log import RoundClients
from fedpipe.server.clients import ClientError, ClientProxy, RoundTask
from fedpipe.server.run_checks import aux_var_modules, refuse_any

if TYPE_CHECKING:
    from fedpipe.common.secagg import AggregateResult, SecAggServer
    from fedpipe.common.secagg.messages import MaskedInput
    from fedpipe.server.rounds import FederatedRun, _Fold

__all__ = ["check_secure_run", "secure_train"]

log = logging.getLogger(__name__)


def check_secure_run(config: ServerConfig, aggregator: Aggregator, optimizer: Optimizer) -> None:
    """Raise :class:`ConfigError` unless the run can aggregate securely: the ``cryptography``
    package, a sum-like streaming aggregator, no aux-var module (SCAFFOLD's control variates
    would travel in the clear, and the server would need them per client)."""
    try:
        from fedpipe.common.secagg.partials import check_aggregator
    except ImportError as exc:
        raise ConfigError(
            f"secure_aggregation needs the cryptography package ({exc}): "
            "pip install 'fedpipe[secagg]'"
        ) from None
    try:
        check_aggregator(aggregator)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    # What needs each client's plain update on the server cannot see a masked one.
    refused = {
        "validation": config.validation is not None,
        f"aggregator {aggregator.name!r} with max_norm": getattr(aggregator, "max_norm", None)
        is not None,
        "privacy.mode='central' (the server clips each reply)": config.privacy is not None
        and config.privacy.mode == "central",
        "model.buffers='average' (statistics would travel in the clear)": (
            config.model.buffers == "average"
        ),
    }
    refused |= dict.fromkeys(aux_var_modules(config, optimizer), True)  # not masked yet
    refuse_any(
        "secure_aggregation",
        refused,
        "the server sees only the masked sum, never one client's update, and aux vars are "
        "not masked yet; remove one of them (client-level DP: mode='distributed')",
    )


async def secure_train(
    run: FederatedRun, sampled: list[ClientProxy], task: RoundTask, deadline: float, start: float
) -> tuple[_Fold, RoundClients]:
    """The secure counterpart of ``FederatedRun._train``: the fold holds the unmasked sum
    (or ``failure`` says why there is none)."""
    from fedpipe.common.secagg import SecureAggregationError
    from fedpipe.common.secagg.partials import secure_partial
    from fedpipe.server.rounds import _Fold

    settings = run.config.secure_aggregation
    assert settings is not None
    folded = _Fold(run.aggregator, run.optimizer, run.specs)
    clients = RoundClients(task.round_number, [c.name for c in sampled])
    session = _Session(run, _server(settings), sampled, deadline)
    try:
        result = await session.run(task, folded, clients, start)
        total = secure_partial(run.aggregator, result.total, result.total_weight, run.specs)
    except (SecureAggregationError, ValueError) as exc:
        log.error(
            "round %d: secure aggregation failed: %s; global model unchanged",
            task.round_number,
            exc,
        )
        folded.failure = f"secure aggregation failed: {exc}"
    else:
        folded.total = total
        folded.names = list(result.survivors)
        log.info(
            "round %d: secure sum of %d client(s); %d dropped after sharing keys, %d excluded "
            "for wrong shares",
            task.round_number,
            len(result.survivors),
            len(result.dropped),
            len(result.excluded),
        )
    clients.failed(session.failures)
    clients.failed(session.unmask_failures, "unmask_error")
    return folded, clients


def _server(settings: SecureAggregationConfig) -> SecAggServer:
    from fedpipe.common.secagg import SecAggServer

    return SecAggServer(
        settings.threshold,
        settings.bits,
        settings.clip,
        settings.neighbours,
        settings.max_weight,
    )


class _Session:
    """One round's four stages, each through the run's ``_collect`` (concurrent clients,
    the round deadline, failures logged and recorded)."""

    def __init__(
        self, run: FederatedRun, server: SecAggServer, sampled: list[ClientProxy], deadline: float
    ) -> None:
        self.fl_run, self.server, self.deadline = run, server, deadline
        self.by_name = {c.name: c for c in sampled}
        self.failures: dict[str, str] = {}
        self.unmask_failures: dict[str, str] = {}

    async def run(
        self, task: RoundTask, folded: _Fold, clients: RoundClients, start: float
    ) -> AggregateResult:
        from fedpipe.common.secagg.partials import masked_specs

        server, collect = self.server, self.fl_run._collect
        await collect(
            list(self.by_name.values()),
            lambda c: c.secagg_advertise(task.round_number),
            lambda c, m: _checked(c, m.client, lambda: server.receive_keys(m)),
            self.deadline,
            self.failures,
        )
        roster = server.roster()
        await collect(
            self._proxies(roster.clients),
            lambda c: c.secagg_share(roster),
            lambda c, m: _checked(c, m.client, lambda: server.receive_shares(m)),
            self.deadline,
            self.failures,
        )
        forwarded = server.forward_shares()
        specs = masked_specs(self.fl_run.specs, roster.encoding.dtype.name)

        def masked(client: ClientProxy, result: TrainResult) -> None:
            masked_input = _check_reply(result)
            masked_input.masked.check_specs(specs, "masked input")
            _checked(client, masked_input.client, lambda: server.receive_masked(masked_input))
            folded.count += 1
            folded.seen += result.n_samples_seen
            folded.loss_sum += result.loss_sum
            folded.note_epsilon(result)
            clients.trained(client.name, result, time.perf_counter() - start)

        await collect(
            self._proxies(forwarded),
            lambda c: c.train_masked(task, forwarded[c.name]),
            masked,
            self.deadline,
            self.failures,
        )
        request = server.unmask_request()
        await collect(
            self._proxies(request.survivors),
            lambda c: c.secagg_unmask(request),
            lambda c, m: _checked(c, m.client, lambda: server.receive_unmask(m)),
            self.deadline,
            self.unmask_failures,
        )
        return server.result()

    def _proxies(self, names: Iterable[str]) -> list[ClientProxy]:
        return [self.by_name[n] for n in names]


def _checked(client: ClientProxy, sender: str, receive: Callable[[], None]) -> None:
    """Hand a client's message to the server: signed with the client's own name, and a
    protocol error in it is that client's fault (a :class:`ClientError`), not the round's."""
    from fedpipe.common.secagg import SecureAggregationError

    if sender != client.name:
        raise ClientError(f"a secure aggregation message signed {sender!r}, expected itself")
    try:
        receive()
    except SecureAggregationError as exc:
        raise ClientError(str(exc)) from None


def _check_reply(result: TrainResult) -> MaskedInput:
    """The reply's masked input, once the rest of the reply is checked."""
    if result.masked is None or result.partial.fields:
        raise ClientError("a train reply without a masked input, or with a plain partial")
    if result.aux_vars:
        raise ClientError(f"aux vars {sorted(result.aux_vars)} under secure aggregation")
    if not math.isfinite(result.loss_sum):
        raise ClientError(f"train loss {result.loss_sum} is not finite")
    return result.masked
