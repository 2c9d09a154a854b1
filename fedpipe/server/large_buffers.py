"""Chunk-sized buffers go back to the operating system when freed.

The server receives each reply as chunk frames of a few MiB, each a fresh ``bytes`` object
freed once its chunk is on disk. glibc's malloc serves such blocks with ``mmap`` at first,
but raises its threshold to the size of the last one freed (up to 32 MiB): from then on the
frames come from the heap, whose freed memory the process keeps. A server receiving a large
model would keep about half a model of freed frames in its resident memory for good.
Fixing the threshold (``mallopt(M_MMAP_THRESHOLD)``, which also turns the adjustment off)
keeps every block of ``threshold`` bytes or more out of the heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["MMAP_THRESHOLD", "return_large_buffers"]

log = logging.getLogger(__name__)

#: Blocks of this many bytes or more are mapped on their own (chunks are 4 MiB by default).
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def return_large_buffers(threshold: int = MMAP_THRESHOLD) -> bool:
    """Make malloc map blocks of ``threshold`` bytes or more on their own, so that freeing one
    returns its memory at once. True where it took effect (glibc); elsewhere nothing changes."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    if not done:
        log.debug("mallopt(M_MMAP_THRESHOLD, %d) was refused", threshold)
    return done
