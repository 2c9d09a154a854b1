"""The one rule a client's name follows, wherever it comes from: a gRPC hello, a client's
config, a simulation's client list, a secure aggregation roster.

A name keys the client pool, the logs, ``clients.jsonl``, a Dask worker's tables and the
secure aggregation rosters; a control character (``"\\x00"`` included, which numpy's string
arrays drop at the end of a name) would make two of those disagree about who a client is.
"""

from __future__ import annotations

__all__ = ["MAX_NAME_LENGTH", "BadClientName", "check_client_name"]

MAX_NAME_LENGTH = 128


class BadClientName(ValueError):
    """A client name breaks the rule of :func:`check_client_name`; the message says which."""


def check_client_name(name: str, what: str = "client name") -> str:
    """``name`` when it is 1-128 printable characters (``str.isprintable``: no control
    characters, no line breaks).

    Raises
    ------
    BadClientName
        ``what``, the name (cut to 128 characters) and the rule.
    """
    if 0 < len(name) <= MAX_NAME_LENGTH and name.isprintable():
        return name
    raise BadClientName(
        f"{what} {name[:MAX_NAME_LENGTH]!r} must be 1-{MAX_NAME_LENGTH} printable characters "
        "(no control characters such as '\\x00' or line breaks)"
    )
