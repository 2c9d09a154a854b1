"""One rule for client names, wherever a name comes from (fedpipe.common.client_name)."""

from __future__ import annotations

import pydantic
import pytest

from fedpipe.common.client_name import BadClientName, check_client_name
from fedpipe.common.config import ClientConfig, ServerConfig

RULE = "must be 1-128 printable characters (no control characters such as '\\x00' or line breaks)"


@pytest.mark.parametrize("name", ["client-07", "x" * 128, "émile", "site A/3"])
def test_printable_names_up_to_128_characters_pass(name: str) -> None:
    assert check_client_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "x" * 129, "c1\x00", "\x00c1", "line\nbreak", "tab\there", "bell\x07"],
    ids=["empty", "129", "trailing-nul", "leading-nul", "newline", "tab", "bell"],
)
def test_other_names_are_refused_with_the_name_and_the_rule(name: str) -> None:
    with pytest.raises(BadClientName) as refused:
        check_client_name(name, "roster name")
    assert str(refused.value) == f"roster name {name[:128]!r} {RULE}"


def test_a_client_config_checks_its_name_and_leaves_unset_to_the_command_line() -> None:
    assert ClientConfig(dataset="digits").name == ""
    with pytest.raises(pydantic.ValidationError, match=r"client name 'c1\\x00' must be 1-128"):
        ClientConfig(name="c1\x00", dataset="digits")


def test_a_token_for_a_name_no_client_could_bring_is_a_config_error() -> None:
    with pytest.raises(pydantic.ValidationError, match=r"tokens key 'c1\\x00' must be 1-128"):
        ServerConfig(tokens={"c1\x00": "a-secret"})
