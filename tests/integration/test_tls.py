"""Mutual TLS: a client with a certificate signed by the run's CA trains; others get nothing."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedpipe.common.config import ServerConfig
from tests.integration.conftest import finish, running_server, server_config

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    d = tmp_path_factory.mktemp("pki")
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(
        "req",
        "-x509",
        *key,
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=fedpipe-test-ca",
        cwd=d,
    )
    for who, san in (("server", "IP:127.0.0.1,DNS:localhost"), ("client", "DNS:client")):
        openssl(
            "req", *key, "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj", f"/CN={who}", cwd=d
        )
        (d / f"{who}.ext").write_text(f"subjectAltName={san}\n")
        openssl(
            "x509",
            "-req",
            "-in",
            f"{who}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{who}.crt",
            "-days",
            "2",
            "-extfile",
            f"{who}.ext",
            cwd=d,
        )
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
                "tls_cert": pki / "client.crt",
                "tls_key": pki / "client.key",
            },
        )
        processes.append(good)
        summary = await asyncio.wait_for(server, 60)
        code_good, out_good = await asyncio.to_thread(finish, good)
    assert code_plain == 1 and code_no_cert == 1  # gave up: the server never let them in
    assert "gave up reaching" in out_no_cert
    assert code_good == 0, out_good
    assert summary.history[0]["clients"] == ["client"]


def test_serving_beyond_loopback_without_tls_must_be_explicit() -> None:
    with pytest.raises(ValueError, match="set tls_cert and tls_key, or insecure = true"):
        ServerConfig(host="0.0.0.0")
    assert ServerConfig(host="0.0.0.0", insecure=True).insecure
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        ServerConfig(tls_cert=Path("server.crt"))
