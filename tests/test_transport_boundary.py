"""The transport boundary: ``fedpipe.common`` knows no transport, and a run that uses no gRPC
(in-process, Dask) never imports it; both ends of the gRPC transport agree on the service."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from fedpipe import grpc_channel

ROOT = Path(__file__).resolve().parent.parent
COMMON = ROOT / "fedpipe" / "common"


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code (lazy imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_common_source_imports_no_grpc_and_no_side() -> None:
    sources = sorted(COMMON.rglob("*.py"))
    assert len(sources) > 50  # the walk found the package
    offending = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in sources
        for name in imported_modules(path)
        if "grpc" in name or name.startswith(("fedpipe.server", "fedpipe.client"))
    }
    assert not offending, sorted(offending)


def test_the_checker_sees_a_lazy_grpc_import(tmp_path: Path) -> None:
    source = tmp_path / "lazy.py"
    source.write_text(
        "def f():\n    from fedpipe.proto.fedpipe.v1 import federation_pb2_grpc\n"
        "    import grpc.aio\n"
    )
    assert imported_modules(source) == {
        "fedpipe.proto.fedpipe.v1",
        "fedpipe.proto.fedpipe.v1.federation_pb2_grpc",
        "grpc.aio",
    }


BOUNDARY = """
import importlib, pkgutil, sys
import fedpipe.common, fedpipe.server
skip = "fedpipe.server.transports.grpc"
for package in (fedpipe.common, fedpipe.server):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if info.name != skip and not info.name.startswith(skip + "."):
            importlib.import_module(info.name)
assert "grpc" not in sys.modules, "importing common and server (but gRPC) loaded grpc"
import fedpipe
history = fedpipe.simulate(
    {"n_clients": 2, "dataset": "digits",
     "server": {"rounds": 1, "min_clients": 2, "output_dir": sys.argv[1]}}
)
assert history.status == "completed", history.reason
loaded = sorted(
    m for m in sys.modules
    if m.split(".")[0] in ("grpc", "grpc_health") or m.endswith("_pb2_grpc")
    or m.startswith(skip + ".")
)
assert not loaded, f"an in-process simulation loaded {loaded}"
print("ok")
"""


def test_an_inprocess_run_and_every_module_but_the_grpc_transport_load_no_grpc(
    tmp_path: Path,
) -> None:
    pytest.importorskip("dask")  # fedpipe.server.transports.dask is imported too
    proc = subprocess.run(
        [sys.executable, "-c", BOUNDARY, str(tmp_path / "run")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def test_both_ends_dial_the_same_session_method_with_the_same_options() -> None:
    # The path every fedpipe client since protocol version 1 dials.
    assert grpc_channel.SESSION_METHOD == "/fedpipe.v1.Federation/Session"
    assert grpc_channel.SERVICE_NAME == "fedpipe.v1.Federation"
    options = dict(grpc_channel.channel_options(64 << 20))
    assert options["grpc.max_receive_message_length"] == 2 * (64 << 20) + (1 << 20)
    # The client's keepalive pings come no more often than the server accepts them.
    assert (
        options["grpc.keepalive_time_ms"]
        >= dict(grpc_channel.channel_options(1))[
            "grpc.http2.min_recv_ping_interval_without_data_ms"
        ]
    )
