"""Validated configuration of servers, clients and simulations, loaded from TOML.

Every model forbids unknown keys, so a typo fails before anything starts with a message that
names the field, the value and what was expected. CLI flags override TOML values through
:func:`apply_overrides` (dotted keys: ``rounds=5``, ``training.batch_size=64``).
"""

from __future__ import annotations

import ipaddress
import json
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedpipe.common.client_name import check_client_name
from fedpipe.common.tokens import is_hashed, parse_hashed

__all__ = [
    "TOKEN_ENV",
    "ClientConfig",
    "ConfigError",
    "DaskConfig",
    "DpSgdConfig",
    "EarlyStopConfig",
    "ModelConfig",
    "OptimizerConfig",
    "OwnTraining",
    "PartitionConfig",
    "PrivacyConfig",
    "SecureAggregationConfig",
    "ServerConfig",
    "SimulationConfig",
    "TrackingConfig",
    "TrainingConfig",
    "apply_overrides",
    "load_config",
    "read_token_file",
]


#: Environment variable a client reads its token from when its config names none.
TOKEN_ENV = "FEDPIPE_TOKEN"


class ConfigError(ValueError):
    """A configuration file or flag is invalid; the message says which field and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Spec = str | tuple[str, dict[str, Any]] | list[Any]


def _matching(pattern: str, noun: str, expected: str) -> Callable[[str], str]:
    """A validator of strings that must match ``pattern`` whole."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(f"{value!r} is not {noun}; expected {expected}")
        return value

    return check


_DOTTED = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*"
_module_name = _matching(
    _DOTTED, "a module name", "a dotted import name such as 'mypkg.fedext' (not a file path)"
)
_device_name = _matching(
    r"cpu|cuda(:\d+)?|mps|auto", "a device", "'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'"
)


#: A device: ``"cuda"`` is every visible GPU for a simulation and the first for a client;
#: ``"auto"`` the GPU(s) when torch sees one, else the CPU.
DeviceName = Annotated[str, AfterValidator(_device_name)]


def _client_name_or_unset(value: str) -> str:
    return check_client_name(value) if value else value


#: A client's name: "" (unset: the command line picks one) or what :func:`check_client_name`
#: accepts.
ClientName = Annotated[str, AfterValidator(_client_name_or_unset)]


#: Modules to import before the config's names are looked up (see fedpipe.common.plugins).
Plugins = list[Annotated[str, AfterValidator(_module_name)]]

_import_path = _matching(
    f"{_DOTTED}:{_DOTTED}",
    "an import path",
    "'package.module:function' such as 'mypkg.data:loaders'",
)


#: A function of the user's own package, named ``package.module:function``.
ImportPath = Annotated[str, AfterValidator(_import_path)]


class ModelConfig(_Strict):
    """Which model to build: a registered name or ``pkg.module:factory``, and its kwargs."""

    name: str = "softmax-regression"
    config: dict[str, Any] = Field(default_factory=dict)
    #: A torch model's floating-point buffers (batch-norm statistics): ``"local"``, each
    #: client keeps its own; ``"average"``, they travel and the server keeps their
    #: sample-weighted mean, untouched by any optimizer module (fedpipe.common.buffers).
    buffers: Literal["local", "average"] = "local"


class OptimizerConfig(_Strict):
    """Arguments of :class:`fedpipe.common.optim.Optimizer` (see its docstring)."""

    lrate: float | list[Any] = 0.01
    w_decay: float = Field(default=0.0, ge=0.0)
    regularizers: list[Spec] = Field(default_factory=list)
    modules: list[Spec] = Field(default_factory=list)

    def build(self) -> Any:
        from fedpipe.common.optim import Optimizer

        return Optimizer.from_config(self.model_dump())


class TrainingConfig(_Strict):
    """Local training each client runs per round."""

    epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=32, ge=1)
    drop_remainder: bool = False
    eval_batch_size: int = Field(default=1024, ge=1)


class EarlyStopConfig(_Strict):
    """Stop when ``metric`` has not improved by ``min_delta`` for ``patience`` evaluations."""

    metric: str = "loss"
    mode: Literal["min", "max"] = "min"
    patience: int = Field(default=3, ge=1)
    min_delta: float = Field(default=0.0, ge=0.0)


class TrackingConfig(_Strict):
    """Where each round's metrics and the run's config also go (optional extras)."""

    #: TensorBoard event files go in ``tensorboard_dir/<run directory name>/``: point
    #: ``tensorboard --logdir`` at ``tensorboard_dir`` to compare runs (``fedpipe[tensorboard]``).
    tensorboard_dir: Path | None = None
    #: An MLflow tracking URI: ``file:./mlruns``, ``sqlite:///mlflow.db``, ``http://host:5000``
    #: (``fedpipe[mlflow]``); one MLflow run per fedpipe run, named after its directory.
    mlflow_uri: str | None = None
    mlflow_experiment: str = Field(default="fedpipe", min_length=1)


class ValidationConfig(_Strict):
    """Server-side screening of client updates by norm (``fedpipe.server.update_validation``):
    an update whose L2 norm exceeds ``max_norm_ratio`` times the median norm is rejected, or
    scaled down to that bound (``action = "downweight"``); ``min_norms`` norms are needed
    before a streaming aggregator judges."""

    max_norm_ratio: float = Field(default=3.0, gt=1.0)
    action: Literal["reject", "downweight"] = "reject"
    min_norms: int = Field(default=3, ge=2)


# ---- client-level differential privacy ([server.privacy]; docs/privacy.md) ----------------


class AdaptiveClipConfig(_Strict):
    """Adaptive quantile clipping (Andrew et al. 2021): the clip norm starts at ``initial``
    and follows the ``target_quantile`` of client update norms, ``clip *= exp(-learning_rate
    * (noised fraction under the clip - target_quantile))``; the count of clients under the
    clip gets Gaussian noise of std ``count_stddev`` (Andrew et al. suggest 0.05 x the
    expected clients per round)."""

    initial: float = Field(default=0.1, gt=0)
    target_quantile: float = Field(default=0.5, gt=0, lt=1)
    learning_rate: float = Field(default=0.2, gt=0)
    count_stddev: float = Field(gt=0)


class PrivacyConfig(_Strict):
    """Client-level DP (DP-FedAvg, McMahan et al. 2018): each client's update clipped to
    ``clip`` (or adaptively), Gaussian noise of std ``noise_multiplier x clip`` on their sum,
    added by the server (``central``) or split between the clients (``distributed``, for
    secure aggregation); ε at ``delta`` counted by ``accountant``. With ``target_epsilon``,
    ``on_budget = "stop"`` ends the run before a round would exceed it, ``"calibrate"``
    derives ``noise_multiplier`` for the planned rounds (and still stops if they overspend).
    """

    mode: Literal["central", "distributed"] = "central"
    noise_multiplier: float | None = Field(default=None, ge=0)
    clip: float | None = Field(default=None, gt=0)
    adaptive_clip: AdaptiveClipConfig | None = None
    delta: float = Field(default=1e-5, gt=0, lt=1)
    target_epsilon: float | None = Field(default=None, gt=0)
    on_budget: Literal["stop", "calibrate"] = "stop"
    accountant: Literal["rdp", "pld"] = "rdp"

    @model_validator(mode="after")
    def _complete(self) -> Self:
        if (self.clip is None) == (self.adaptive_clip is None):
            raise ValueError("set one of clip (a fixed norm) and adaptive_clip")
        if self.on_budget == "calibrate":
            if self.target_epsilon is None or self.noise_multiplier is not None:
                raise ValueError(
                    "on_budget='calibrate' derives noise_multiplier from target_epsilon: set "
                    f"target_epsilon and leave noise_multiplier unset (got {self.noise_multiplier})"
                )
        elif not self.noise_multiplier:
            raise ValueError(
                f"noise_multiplier={self.noise_multiplier}: clipping without noise gives no "
                "privacy; set noise_multiplier > 0, or on_budget='calibrate' with target_epsilon"
            )
        if self.mode == "distributed" and self.adaptive_clip is not None:
            raise ValueError(
                "adaptive_clip needs the server to see each client's norm against the clip: "
                "mode='distributed' takes a fixed clip"
            )
        return self


class DpSgdConfig(_Strict):
    """Sample-level DP-SGD on a client (Abadi et al. 2016): each step's batch drawn by Poisson
    sampling, every per-sample gradient clipped to ``clip``, Gaussian noise of std
    ``noise_multiplier x clip`` on their sum; ε at ``delta`` counted by ``accountant``. It is
    the client's own setting (its config, or a simulation's for its clients), never the
    server's: a server cannot weaken it. With ``max_epsilon`` the client refuses a round that
    would spend more (see docs/privacy.md)."""

    clip: float = Field(gt=0, allow_inf_nan=False)
    noise_multiplier: float = Field(gt=0, allow_inf_nan=False)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    accountant: Literal["rdp", "pld"] = "rdp"
    max_epsilon: float | None = Field(default=None, gt=0)


class SecureAggregationConfig(_Strict):
    """Secure aggregation (SecAgg, Bonawitz et al. 2017; SecAgg+, Bell et al. 2020, with
    ``neighbours``): the server learns only the sum of each round's updates. See
    ``docs/secure-aggregation.md`` and :mod:`fedpipe.common.secagg`."""

    #: Shares that rebuild a client's secrets: up to ``n - threshold`` of a round's ``n``
    #: clients may drop, and ``threshold - 1`` colluding clients learn nothing.
    threshold: int = Field(ge=2)
    #: Fixed-point bits of the ring the masked updates live in (8 to 48).
    bits: int = Field(default=32, ge=8, le=48)
    #: Update values are clipped to ``[-clip, clip]`` before encoding.
    clip: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    #: Degree of the SecAgg+ neighbour graph (even); None: every client masks with every other.
    neighbours: int | None = Field(default=None, ge=2)
    #: The largest client weight (its sample count or step count for ``averaging``; 1 for
    #: ``sum`` or ``weighting = "uniform"``): bounds the encoding so that sums never wrap.
    max_weight: int = Field(ge=1)

    @model_validator(mode="after")
    def _graph_fits(self) -> Self:
        if self.neighbours is not None and self.neighbours % 2:
            raise ValueError(
                f"secure_aggregation.neighbours={self.neighbours}: expected an even number "
                "(each client joins neighbours / 2 on either side of a ring)"
            )
        if self.neighbours is not None and self.threshold > self.neighbours + 1:
            raise ValueError(
                f"secure_aggregation.threshold={self.threshold} exceeds neighbours + 1 = "
                f"{self.neighbours + 1}, the holders of each client's shares: no secret could "
                "be rebuilt"
            )
        return self


class ServerConfig(_Strict):
    """Everything the server daemon needs to run a federated training."""

    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535)
    run_id: str = "fedpipe-run"
    rounds: int = Field(default=10, ge=1)
    min_clients: int = Field(default=2, ge=1)
    min_results: int | None = Field(default=None, ge=1)
    #: Which clients train each round: a registered sampler (``fedpipe.server.sampling``),
    #: ``"uniform"`` (every client), ``["uniform", {fraction = 0.5}]``, ``{count = 4}``,
    #: ``["weighted", {count = 4}]``, ``["poisson", {q = 0.1}]``,
    #: ``["power-of-choice", {d = 10, m = 4}]``, or a plugin's name.
    sampler: Spec = "uniform"
    wait_timeout: float = Field(default=300.0, gt=0)
    round_timeout: float = Field(default=600.0, gt=0)
    #: Rounds that may end below ``min_results`` (model unchanged) before the run fails.
    max_failed_rounds: int = Field(default=0, ge=0)
    eval_every: int = Field(default=1, ge=0)
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    client_optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    server_optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(lrate=1.0))
    aggregator: Spec = "averaging"
    #: Screen client updates whose norm is an outlier against the round's median.
    validation: ValidationConfig | None = None
    metrics: list[Spec] = Field(default_factory=lambda: list[Spec](["loss", "accuracy"]))
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    early_stop: EarlyStopConfig | None = None
    #: Keep ``best_model.npz``: the weights of the round with the best value of this metric
    #: (default: the early-stop metric, else ``loss`` when evaluation runs).
    best_metric: str | None = None
    best_mode: Literal["min", "max"] | None = None
    output_dir: Path = Path("runs/fedpipe-run")
    checkpoint: bool = True
    #: Client name -> its secret token, or its hash from ``fedpipe hash-token``; when set,
    #: only these clients get in, each by its token.
    tokens: dict[str, str] = Field(default_factory=dict)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Mutual TLS: only certificates signed by this CA get in, each under its own name (its
    #: DNS subject alternative names, or its common name when it has none).
    tls_client_ca: Path | None = None
    insecure: bool = False
    #: Clients connected at once; a reconnecting client still gets its place back.
    max_clients: int = Field(default=1000, ge=1)
    #: Seconds a connection has to open its session and say hello before it is closed.
    hello_timeout: float = Field(default=10.0, gt=0)
    #: Failed authentications allowed per peer address within ``auth_failure_window``
    #: seconds; beyond, that address's hellos are refused unchecked until it cools down.
    max_auth_failures: int = Field(default=10, ge=1)
    auth_failure_window: float = Field(default=60.0, gt=0)
    chunk_mib: float = Field(default=4.0, gt=0, le=32)
    max_payload_mib: float = Field(default=16384.0, gt=0)
    #: Reply bytes assembled at once across clients (at least one model's worth): bounds the
    #: server's memory when many clients answer together (the others wait in their senders:
    #: a 4 MiB model's replies arrive 8 at a time).
    receive_budget_mib: float = Field(default=32.0, gt=0)
    #: Each client stream's HTTP/2 receive window (KiB), fixed: what a client may send
    #: before the server reads it (a reply waiting for the receive budget waits in its
    #: sender beyond this: at 32 clients replying at once, 512 KiB kept the server within
    #: 1.3-1.4x its 8-client peak, 1 MiB 1.4-1.6x). It bounds one upload's pace to about
    #: window / round-trip time (512 KiB over 50 ms: 10 MB/s); raise it for clients far away
    #: on fast links.
    stream_window_kib: int = Field(default=512, ge=64, le=1 << 20)
    #: Bytes of replies a buffered aggregator (median, Krum...) keeps in memory in a round;
    #: later replies are spilled to memory-mapped files in the run directory until it ends.
    aggregation_memory_bytes: int = Field(default=1 << 30, ge=0)
    #: A train reply to a streaming aggregator (averaging, sum...) whose payload is at least
    #: this large is staged on disk in the run directory as it arrives and folded from there
    #: once complete (the server then holds the sum, not one update per reply in flight);
    #: smaller replies are received in memory. A very large value turns staging off.
    stage_replies_from_bytes: int = Field(default=1 << 20, ge=0)
    #: Modules of the server owner's packages to import (registered classes); never sent to
    #: clients.
    plugins: Plugins = Field(default_factory=list)
    #: A reply holding part of that budget must keep this pace (KiB/s) once ``transfer_grace``
    #: seconds have passed, with one chunk of slack, or its session is closed: a trickle
    #: cannot keep the other clients' replies waiting. The server's tasks to a client keep it
    #: too: a client that stops reading is closed rather than let it pin a payload.
    min_transfer_rate_kib: float = Field(default=256.0, gt=0)
    transfer_grace: float = Field(default=5.0, gt=0)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    #: Client-level differential privacy (docs/privacy.md); None: none.
    privacy: PrivacyConfig | None = None
    #: Serve Prometheus metrics on ``host:metrics_port/metrics`` (``fedpipe[prometheus]``;
    #: HTTPS with the server's certificate when ``tls_cert`` is set).
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    #: Serve the live status page on ``status_host:status_port``, to holders of the status
    #: token only (``status_token``, its hash from ``fedpipe hash-token``, or
    #: ``status_token_file``); a request must send its head within ``hello_timeout``.
    status_port: int | None = Field(default=None, ge=0, le=65535)
    status_host: str = "127.0.0.1"
    status_token: str = ""
    status_token_file: Path | None = None
    #: Mask updates so that the server learns only their sum; None: plain updates.
    secure_aggregation: SecureAggregationConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_replaced_keys(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        renamed = {"fraction": "fraction", "clients_per_round": "count"}
        old = {key: data[key] for key in renamed if key in data}
        if old:
            given = ", ".join(f"{key} = {value!r}" for key, value in old.items())
            ways = " or ".join(
                f'sampler = ["uniform", {{{renamed[key]} = {value!r}}}]'
                for key, value in old.items()
            )
            raise ValueError(
                f"{given}: sampler replaces fraction and clients_per_round; write {ways}"
            )
        return data

    @model_validator(mode="after")
    def _downweight_has_an_effect(self) -> Self:
        spec = self.aggregator  # a name, a [name, config] pair, or worse (the builder's)
        name = spec if isinstance(spec, str) else next(iter(spec), None)
        if self.validation is not None and self.validation.action == "downweight":
            if name == "fltrust":
                raise ValueError(
                    "validation.action='downweight' would do nothing with aggregator 'fltrust' "
                    "(it rescales every update to the norm of the server's own): use "
                    "action='reject', or leave validation out (FLTrust already bounds norms)"
                )
        return self

    @model_validator(mode="after")
    def _results_within_clients(self) -> Self:
        if self.min_results is not None and self.min_results > self.min_clients:
            raise ValueError(
                f"min_results={self.min_results} exceeds min_clients={self.min_clients}: "
                "a round could never collect enough results"
            )
        return self

    @model_validator(mode="after")
    def _threshold_within_clients(self) -> Self:
        secure = self.secure_aggregation
        if secure is not None and secure.threshold > self.min_clients:
            raise ValueError(
                f"secure_aggregation.threshold={secure.threshold} exceeds "
                f"min_clients={self.min_clients}: a round needs at least threshold clients "
                "to recover the sum; lower the threshold or raise min_clients"
            )
        return self

    @model_validator(mode="after")
    def _clients_within_max(self) -> Self:
        if self.min_clients > self.max_clients:
            raise ValueError(
                f"min_clients={self.min_clients} exceeds max_clients={self.max_clients}: "
                "the run could never start"
            )
        for name, stored in self.tokens.items():
            check_client_name(name, "tokens key")  # a name no hello could bring
            if not stored:
                raise ValueError(f"tokens.{name} is empty: give each client a secret")
            if is_hashed(stored):
                parse_hashed(stored)  # a malformed hash fails now, not at the client's hello
        return self

    @model_validator(mode="after")
    def _best_mode_known(self) -> Self:
        if self.best_metric is None or self.best_mode is not None:
            return self
        if self.early_stop is not None and self.early_stop.metric == self.best_metric:
            self.best_mode = self.early_stop.mode
        elif self.best_metric in ("loss", "train_loss"):
            self.best_mode = "min"
        else:
            raise ValueError(
                f"best_metric={self.best_metric!r} needs best_mode: 'max' if a higher value "
                "is better, 'min' if a lower one is"
            )
        return self

    @model_validator(mode="after")
    def _tls_beyond_loopback(self) -> Self:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.tls_cert is None and not self.insecure and not is_loopback(self.host):
            raise ValueError(
                f"host={self.host!r} is reachable from other machines: set tls_cert and "
                "tls_key, or insecure = true if a TLS proxy or a trusted network protects it"
            )
        return self

    @model_validator(mode="after")
    def _status_page_protected(self) -> Self:
        if self.status_token and self.status_token_file is not None:
            raise ValueError("status_token and status_token_file are two sources of one secret")
        if is_hashed(self.status_token):
            parse_hashed(self.status_token)
        if self.status_port is not None:
            if not self.status_token and self.status_token_file is None:
                raise ValueError(
                    "status_port needs status_token or status_token_file: the page is only "
                    "shown to holders of the token"
                )
            if self.tls_cert is None and not self.insecure and not is_loopback(self.status_host):
                raise ValueError(
                    f"status_host={self.status_host!r} is reachable from other machines: the "
                    "token would cross the network in clear; set tls_cert and tls_key (the "
                    "page is then served over HTTPS), or insecure = true"
                )
        ports = {"port": self.port, "metrics_port": self.metrics_port}
        ports["status_port"] = self.status_port
        taken: dict[int, str] = {}
        for name, number in ports.items():
            if number:  # 0 and None: no clash (any free port, or off)
                if number in taken:
                    raise ValueError(
                        f"{taken[number]} and {name} are both {number}: each needs its own port"
                    )
                taken[number] = name
        return self

    @property
    def chunk_bytes(self) -> int:
        return max(1, int(self.chunk_mib * (1 << 20)))

    @property
    def required_results(self) -> int:
        return self.min_results if self.min_results is not None else 1


class OwnTraining(_Strict):
    """A client's own data pipeline and training loop (``torch`` extra), and its sample-level
    DP-SGD, named by whoever owns the clients: a client's config, or a simulation's for its
    simulated clients; never the server's."""

    #: A factory returning the client's torch DataLoader(s) (fedpipe.common.data.torch_loaders);
    #: called with the client's fedpipe Datasets when it has some, else with nothing.
    loaders: ImportPath | None = None
    #: The client's own training loop, ``train(module, loader, round_config)``, in place of
    #: fedpipe's (fedpipe.common.train_fn); it trains on the ``loaders`` train loader.
    train_fn: ImportPath | None = None
    #: Sample-level DP-SGD on the client's data: the owner's choice, the server cannot change it.
    dp_sgd: DpSgdConfig | None = None

    @model_validator(mode="after")
    def _train_fn_has_loaders(self) -> Self:
        if self.dp_sgd is not None and self.loaders is not None:
            raise ValueError(
                f"dp_sgd draws Poisson batches from fedpipe's arrays and clips per sample; "
                f"loaders={self.loaders!r} (the client's own DataLoader or train_fn) cannot "
                "honour it: drop one"
            )
        if self.train_fn is not None and self.loaders is None:
            raise ValueError(
                f"train_fn={self.train_fn!r} trains on a torch DataLoader: set 'loaders' too"
            )
        return self


class ClientConfig(OwnTraining):
    """A client process: where the server is, who it is, where its private data lives."""

    server: str = "127.0.0.1:50051"
    name: ClientName = ""
    #: The admission token; prefer ``token_file`` or $FEDPIPE_TOKEN (argv is visible in ps).
    token: str = ""
    token_file: Path | None = None
    data: Path | None = None
    dataset: str | None = None
    eval_data: Path | None = None
    eval_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    seed: int = 0
    #: Seeds this client's privacy noise, for reproducible tests only: this setting never
    #: leaves the client. Unset (the default), privacy noise draws from OS entropy.
    noise_seed: int | None = None
    retry_initial: float = Field(default=0.5, gt=0)
    retry_max: float = Field(default=30.0, gt=0)
    retry_timeout: float = Field(default=600.0, gt=0)
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure: bool = False
    threads: int | None = Field(default=None, ge=1)
    #: Where this client trains a torch model: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
    #: The client's choice alone (the server never picks it); numpy models need ``"cpu"``.
    device: DeviceName = "cpu"
    #: Model import paths (``pkg.module:factory``) the server may ask this client to build.
    trusted_models: list[str] = Field(default_factory=list)
    #: Modules of this client owner's packages to import (registered classes). Only the
    #: client's own config and flags name them: a server cannot make a client import code.
    plugins: Plugins = Field(default_factory=list)
    #: Where this client keeps its module state after each round (one directory per client),
    #: so that it continues exactly after a crash; None keeps it in memory only. A round's
    #: start weights wait there too while the model trains (else in the temporary folder).
    state_dir: Path | None = None

    @property
    def use_tls(self) -> bool:
        """TLS unless the server is on loopback or ``insecure`` is set (and no TLS file is)."""
        explicit = self.tls_ca is not None or self.tls_cert is not None
        return explicit or not (self.insecure or is_loopback(self.server.rsplit(":", 1)[0]))

    def load_token(self, environ: Mapping[str, str]) -> str:
        """The admission token: ``token``, else the first line of ``token_file``, else
        ``environ["FEDPIPE_TOKEN"]``, else none.

        Raises
        ------
        ConfigError
            ``token_file`` cannot be read or is empty.
        """
        if self.token or self.token_file is None:
            return self.token or environ.get(TOKEN_ENV, "")
        return read_token_file(self.token_file, "token_file", "the token")

    @model_validator(mode="after")
    def _has_data(self) -> Self:
        if self.token and self.token_file is not None:
            raise ValueError("token and token_file are two sources of one secret: set one")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        if self.data is not None and self.dataset is not None:
            raise ValueError("'data' and 'dataset' are two sources of training data: set one")
        if self.data is None and self.dataset is None and self.loaders is None:
            raise ValueError(
                "no training data: set 'data' (a .npz/.npy/.csv file or a folder written by "
                "`fedpipe split`), 'dataset' (a built-in dataset name) or 'loaders' (a "
                "factory of torch DataLoaders, 'package.module:function')"
            )
        own_eval = self.eval_data is not None or self.eval_fraction > 0
        if own_eval and self.data is None and self.dataset is None:
            raise ValueError(
                "eval_data and eval_fraction are fedpipe data: with 'loaders' alone, the "
                "factory returns the evaluation DataLoader"
            )
        return self


class PartitionConfig(_Strict):
    """How simulation splits a dataset between clients."""

    scheme: Literal["iid", "dirichlet", "quantity-skew"] = "dirichlet"
    alpha: float = Field(default=0.5, gt=0)
    seed: int = 0


class DaskConfig(_Strict):
    """Where a ``transport = "dask"`` simulation runs (see :mod:`fedpipe.server.transports.dask`).

    ``scheduler`` names an existing cluster (``"tcp://host:8786"``: SLURM via dask-jobqueue,
    Kubernetes...); unset, a ``LocalCluster`` bound to 127.0.0.1 is started with ``workers``
    worker processes (default: one per core) of ``threads_per_worker`` threads, threads of this
    process instead with ``processes = false``. ``resources`` are Dask worker resources (such as
    ``{GPU = 1}``): a local cluster's workers get them, and clients go only to workers that
    have them. They only choose workers: with ``device = "cuda"``, a local cluster's workers
    go round the machine's GPUs, and a worker that sees one GPU (``CUDA_VISIBLE_DEVICES``)
    uses it.
    """

    scheduler: str | None = None
    workers: int | None = Field(default=None, ge=1)
    threads_per_worker: int = Field(default=1, ge=1)
    processes: bool = True
    resources: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_cluster(self) -> Self:
        local = {"workers", "threads_per_worker", "processes"} & self.model_fields_set
        if self.scheduler is not None and local:
            raise ValueError(
                f"{', '.join(sorted(local))} shape a local cluster, but scheduler="
                f"{self.scheduler!r} names an existing one; set one or the other"
            )
        return self


class SimulationConfig(OwnTraining):
    """A whole federation on one machine: a server config plus simulated clients.

    ``device`` places the in-process clients' torch model: unset, the model stays where its
    factory put it; ``"cuda"`` spreads clients over every visible GPU (client ``i`` on GPU
    ``i % n``, one model object per GPU); a list (``["cuda:0", "cuda:1"]``) names the
    devices, one model object per entry; ``"auto"`` is ``"cuda"`` when torch sees a GPU,
    else ``"cpu"``. ``mode`` is how clients train there (see
    :mod:`fedpipe.server.transports.inprocess`): ``"sequential"``, one after another on each
    device; ``"vectorized"``, the clients of a round that share a device at once,
    ``stack_clients`` stacked at a time (each costs about three copies of the model in
    memory): with ``torch.func`` for a torch model, with batched
    numpy (:mod:`fedpipe.common.stacked`, bit-equal to sequential) for a numpy model;
    ``"auto"`` (the default), vectorized for a numpy model, sequential for a torch model.
    ``transport = "dask"`` runs the clients on the Dask cluster ``dask`` describes
    (:class:`DaskConfig`): there ``"auto"`` stacks a numpy model's clients on each worker, and
    ``"vectorized"`` (torch.func) is in-process only.

    ``loaders`` and ``train_fn`` are a client config's (:class:`OwnTraining`), for every
    simulated client: the factory gets each client's partition, ``factory(train, eval)``, and
    the train_fn trains on its train loader. The vectorized mode stacks fedpipe's own arrays:
    with either, clients train one after another (``mode`` falls back to sequential).
    """

    n_clients: int = Field(default=10, ge=1)
    dataset: str = "digits"
    eval_fraction: float = Field(default=0.25, ge=0.0, lt=1.0)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    transport: Literal["inprocess", "grpc", "dask"] = "inprocess"
    dask: DaskConfig = Field(default_factory=DaskConfig)
    device: DeviceName | Annotated[list[DeviceName], Field(min_length=1)] | None = None
    mode: Literal["auto", "sequential", "vectorized"] = "auto"
    stack_clients: int = Field(default=1024, ge=1)
    #: Seeds the simulated clients' privacy noise (each mixes in its name), for reproducible
    #: tests: the simulation's owner owns its clients, the server never sees it. Unset, every
    #: client draws from OS entropy.
    noise_seed: int | None = None
    server: ServerConfig = Field(default_factory=ServerConfig)
    #: Modules to import in this process and in every process the simulation spawns (the
    #: simulation's owner owns its clients); added to ``server.plugins``.
    plugins: Plugins = Field(default_factory=list)

    @model_validator(mode="after")
    def _clients_admitted(self) -> Self:
        if self.transport == "grpc" and self.n_clients > self.server.max_clients:
            raise ValueError(
                f"n_clients={self.n_clients} exceeds server.max_clients="
                f"{self.server.max_clients}: the server would refuse the extra client processes"
            )
        if self.transport == "dask" and self.mode == "vectorized":
            raise ValueError(
                f"mode={self.mode!r} stacks a torch model's clients with torch.func in-process "
                "only; with transport='dask', mode='auto' (the default) stacks a numpy "
                "model's clients on each worker, mode='sequential' trains them one by one"
            )
        if self.transport == "grpc" and self.device is not None:
            raise ValueError(
                f"device={self.device!r} places in-process clients; with transport='grpc' "
                "each client process picks its device in its own config"
            )
        return self


C = TypeVar("C", bound=BaseModel)


def read_token_file(path: Path, field: str, what: str) -> str:
    """The first line of ``path`` (config field ``field``), a secret kept out of argv.

    Raises
    ------
    ConfigError
        The file cannot be read or its first line is empty.
    """
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{field} {path}: cannot read it ({exc})") from None
    token = lines[0].strip() if lines else ""
    if not token:
        raise ConfigError(f"{field} {path} is empty; expected {what}")
    return token


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (``localhost``, 127.0.0.0/8, ::1)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {field}: {err['msg']}{shown}")
    return "\n".join(lines)


def load_config(
    cls: type[C],
    path: Path | None,
    overrides: dict[str, Any] | None = None,
    *,
    default_text: str = "",
) -> C:
    """Load ``cls`` from a TOML file (JSON if it ends in ``.json``), or from the TOML text
    ``default_text`` when ``path`` is None, then apply dotted-key ``overrides``.

    Raises
    ------
    ConfigError
        The file is missing or unreadable, is not TOML/JSON, or a field is invalid.
    """
    source = "the built-in default" if path is None else str(path)
    try:
        if path is None:
            data = tomllib.loads(default_text)
        elif Path(path).suffix == ".json":
            data = json.loads(Path(path).read_text())
        else:
            data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file {source} is not valid: {exc}") from None
    if overrides:
        data = apply_overrides(data, overrides)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return ``data`` with dotted-key ``overrides`` set (``{"training.epochs": 2}``)."""
    out = dict(data)
    for key, value in overrides.items():
        if value is None:
            continue
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[leaf] = value
    return out
