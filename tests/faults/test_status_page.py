"""The status page of a real ``fedpipe server`` under hostile requests while a federation runs:
each gets its status code quickly, the page still serves, the rounds go on."""

from __future__ import annotations

import select
import socket
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.faults.monitored_federation import (
    CLIENTS,
    STATUS_TOKEN,
    assert_stopped,
    start_monitored_federation,
)

pytest.importorskip("prometheus_client", reason="fedpipe[prometheus]: /metrics counts them")

BEARER = f"Authorization: Bearer {STATUS_TOKEN}"
#: The status page's request timeout in these tests (the server's hello_timeout).
REQUEST_TIMEOUT = 3.0
#: "Quickly" on a loaded two-core machine: a refused request does not wait for any timeout.
QUICK = 5.0


def get(path: str, *headers: str) -> bytes:
    return "\r\n".join([f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""]).encode()


#: name -> (bytes sent, seconds between bytes (0: all at once), status expected)
ATTACKS: dict[str, tuple[bytes, float, int]] = {
    "no-token": (get("/"), 0, 401),
    "no-token-api": (get("/api/status"), 0, 401),
    "wrong-bearer": (get("/", "Authorization: Bearer guess"), 0, 401),
    "wrong-query": (get("/?token=guess"), 0, 401),
    "huge-header": (get("/", "X-Big: " + "a" * 200_000), 0, 431),
    "huge-line": (get("/" + "a" * 200_000), 0, 414),
    "many-headers": (get("/", *[f"X-{i}: {i}" for i in range(500)]), 0, 431),
    "traversal": (get("/../../../../etc/passwd", BEARER), 0, 404),
    "traversal-encoded": (get("/%2e%2e/%2e%2e/%2e%2e/etc/passwd", BEARER), 0, 404),
    "traversal-static": (get("/static/../../../pyproject.toml", BEARER), 0, 404),
    "post": (b"POST /api/status HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", 0, 405),
    "garbage": (bytes(range(1, 256)) + b"\r\n\r\n", 0, 400),
    "slow-loris": (get("/", BEARER), 0.25, 408),
    "silent": (b"", 0, 408),
}


def attack(port: int, raw: bytes, pace: float) -> tuple[int, float, bytes]:
    """Send ``raw`` on a fresh connection (a byte per ``pace`` seconds if set) until the
    server answers; the status code, the seconds it took and the body."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            if pace:
                for byte in raw:
                    sock.sendall(bytes([byte]))
                    if select.select([sock], [], [], pace)[0]:
                        break  # answered (or closed) before the request was whole
            else:
                sock.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while the request was still coming
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
    return status, time.monotonic() - started, body


def test_hostile_requests_get_their_status_quickly_and_the_federation_goes_on(
    tmp_path: Path, client_data: list[Path], procs: list[subprocess.Popen[str]]
) -> None:
    fed = start_monitored_federation(tmp_path, client_data, procs, hello_timeout=REQUEST_TIMEOUT)
    before = fed.records()[-1]["round"]
    with ThreadPoolExecutor(len(ATTACKS)) as pool:  # all at once, as a scanner would
        futures = {
            name: pool.submit(attack, fed.status_port, raw, pace)
            for name, (raw, pace, _) in ATTACKS.items()
        }
        answers = {name: future.result(timeout=60) for name, future in futures.items()}

    wrong = {n: (a[0], round(a[1], 2)) for n, a in answers.items() if a[0] != ATTACKS[n][2]}
    assert not wrong, f"unexpected status codes: {wrong}"
    for name, (status, seconds, body) in answers.items():
        if status == 408:  # a request that never completes waits for the timeout, no more
            assert REQUEST_TIMEOUT - 0.5 <= seconds < REQUEST_TIMEOUT + QUICK, name
        else:
            assert seconds < QUICK, (name, seconds)
        assert b"root:" not in body and b"[project]" not in body, name
        assert STATUS_TOKEN.encode() not in body, name

    # The page serves on, the rounds went on, and nothing of it reached the clients.
    status = fed.status()
    assert [c["name"] for c in status["clients"]] == sorted(CLIENTS)
    assert status["status"] == "running"
    records = fed.wait_for_round(before + 5)
    assert records[-1]["clients"] == sorted(CLIENTS)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(fed.url + "api/status", timeout=10)
    assert refused.value.code == 401

    metrics = urllib.request.urlopen(f"http://127.0.0.1:{fed.metrics_port}/metrics", timeout=10)
    text = metrics.read().decode()
    assert 'fedpipe_failed_authentications_total{service="status"} 2.0' in text  # the guesses
    assert 'fedpipe_failed_authentications_total{service="grpc"} 0.0' in text

    log = (tmp_path / "server.log").read_text()
    assert "status page: refused 127.0.0.1" in log and "wrong status token" in log
    assert "sent no full request in 3.0s" in log
    assert "Traceback" not in log
    assert_stopped(fed, fed.stop())
