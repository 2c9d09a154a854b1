"""The ``fedpipe`` command: ``server``, ``client``, ``simulate``, ``split``, ``hash-token``,
``certs``, ``health``, ``plot``, ``new``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import logging
import os
import socket
import sys
import tomllib
from pathlib import Path
from typing import Any

from fedpipe import __version__
from fedpipe.common.config import (
    ClientConfig,
    ConfigError,
    ServerConfig,
    SimulationConfig,
    load_config,
)
from fedpipe.common.outcome import ExitCode, RunError
from fedpipe.common.plugins import import_plugins
from fedpipe.common.registry import UnknownNameError

__all__ = ["main"]

DESCRIPTION = """\
fedpipe: federated learning with pipelines of stateful optimizer modules.

  fedpipe simulate                  run the built-in demo: 10 clients on digits, FedAvg
  fedpipe simulate --config sim.toml
  fedpipe server --config server.toml
  fedpipe client --server HOST:PORT --data client_0/ --name hospital-a
  fedpipe split --dataset digits --clients 4 --out data/
  fedpipe hash-token < token.txt    print a token's hash for the server's [tokens] table
  fedpipe certs --out certs/ --server-name fl.example.org --client hospital-a
  fedpipe health --server HOST:PORT exit 0 if the server is serving (health checks)
  fedpipe plot runs/a runs/b        charts of runs (metrics, participation, round time)
  fedpipe new my_project            a project to start from: model, module, configs, tests
"""


def limit_math_threads(threads: int) -> None:
    """Cap BLAS/OpenMP thread pools; must run before numpy is first imported."""
    if "numpy" in sys.modules:
        raise RuntimeError("limit_math_threads() must run before numpy is imported")
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)


def parse_sets(pairs: list[str] | None) -> dict[str, Any]:
    """``--set section.key=value`` pairs as dotted-key overrides; a value is read as TOML
    (``5``, ``0.1``, ``true``, ``"text"``, ``[1, 2]``) and taken as text when it is not."""
    overrides: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected section.key=value")
        try:
            value: Any = tomllib.loads(f"value = {text}")["value"]
        except tomllib.TOMLDecodeError:
            value = text
        overrides[key.strip()] = value
    return overrides


def format_metric(value: float) -> str:
    """Four decimals; a tiny non-zero value (a DP ``delta``) in scientific notation."""
    return f"{value:.1e}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"


def format_round(record: dict[str, Any], rounds: int) -> str:
    """One progress line per round."""
    parts = [f"round {record['round']:>3}/{rounds}"]
    parts.append(f"clients {record.get('replied', 0)}/{record.get('sampled', 0)}")
    for key, value in record.items():
        if key in {"round", "replied", "sampled", "clients", "seconds", "failed"}:
            continue
        if isinstance(value, float):
            parts.append(f"{key} {format_metric(value)}")
    parts.append(f"{record.get('seconds', 0.0):.2f}s")
    if record.get("failed"):
        parts.append(f"({record['failed']}: model unchanged)")
    return "  ".join(parts)


def _printer(rounds: int, progress: str = "text") -> Any:
    """Per-round progress on stdout: a line for people, a JSON object, or nothing."""

    def on_round(record: dict[str, Any]) -> None:
        if progress == "text":
            print(format_round(record, rounds), flush=True)
        elif progress == "json":
            print(json.dumps(record), flush=True)

    return on_round


def _round_display(rounds: int, progress: str, title: str) -> Any:
    """A context manager giving the per-round callback: a live bar (``rich``) when stdout is a
    terminal and text progress is asked for, else :func:`_printer`'s lines or JSON."""
    if progress == "text" and sys.stdout.isatty():
        try:
            from fedpipe.progress import RoundBar
        except ImportError:  # the optional `rich` extra: lines will do
            pass
        else:
            return RoundBar(rounds, title)
    return contextlib.nullcontext(_printer(rounds, progress))


def _load_plugins(config: ServerConfig | ClientConfig | SimulationConfig, extra: list[str]) -> None:
    """Add the ``--plugin`` modules to the config's, then import them all: before any name of
    the config is looked up, and recorded in the config for the processes a simulation spawns."""
    if extra:
        config.plugins = list(dict.fromkeys([*config.plugins, *extra]))
    import_plugins(config.plugins)


# ---- commands ---------------------------------------------------------------------------------


def cmd_server(args: argparse.Namespace) -> int:
    from fedpipe.server.transports.grpc.server import serve

    overrides = {
        "host": args.host,
        "port": args.port,
        "rounds": args.rounds,
        "min_clients": args.min_clients,
        "output_dir": args.output_dir,
        "insecure": args.insecure or None,
    }
    config: ServerConfig = load_config(
        ServerConfig, args.config, {**overrides, **parse_sets(args.set)}
    )
    _load_plugins(config, args.plugin)
    with _round_display(config.rounds, args.progress, "server") as on_round:
        summary = asyncio.run(
            serve(config, resume=args.resume, overwrite=args.overwrite, on_round=on_round)
        )
    return _report(summary, config.output_dir, "server", quiet=args.progress != "text")


def _report(summary: Any, output_dir: Path, command: str, *, quiet: bool = False) -> int:
    """Say how the run ended; the exit code tells the same (0 only when it completed)."""
    done = f"{summary.rounds_completed} round(s) completed"
    if summary.status == "completed":
        if not quiet:
            print(f"done: {done}; model in {output_dir}/model.npz")
        return ExitCode.OK
    print(f"fedpipe {command}: run {summary.status}: {summary.reason} ({done})", file=sys.stderr)
    return ExitCode.INTERRUPTED if summary.status == "stopped" else ExitCode.FAILED


def cmd_client(args: argparse.Namespace) -> int:
    overrides = {
        "server": args.server,
        "name": args.name,
        "token": args.token,
        "token_file": str(args.token_file) if args.token_file else None,
        "data": str(args.data) if args.data else None,
        "dataset": args.dataset,
        "eval_data": str(args.eval_data) if args.eval_data else None,
        "eval_fraction": args.eval_fraction,
        "tls_ca": str(args.tls_ca) if args.tls_ca else None,
        "tls_cert": str(args.tls_cert) if args.tls_cert else None,
        "tls_key": str(args.tls_key) if args.tls_key else None,
        "insecure": args.insecure or None,
        "threads": args.threads,
        "device": args.device,
        "state_dir": str(args.state_dir) if args.state_dir else None,
    }
    config: ClientConfig = load_config(
        ClientConfig, args.config, {**overrides, **parse_sets(args.set)}
    )
    if config.threads is not None:
        limit_math_threads(config.threads)  # before the imports below load numpy
    _load_plugins(config, args.plugin)
    from fedpipe.client.daemon import ClientDaemon, ClientRefused

    if not config.name:
        config.name = f"{socket.gethostname()}-{os.getpid()}"
    config = config.model_copy(update={"token": config.load_token(os.environ), "token_file": None})
    data, eval_data = _client_data(config)
    try:
        return asyncio.run(ClientDaemon(config, data, eval_data).run())
    except ClientRefused as exc:
        print(f"fedpipe client: {exc}", file=sys.stderr)
        return ExitCode.REFUSED


def _client_data(config: ClientConfig) -> tuple[Any, Any]:
    """The client's (train, eval) data: fedpipe Datasets, or the torch loaders its
    ``loaders`` factory makes (of those Datasets, when it has some)."""
    from fedpipe.common.data import Dataset, load_builtin, load_dataset

    data: Dataset | None = None
    if config.data is not None or config.dataset is not None:
        data = load_dataset(config.data) if config.data else load_builtin(str(config.dataset))
    eval_data = load_dataset(config.eval_data) if config.eval_data else None
    if data is not None and eval_data is None and config.eval_fraction > 0:
        data, eval_data = data.split(1.0 - config.eval_fraction, seed=config.seed)
    if config.loaders is None:
        return data, eval_data
    from fedpipe.common.data.torch_loaders import load_loaders

    return load_loaders(config.loaders, data, eval_data)


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedpipe.server.simulation import SimulationError, simulate, with_run_dir

    overrides = {
        "n_clients": args.clients,
        "transport": args.transport,
        "dataset": args.dataset,
        "server.rounds": args.rounds,
        "server.output_dir": args.output_dir,
    }
    from fedpipe.server.simulation import DEFAULT_CONFIG_TEXT

    if args.print_config:
        print(DEFAULT_CONFIG_TEXT, end="")
        return 0
    sim = load_config(
        SimulationConfig,
        args.config,
        {**overrides, **parse_sets(args.set)},
        default_text=DEFAULT_CONFIG_TEXT,
    )
    _load_plugins(sim, args.plugin)
    sim = with_run_dir(sim)
    print(
        f"simulating {sim.n_clients} clients on {sim.dataset} "
        f"({sim.partition.scheme} split, transport {sim.transport}), "
        f"{sim.server.rounds} rounds, in {sim.server.output_dir}/",
        flush=True,
    )
    try:
        with _round_display(sim.server.rounds, "text", "simulate") as on_round:
            summary = simulate(sim, on_round=on_round, overwrite=args.overwrite)
    except SimulationError as exc:
        print(f"fedpipe simulate: {exc}", file=sys.stderr)
        return 1
    final = summary.history[-1] if summary.history else {}
    shown = {k: v for k, v in final.items() if isinstance(v, float) and k != "seconds"}
    print("final: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    print(f"metrics and model in {sim.server.output_dir}/")
    return _report(summary, sim.server.output_dir, "simulate", quiet=True)


def cmd_hash_token(args: argparse.Namespace) -> int:
    from fedpipe.common.tokens import hash_token

    # Read from the terminal or stdin, never argv: argv is visible to every user in `ps`.
    if sys.stdin.isatty():
        token = getpass.getpass("token: ")
    else:
        token = sys.stdin.readline().strip()
    if not token:
        print("fedpipe hash-token: no token given on stdin", file=sys.stderr)
        return 2
    print(hash_token(token))
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    try:
        from fedpipe.common import certs
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("cryptography"):
            raise
        print(
            "fedpipe certs: needs the 'cryptography' package: pip install 'fedpipe[certs]'",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    try:
        if args.add_client:
            if args.server_name or args.client:
                raise certs.CertificateError("--add-client uses the CA in --out; give it alone")
            written = certs.add_clients(args.out, args.add_client, days=args.days, force=args.force)
        else:
            written = certs.make_pki(
                args.out, args.server_name, args.client, days=args.days, force=args.force
            )
    except certs.CertificateError as exc:
        return _fail(args, exc, ExitCode.USAGE)
    for item in written:
        print(f"wrote {item.path} ({'0600' if item.secret else '0644'}): {item.what}")
    clients = args.add_client or args.client
    print(certs.usage_text(args.out, not args.add_client, clients))
    return ExitCode.OK


def cmd_plot(args: argparse.Namespace) -> int:
    from fedpipe.plot import PlotError, plot_runs

    out = args.out or (args.runs[0] / "plots" if len(args.runs) == 1 else Path("plots"))
    try:
        written = plot_runs(args.runs, out)
    except PlotError as exc:
        print(f"fedpipe plot: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    for path in written:
        print(path)
    return 0


def cmd_new(args: argparse.Namespace) -> int:
    from fedpipe.project_template import ProjectError, write_project

    try:
        folder, written = write_project(args.name, args.dir, force=args.force)
    except ProjectError as exc:
        return _fail(args, exc, ExitCode.USAGE)
    print(f"wrote {len(written)} files in {folder}/:")
    for path in written:
        print(f"  {path.relative_to(folder)}")
    print(
        f"next:\n  cd {folder}\n  PYTHONPATH=. fedpipe simulate --config simulation.toml\n"
        f"  python -m pytest\nand see {folder / 'README.md'} (server, clients, pip install -e .)"
    )
    return ExitCode.OK


def cmd_split(args: argparse.Namespace) -> int:
    from fedpipe.common.data import partition, save_partitions
    from fedpipe.server.simulation import load_source

    data = load_source(args.dataset)
    parts = partition(data, args.clients, args.scheme, seed=args.seed, alpha=args.alpha)
    for folder, part in zip(save_partitions(parts, args.out), parts, strict=True):
        print(f"{folder}: {len(part)} samples")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    if not args.verbose:  # gRPC's own log of a failed handshake would be a second line
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from fedpipe.common.config import is_loopback

    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
    # TLS on the same terms as `fedpipe client`: plaintext only to loopback or with --insecure.
    host = args.server.rsplit(":", 1)[0]
    if args.tls_ca or args.tls_cert or not (args.insecure or is_loopback(host)):
        credentials = grpc.ssl_channel_credentials(
            root_certificates=args.tls_ca.read_bytes() if args.tls_ca else None,
            private_key=args.tls_key.read_bytes() if args.tls_key else None,
            certificate_chain=args.tls_cert.read_bytes() if args.tls_cert else None,
        )
        channel = grpc.secure_channel(args.server, credentials)
    else:
        channel = grpc.insecure_channel(args.server)
    request = health_pb2.HealthCheckRequest(service="")
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            detail = " ".join(str(exc.details()).split())  # one line, whatever gRPC says
            print(f"fedpipe health: {args.server}: {exc.code().name}: {detail}", file=sys.stderr)
            return ExitCode.FAILED
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"fedpipe health: {args.server}: {status}", file=sys.stderr)
        return ExitCode.FAILED
    print(f"{args.server}: {status}")
    return ExitCode.OK


# ---- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedpipe", description=DESCRIPTION, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"fedpipe {__version__}")
    # Options every subcommand accepts after its name too (``fedpipe server -v``).
    common = argparse.ArgumentParser(add_help=False)
    for where in (parser, common):
        default: Any = 0 if where is parser else argparse.SUPPRESS  # a subcommand's flags add on
        where.add_argument(
            "-v",
            "--verbose",
            action="count",
            default=default,
            help="more logging (-vv: debug; shows tracebacks)",
        )
        where.add_argument(
            "-q", "--quiet", action="count", default=default, help="less logging (errors only)"
        )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    server = sub.add_parser(
        "server",
        parents=[common],
        help="run the server daemon",
        description="Run the server daemon: wait for clients, run the federated rounds, "
        "checkpoint each round, write metrics (CSV, JSON lines) and the final model (.npz).",
    )
    server.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any config field: --set rounds=5 --set training.batch_size=64",
    )
    server.add_argument("--config", type=Path, help="server TOML file (see examples/)")
    server.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    server.add_argument("--port", type=int, help="port to listen on (default 50051)")
    server.add_argument("--rounds", type=int, help="number of rounds")
    server.add_argument("--min-clients", type=int, help="clients to wait for before round 1")
    server.add_argument("--output-dir", help="where checkpoints, metrics and the model go")
    server.add_argument(
        "--insecure",
        action="store_true",
        help="allow plaintext gRPC on a non-loopback host (behind a TLS proxy or trusted LAN)",
    )
    server.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    _add_overwrite_flag(server)
    server.add_argument(
        "--progress",
        choices=["text", "json", "none"],
        default="text",
        help="per-round progress on stdout: a line (default), a JSON object, or nothing",
    )
    _add_plugin_flag(server)
    server.set_defaults(func=cmd_server)

    client = sub.add_parser(
        "client",
        parents=[common],
        help="run a client process",
        description="Run a client: dial the server, train on local data when asked, "
        "reconnect with backoff if the server is unreachable, exit 0 when the run ends.",
    )
    client.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any config field: --set rounds=5 --set training.batch_size=64",
    )
    client.add_argument("--config", type=Path, help="client TOML file")
    client.add_argument("--server", help="server address HOST:PORT")
    client.add_argument("--name", help="this client's unique name")
    client.add_argument(
        "--token",
        help="admission token, if the server requires one (visible in `ps`: prefer "
        "--token-file or the FEDPIPE_TOKEN environment variable)",
    )
    client.add_argument("--token-file", type=Path, help="file whose first line is the token")
    client.add_argument("--data", type=Path, help="training data: .npz, .csv or a split folder")
    client.add_argument("--dataset", help="a built-in dataset instead of --data (demos)")
    client.add_argument("--eval-data", type=Path, help="evaluation data (same formats)")
    client.add_argument("--eval-fraction", type=float, help="hold out this share for evaluation")
    client.add_argument(
        "--threads", type=int, help="math-library threads (1 when many clients share a machine)"
    )
    client.add_argument(
        "--device", help="where to train a torch model: cpu (default), cuda, cuda:1, mps"
    )
    client.add_argument("--tls-ca", type=Path, help="CA certificate that signed the server's")
    client.add_argument(
        "--tls-cert", type=Path, help="this client's certificate, for mutual TLS (fedpipe certs)"
    )
    client.add_argument("--tls-key", type=Path, help="the private key of --tls-cert")
    client.add_argument(
        "--state-dir",
        type=Path,
        help="keep the module state here after each round, to continue exactly after a crash",
    )
    client.add_argument(
        "--insecure", action="store_true", help="plaintext gRPC to a non-loopback server"
    )
    _add_plugin_flag(client)
    client.set_defaults(func=cmd_client)

    simulate = sub.add_parser(
        "simulate",
        parents=[common],
        help="run a local simulation",
        description="Run a whole federation on this machine. Without --config: 10 clients "
        "on the digits dataset with a Dirichlet label skew, FedAvg, 10 rounds.",
    )
    simulate.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any config field: --set rounds=5 --set training.batch_size=64",
    )
    simulate.add_argument("--config", type=Path, help="simulation TOML file")
    simulate.add_argument("--clients", type=int, help="number of simulated clients")
    simulate.add_argument("--rounds", type=int, help="number of rounds")
    simulate.add_argument("--dataset", help="built-in dataset name or a data file/folder")
    simulate.add_argument("--transport", choices=["inprocess", "grpc"])
    simulate.add_argument(
        "--output-dir",
        help="where metrics and the models go (default: a new runs/simulation-<date>-<time>/)",
    )
    _add_overwrite_flag(simulate)
    simulate.add_argument(
        "--print-config", action="store_true", help="print the default config and exit"
    )
    _add_plugin_flag(simulate)
    simulate.set_defaults(func=cmd_simulate)

    split = sub.add_parser(
        "split",
        parents=[common],
        help="split a dataset into one folder per client",
        description="Partition a dataset and write out/client_<i>/ folders (x.npy, y.npy) "
        "to hand to client processes with --data.",
    )
    split.add_argument("--dataset", required=True, help="built-in name or a data file")
    split.add_argument("--clients", type=int, required=True)
    split.add_argument("--scheme", choices=["iid", "dirichlet", "quantity-skew"], default="iid")
    split.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--out", type=Path, required=True)
    split.set_defaults(func=cmd_split)

    hashing = sub.add_parser(
        "hash-token",
        help="print a client token's salted hash for the server config",
        description="Read a client token from stdin (or the terminal) and print its salted "
        "scrypt hash: paste it in the server's [tokens] table in place of the token.",
    )
    hashing.set_defaults(func=cmd_hash_token)

    certs = sub.add_parser(
        "certs",
        parents=[common],
        help="make a CA and the server's and clients' certificates for mutual TLS",
        description="Make a private CA, a certificate for the server (for the host names "
        "clients dial) and one per client (its name in it: the server admits it only under "
        "that name), and print the config lines that use them. Needs 'fedpipe[certs]'.",
    )
    certs.add_argument("--out", type=Path, required=True, help="folder to write the files to")
    certs.add_argument(
        "--server-name",
        action="append",
        default=[],
        metavar="HOST",
        help="a host name or IP address clients dial the server by (repeatable; add "
        "localhost and 127.0.0.1 only if clients use them)",
    )
    certs.add_argument(
        "--client", action="append", default=[], metavar="NAME", help="a client's name (repeatable)"
    )
    certs.add_argument(
        "--add-client",
        action="append",
        default=[],
        metavar="NAME",
        help="a certificate for a new client, signed by the CA already in --out (repeatable)",
    )
    certs.add_argument(
        "--days", type=int, default=365, help="validity of the server and client certificates"
    )
    certs.add_argument("--force", action="store_true", help="replace existing files")
    certs.set_defaults(func=cmd_certs)

    health = sub.add_parser(
        "health",
        parents=[common],
        help="ask a server whether it is serving (for health checks)",
        description="Ask a fedpipe server through the gRPC health service whether it is "
        "serving: exit 0 when it is, 1 with one line on stderr when it is not or cannot be "
        "reached. Docker's HEALTHCHECK and Kubernetes probes run it.",
    )
    health.add_argument(
        "--server", default="127.0.0.1:50051", help="HOST:PORT (default %(default)s)"
    )
    health.add_argument("--tls-ca", type=Path, help="CA certificate that signed the server's")
    health.add_argument("--tls-cert", type=Path, help="client certificate, for mutual TLS")
    health.add_argument("--tls-key", type=Path, help="its private key")
    health.add_argument(
        "--insecure", action="store_true", help="plaintext gRPC to a non-loopback server"
    )
    health.add_argument("--timeout", type=float, default=5.0, help="seconds (default %(default)s)")
    health.set_defaults(func=cmd_health)

    plot = sub.add_parser(
        "plot",
        parents=[common],
        help="draw the metrics of runs as PNG charts",
        description="Write PNG charts of one or more run directories: each metric per round "
        "(runs overlaid), clients per round, time per round, and a client x round map per run. "
        "Needs matplotlib: pip install 'fedpipe[plot]'.",
    )
    plot.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="a run's directory")
    plot.add_argument(
        "--out", type=Path, help="where the PNGs go (default: RUN_DIR/plots, or plots/ for several)"
    )
    plot.set_defaults(func=cmd_plot)

    new = sub.add_parser(
        "new",
        parents=[common],
        help="write a new project: a package with a model, a module, configs and tests",
        description="Write DIR/NAME/: a Python package NAME with a model factory and an "
        "optimizer module of its own, simulation/server/client configs that use them, a test, "
        "a README and a pyproject.toml that registers the module as a fedpipe plugin. Its "
        "simulation runs at once: cd NAME && PYTHONPATH=. fedpipe simulate --config "
        "simulation.toml",
    )
    new.add_argument("name", metavar="NAME", help="the package name: a Python identifier")
    new.add_argument(
        "--dir", type=Path, default=Path(), help="where to make the NAME folder (default: here)"
    )
    new.add_argument(
        "--force", action="store_true", help="write into a non-empty NAME folder (replaces files)"
    )
    new.set_defaults(func=cmd_new)
    return parser


def _add_overwrite_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run the output directory holds (its metrics, checkpoint, models, "
        "logs); without it such a directory is refused",
    )


def _add_plugin_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE of your own package first, so that the modules, models, "
        "aggregators... it registers are usable by name (repeatable; adds to the config's "
        "'plugins')",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Daemons log joins, leaves and rounds by default; one-shot commands only problems.
    base = logging.INFO if args.command in ("server", "client") else logging.WARNING
    level = min(max(base + 10 * (args.quiet - args.verbose), logging.DEBUG), logging.ERROR)
    # The handler holds the level too: Dask's loggers set their own (INFO: its cluster's start
    # and shutdown, ~30 lines) and would pass a level set on the root logger alone.
    handler = logging.StreamHandler()
    handler.setLevel(level)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=[handler]
    )
    try:
        return int(args.func(args))
    except (ConfigError, UnknownNameError) as exc:
        return _fail(args, exc, ExitCode.USAGE)
    except RunError as exc:  # the run could not start (its directory is not writable...)
        return _fail(args, exc, ExitCode.FAILED)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        return _fail(args, exc, ExitCode.USAGE)  # a missing data, certificate or config file
    except KeyboardInterrupt:
        print(f"fedpipe {args.command}: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except TypeError as exc:  # a registered class rejected its config
        if "invalid config" not in str(exc):
            raise
        return _fail(args, exc, ExitCode.USAGE)


def _fail(args: argparse.Namespace, exc: BaseException, code: int) -> int:
    """One line on stderr for an expected failure; the traceback only with ``-v``."""
    if args.verbose:
        logging.getLogger("fedpipe").error("%s", exc, exc_info=exc)
    print(f"fedpipe {args.command}: {exc}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
