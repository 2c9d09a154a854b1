"""Mutual TLS: a client with a certificate signed by the run's CA trains; others get nothing."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from fedpipe.common.certs import make_pki
from fedpipe.common.config import ServerConfig
from tests.integration.conftest import finish, running_server, server_config


def openssl(*args: str, cwd: Path) -> None:
    """The openssl CLI (tests/faults/test_identity.py makes a certificate without SAN)."""
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA (ca.crt, ca.key), a server certificate for 127.0.0.1 and localhost, and a
    client certificate for "client" (clients/client.crt), made by ``fedpipe certs``' code."""
    d = tmp_path_factory.mktemp("pki")
    make_pki(d, ["127.0.0.1", "localhost"], ["client"], days=2)
    return d


def client_process(
    tmp_path: Path, name: str, port: int, data: Path, tls: dict[str, Path]
) -> subprocess.Popen[str]:
    lines = [
        f'server = "127.0.0.1:{port}"',
        f'name = "{name}"',
        f'data = "{data}"',
        "retry_initial = 0.2",
        "retry_max = 0.5",
        "retry_timeout = 3.0",
    ]
    lines += [f'{key} = "{path}"' for key, path in tls.items()]
    config = tmp_path / f"{name}.toml"
    config.write_text("\n".join(lines) + "\n")
    return subprocess.Popen(
        [sys.executable, "-m", "fedpipe", "-v", "client", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


async def test_mutual_tls_admits_only_certified_clients(
    tmp_path: Path, pki: Path, client_data: list[Path], processes: list[subprocess.Popen[str]]
) -> None:
    config = server_config(
        tmp_path,
        rounds=1,
        min_clients=1,
        eval_every=0,
        tls_cert=pki / "server.crt",
        tls_key=pki / "server.key",
        tls_client_ca=pki / "ca.crt",
    )
    async with running_server(config) as server:
        plain = client_process(tmp_path, "plain", config.port, client_data[0], {})
        no_cert = client_process(
            tmp_path, "no-cert", config.port, client_data[1], {"tls_ca": pki / "ca.crt"}
        )
        processes += [plain, no_cert]
        (code_plain, _), (code_no_cert, out_no_cert) = await asyncio.gather(
            asyncio.to_thread(finish, plain), asyncio.to_thread(finish, no_cert)
        )
        good = client_process(
            tmp_path,
            "client",  # the certificate's name: a certificate admits only its own name
            config.port,
            client_data[2],
            {
                "tls_ca": pki / "ca.crt",
                "tls_cert": pki / "clients" / "client.crt",
                "tls_key": pki / "clients" / "client.key",
            },
        )
        processes.append(good)
        summary = await asyncio.wait_for(server, 60)
        code_good, out_good = await asyncio.to_thread(finish, good)
    assert code_plain == 1 and code_no_cert == 1  # gave up: the server never let them in
    assert "gave up reaching" in out_no_cert
    assert "it requires a client certificate (mutual TLS)" in out_no_cert
    assert code_good == 0, out_good
    assert summary.history[0]["clients"] == ["client"]


def test_serving_beyond_loopback_without_tls_must_be_explicit() -> None:
    with pytest.raises(ValueError, match="set tls_cert and tls_key, or insecure = true"):
        ServerConfig(host="0.0.0.0")
    assert ServerConfig(host="0.0.0.0", insecure=True).insecure
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        ServerConfig(tls_cert=Path("server.crt"))
