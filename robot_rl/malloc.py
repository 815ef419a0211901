"""Process-wide allocator settings for the services (glibc on Linux; elsewhere nothing changes).

Each chunk of image transitions passes through buffers of about a megabyte that live for one message: ZeroMQ's
receive buffer, msgpack's bytes, the rebuilt next observations. With glibc's defaults such a buffer is mapped afresh
or its memory handed back to the kernel when freed (the heap is trimmed once its free top passes twice the dynamic
mmap threshold), so the next chunk faults in and zeroes the same amount of memory again: hundreds of page faults per
chunk, system time on the cores the learner shares with its writer threads and ZeroMQ's. `reuse_freed_memory` raises
the mmap threshold to glibc's maximum and the trim threshold above it, so buffers below 32 MB come from the heap and
freed ones are reused. Larger allocations (the replay buffer, weight snapshots) are still mapped on their own and
returned when freed; what the heap keeps beyond its live data is bounded by the trim threshold per arena.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger("robot_rl")

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 256 << 20


def reuse_freed_memory() -> bool:
    """Make glibc reuse freed buffers below 32 MB instead of unmapping them; True when the settings took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; a C library without these parameters (musl) returns 0 and changes nothing.
    applied = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not applied:
        log.debug("malloc settings not applied (not glibc)")
    return applied
