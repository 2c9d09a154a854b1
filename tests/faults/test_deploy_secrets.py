"""deploy/make-secrets.sh, the one-time step of compose and Kubernetes, end to end: the files
it writes are private, the server's config holds the hashes of the clients' tokens, and a
real server and two real clients run a federation with them over mutual TLS, health checked
as the deployments do; the health certificate cannot join."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedpipe.cli import build_parser
from fedpipe.common.config import ServerConfig, load_config
from fedpipe.common.outcome import ExitCode
from fedpipe.common.tokens import verify_token
from fedpipe.server.simulation import free_port
from tests.deploy_files import CLIENT_FILES, DEPLOY, ROOT, SERVER_FILES
from tests.faults.conftest import finish, wait_for_line


def has_command(name: str) -> bool:
    actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return name in actions[0].choices


pytestmark = pytest.mark.skipif(
    not has_command("certs"), reason="fedpipe certs (which make-secrets.sh runs) is not here yet"
)
CLIENTS = ("client-0", "client-1")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """PATH with a `fedpipe` that runs this checkout's package, as the script calls it."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "fedpipe").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fedpipe "$@"\n')
    (bindir / "fedpipe").chmod(0o755)
    path = os.pathsep.join([str(bindir), os.environ["PATH"]])
    return dict(os.environ, PATH=path, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")


def make_secrets(out: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = str(DEPLOY / "make-secrets.sh")
    argv = ["sh", script, str(out), "server", ",".join(CLIENTS)]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)


def test_make_secrets_writes_private_files_and_the_tokens_hashes(
    tmp_path: Path, env: dict[str, str]
) -> None:
    out = tmp_path / "secrets"
    made = make_secrets(out, env)
    assert made.returncode == 0, made.stderr
    assert {p.name for p in (out / "server").iterdir()} == SERVER_FILES
    for name in CLIENTS:
        assert {p.name for p in (out / name).iterdir()} == CLIENT_FILES
    for path in out.rglob("*"):  # ca/ holds public certificates, in a private folder
        if path.parent.name not in ("ca", "clients"):
            assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
    config = load_config(ServerConfig, out / "server" / "server.toml")
    base = load_config(ServerConfig, DEPLOY / "server.toml")
    assert config.model_dump(exclude={"tokens"}) == base.model_dump(exclude={"tokens"})
    assert set(config.tokens) == set(CLIENTS)
    tokens = {name: (out / name / "client.token").read_text() for name in CLIENTS}
    assert len({len(t) for t in tokens.values()}) == 1 and len(tokens["client-0"]) == 64
    for name, token in tokens.items():
        assert token not in (out / "server" / "server.toml").read_text()
        assert verify_token(token, config.tokens[name])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = make_secrets(out, env)
    assert again.returncode == 0 and "keeping the secrets" in again.stdout
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_federation_runs_on_the_secrets_and_the_health_certificate_cannot_join(
    tmp_path: Path,
    env: dict[str, str],
    procs: list[subprocess.Popen[str]],
    client_data: list[Path],
) -> None:
    out = tmp_path / "secrets"
    assert make_secrets(out, env).returncode == 0
    port = free_port()
    server = spawn_secured_server(out / "server", port, tmp_path, env)
    procs.append(server)
    files = out / "server"
    health = [sys.executable, "-m", "fedpipe", "health", "--server", f"localhost:{port}"]
    health += ["--tls-ca", str(files / "ca.crt"), "--tls-cert", str(files / "health.crt")]
    health += ["--tls-key", str(files / "health.key")]
    for _ in range(100):  # bounded: 100 x ~1 s
        if subprocess.run(health, env=env, capture_output=True, timeout=60).returncode == 0:
            break
        assert server.poll() is None, (tmp_path / "server.log").read_text()
        time.sleep(0.5)
    else:
        pytest.fail("the server never reported SERVING")

    # The health certificate, even with a client's token, opens no session.
    stolen = out / "client-0" / "client.token"
    intruder = client("health", out / "server", "health", stolen, port, client_data[2], tmp_path)
    procs.append(intruder)
    assert finish(intruder, 60)[0] == ExitCode.REFUSED
    clients = [
        client(name, out / name, "client", out / name / "client.token", port, data, tmp_path)
        for name, data in zip(CLIENTS, client_data, strict=False)
    ]
    procs.extend(clients)
    assert wait_for_line(server, lambda r: r.get("round") == 2, 120) is not None
    assert [finish(c, 60)[0] for c in clients] == [0, 0]
    assert server.wait(timeout=60) == 0


def spawn_secured_server(
    folder: Path, port: int, tmp_path: Path, env: dict[str, str]
) -> subprocess.Popen[str]:
    """`fedpipe server` with the config make-secrets.sh wrote, on loopback, its files here."""
    sets = {
        "tls_cert": folder / "server.crt",
        "tls_key": folder / "server.key",
        "tls_client_ca": folder / "ca.crt",
        "host": "127.0.0.1",
        "port": port,
        "output_dir": tmp_path / "run",
        "rounds": 2,
    }
    argv = [sys.executable, "-m", "fedpipe", "server", "--config", str(folder / "server.toml")]
    argv += ["--progress", "json", *(a for k, v in sets.items() for a in ("--set", f"{k}={v}"))]
    with open(tmp_path / "server.log", "w") as log:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True, env=env)


def client(
    name: str, folder: Path, stem: str, token: Path, port: int, data: Path, tmp_path: Path
) -> subprocess.Popen[str]:
    """A `fedpipe client` with deploy/client.toml, the certificate ``folder/stem.crt`` and
    the token file ``token``: the deployment's paths are replaced by the ones here."""
    sets = {
        "tls_ca": folder / "ca.crt",
        "tls_cert": folder / f"{stem}.crt",
        "tls_key": folder / f"{stem}.key",
        "token_file": token,
        "state_dir": tmp_path / f"state-{name}",
        "retry_timeout": 20,
    }
    argv = [sys.executable, "-m", "fedpipe", "client", "--config", str(DEPLOY / "client.toml")]
    argv += ["--name", name, "--server", f"localhost:{port}", "--data", str(data)]
    argv += [arg for k, v in sets.items() for arg in ("--set", f"{k}={v}")]
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    with open(tmp_path / f"{name}.log", "w") as log:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
