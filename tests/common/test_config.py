"""Config checks of the monitoring fields: the status page is never open without a token or
in clear beyond loopback, ports do not clash, tracking fields are strict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedpipe.common.config import ConfigError, ServerConfig, load_config
from fedpipe.common.tokens import hash_token


def load(tmp_path: Path, text: str) -> ServerConfig:
    path = tmp_path / "server.toml"
    path.write_text(text)
    return load_config(ServerConfig, path)


def test_monitoring_is_off_unless_asked() -> None:
    config = ServerConfig()
    assert config.metrics_port is None and config.status_port is None
    assert config.tracking.tensorboard_dir is None and config.tracking.mlflow_uri is None
    assert config.status_host == "127.0.0.1"


def test_a_full_monitoring_section_loads(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        'metrics_port = 9100\nstatus_port = 8080\nstatus_token = "t"\n'
        '[tracking]\ntensorboard_dir = "tb"\nmlflow_uri = "file:./mlruns"\n'
        'mlflow_experiment = "digits"\n',
    )
    assert (config.metrics_port, config.status_port, config.status_token) == (9100, 8080, "t")
    assert config.tracking.tensorboard_dir == Path("tb")
    assert config.tracking.mlflow_experiment == "digits"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"status_port": 8080}, "status_port needs status_token or status_token_file"),
        (
            {"status_port": 8080, "status_token": "t", "status_token_file": "t.txt"},
            "two sources of one secret",
        ),
        (
            {"status_port": 8080, "status_token": "t", "status_host": "0.0.0.0"},
            "status_host='0.0.0.0' is reachable from other machines",
        ),
        ({"status_token": "scrypt$broken"}, "hashed token"),
        ({"metrics_port": 50051}, "port and metrics_port are both 50051"),
        (
            {"metrics_port": 9000, "status_port": 9000, "status_token": "t"},
            "metrics_port and status_port are both 9000",
        ),
        ({"tracking": {"tensorbord_dir": "tb"}}, "tensorbord_dir"),
        ({"tracking": {"mlflow_experiment": ""}}, "mlflow_experiment"),
    ],
)
def test_unsafe_or_wrong_monitoring_settings_are_refused(
    tmp_path: Path, fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("$", r"\$")):
        load_config(ServerConfig, None, fields)


def test_a_status_page_beyond_loopback_is_allowed_with_tls_or_insecure() -> None:
    tls = {"tls_cert": "server.crt", "tls_key": "server.key", "host": "0.0.0.0"}
    ServerConfig(status_port=8080, status_token="t", status_host="0.0.0.0", **tls)
    ServerConfig(status_port=8080, status_token="t", status_host="0.0.0.0", insecure=True)
    ServerConfig(status_port=8080, status_token=hash_token("t"))  # a hash, as for clients
    ServerConfig(metrics_port=0, status_port=0, status_token="t")  # any free ports
