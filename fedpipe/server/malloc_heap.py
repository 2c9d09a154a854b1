"""The server's malloc heap: few arenas, and freed memory back to the operating system
before the memory peaks.

The server streams every payload as chunk frames of a few MiB, allocated by gRPC's threads
and the session readers and freed once sent or written to disk. glibc gives each thread
that allocates at the same time as another an arena of its own (up to 8 per core) and keeps
freed blocks in the arena that held them, above a trim threshold that grows with the blocks
freed (up to 64 MiB an arena): after a round of transfers the server holds tens of chunks
of free memory that the next allocation of another arena cannot use. When the round loop
then allocates a model-sized array (the running sum of staged replies, which malloc maps on
its own) or the next round's transfers begin, that slack adds to the peak.

:func:`limit_arenas` caps the arenas (threads then share the freed blocks);
:func:`release_free_heap` returns the free pages of every arena (``malloc_trim(0)``), at the
cost of a walk of the free lists and the page faults of reusing them. Mapping chunk-sized
blocks on their own (a fixed ``M_MMAP_THRESHOLD``) returns them at each free instead, but
costs a map and its page faults per chunk: it doubled the server's CPU per round at 32
clients.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from typing import Any

__all__ = ["SERVER_ARENAS", "limit_arenas", "release_free_heap"]

log = logging.getLogger(__name__)

#: Arenas of the server process: its threads mostly wait on the event loop and sockets.
SERVER_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's malloc.h


def limit_arenas(count: int = SERVER_ARENAS) -> bool:
    """Let malloc create at most ``count`` arenas from now on (``MALLOC_ARENA_MAX``, which
    the environment may still set instead). True where it took effect (glibc)."""
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return bool(libc.mallopt(_M_ARENA_MAX, count))


def release_free_heap() -> bool:
    """Give the heap's free pages back to the operating system (glibc's ``malloc_trim``).
    True where memory was released; elsewhere (musl, macOS, Windows) nothing happens."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return bool(libc.malloc_trim(0))


@functools.cache
def _libc() -> Any:
    """glibc, or None where the C library has neither ``mallopt`` nor ``malloc_trim``."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim  # noqa: B018 (both exist: glibc)
    except (OSError, AttributeError, TypeError):
        log.debug("%s is not glibc: the server's heap keeps malloc's defaults", name)
        return None
    return libc
