"""Process-wide allocator settings for the services (glibc on Linux; elsewhere nothing changes).

Messages pass through buffers that live for one message: for a chunk of image transitions ZeroMQ's receive buffer,
msgpack's bytes and the rebuilt next observations (about a megabyte each), for a weights broadcast one frame per
tensor (up to tens of megabytes). With glibc's defaults such a block is mapped afresh and unmapped when freed, or
handed back to the kernel when the heap is trimmed (once its free top passes twice the dynamic mmap threshold), so
the next message faults in and zeroes the same memory again, page by page: hundreds of page faults per chunk, and
about as much time as the transfer itself for a weights broadcast. `reuse_freed_memory` raises the mmap threshold
(and the trim threshold above it) so that such blocks stay in the heap and the next message reuses them. Larger
allocations (the replay buffer) are still mapped on their own; what a heap keeps beyond its live data is bounded by
the trim threshold.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
HEAP_BUFFERS_UP_TO = 256 << 20  # blocks up to this size come from the heap (an image agent's largest tensor: 42 MB)
GLIBC_MMAP_THRESHOLD_MAX = 32 << 20  # the largest value glibc documents (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit)


def reuse_freed_memory() -> bool:
    """Let this process's malloc keep and reuse freed blocks of up to 256 MB (32 MB where glibc refuses more) instead
    of unmapping them; True when the settings took effect. Process-wide: each service's entry point calls it once."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; a C library without these parameters (musl) returns 0 and changes nothing.
    for threshold in (HEAP_BUFFERS_UP_TO, GLIBC_MMAP_THRESHOLD_MAX):
        if mallopt(M_MMAP_THRESHOLD, threshold) == 1:
            return mallopt(M_TRIM_THRESHOLD, 2 * threshold) == 1
    return False
