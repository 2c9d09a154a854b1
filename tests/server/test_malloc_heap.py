"""The server's malloc heap gives freed memory back to the operating system (glibc)."""

from __future__ import annotations

import platform
import sys
from typing import Any

import pytest

from fedpipe.server import malloc_heap
from fedpipe.server.malloc_heap import limit_arenas, release_free_heap

glibc = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@glibc
def test_freed_blocks_below_a_live_one_go_back_to_the_system() -> None:
    # 1000-byte blocks come from the heap (past Python's small-object allocator); the live
    # block above them keeps free() from trimming the heap's top by itself.
    blocks = [bytes(1000) for _ in range(120_000)]
    above = bytes(1000)
    before = _rss_mib()
    del blocks
    assert release_free_heap()
    assert _rss_mib() < before - 60  # of ~117 MiB freed
    del above


@glibc
def test_the_arena_cap_is_taken() -> None:
    assert limit_arenas(8)  # glibc's default on one core: no change to this test process


class _NotGlibc:
    """A C library with neither ``mallopt`` nor ``malloc_trim`` (macOS, musl)."""


def _no_library(name: object) -> object:
    raise OSError(f"{name}: cannot open shared object file")


def _windows(name: object) -> object:
    raise TypeError("LoadLibrary() argument 1 must be str, not None")  # find_library: None


@pytest.mark.parametrize("cdll", [lambda name: _NotGlibc(), _no_library, _windows])
def test_without_glibc_the_heap_keeps_mallocs_defaults(
    monkeypatch: pytest.MonkeyPatch, cdll: Any
) -> None:
    monkeypatch.setattr(malloc_heap.ctypes, "CDLL", cdll)
    malloc_heap._libc.cache_clear()
    try:
        assert limit_arenas() is False
        assert release_free_heap() is False
    finally:
        malloc_heap._libc.cache_clear()  # the real C library for the next caller
