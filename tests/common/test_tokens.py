"""Stored tokens (plain or scrypt-hashed) and where a client reads its own from."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpipe.common.config import ClientConfig, ConfigError, ServerConfig
from fedpipe.common.tokens import hash_token, parse_hashed, verify_token


def test_a_hashed_token_verifies_only_the_token_and_is_salted() -> None:
    stored = hash_token("s3cret", n=1 << 10)
    assert stored.startswith("scrypt$n=1024,r=8,p=1$") and "s3cret" not in stored
    assert verify_token("s3cret", stored)
    assert not verify_token("s3cret ", stored) and not verify_token("", stored)
    assert hash_token("s3cret", n=1 << 10) != stored
    assert verify_token("plain", "plain") and not verify_token("plain", "plaiN")
    with pytest.raises(ValueError, match="empty token"):
        hash_token("")


@pytest.mark.parametrize(
    ("stored", "problem"),
    [
        ("scrypt$n=1024$AAAA", "expected scrypt"),
        ("scrypt$n=1024,r=8$AAAAAAAA$" + "A" * 44, "expected scrypt"),
        ("scrypt$n=1000,r=8,p=1$AAAAAAAA$" + "A" * 44, "n a power of two"),
        ("scrypt$n=1048576,r=32,p=1$AAAAAAAA$" + "A" * 44, "128\\*n\\*r <= 256 MiB"),
        ("scrypt$n=1024,r=8,p=1$!!!!$" + "A" * 44, "expected scrypt"),
        ("scrypt$n=1024,r=8,p=1$AAAAAAAA$AAAA", "too short"),
    ],
)
def test_a_malformed_hash_fails_when_the_server_config_loads(stored: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_hashed(stored)
    with pytest.raises(ValueError, match=problem):
        ServerConfig(tokens={"alice": stored})


def test_server_config_bounds() -> None:
    with pytest.raises(ValueError, match="min_clients=5 exceeds max_clients=4"):
        ServerConfig(min_clients=5, max_clients=4)
    with pytest.raises(ValueError, match=r"tokens\.alice is empty"):
        ServerConfig(tokens={"alice": ""})


def test_a_client_reads_its_token_from_config_file_or_environment(tmp_path: Path) -> None:
    env = {"FEDPIPE_TOKEN": "from-env"}
    assert ClientConfig(dataset="digits", token="inline").load_token(env) == "inline"
    assert ClientConfig(dataset="digits").load_token(env) == "from-env"
    assert ClientConfig(dataset="digits").load_token({}) == ""
    path = tmp_path / "token"
    path.write_text("from-file  \nignored\n")
    assert ClientConfig(dataset="digits", token_file=path).load_token(env) == "from-file"
    path.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        ClientConfig(dataset="digits", token_file=path).load_token(env)
    with pytest.raises(ConfigError, match="cannot read it"):
        ClientConfig(dataset="digits", token_file=tmp_path / "nope").load_token(env)
    with pytest.raises(ValueError, match="set one"):
        ClientConfig(dataset="digits", token="x", token_file=path)
