"""Keep freed memory inside the process on Linux with glibc (CPU evaluation shards).

An attack allocates the same activation-sized blocks at every iteration. glibc gives large freed blocks
back to the kernel (heaps of the per-thread arenas that CPU shards run in shrink once their free top
exceeds the trim threshold), so the next iteration faults the same pages in afresh, zeroed by the kernel.
On the 2-core machine AutoAttack on 200 digits images took 0.9-1.8 million page faults with the defaults
and about 0.1 million with the thresholds raised: ~8% of its time (`benchmarks/eval_speed.py`). The cost
is that resident memory stays at its peak instead of shrinking between iterations.

Nothing is changed where the user has chosen: an allocator preloaded with LD_PRELOAD (jemalloc, tcmalloc,
mimalloc), glibc thresholds set through MALLOC_*_ environment variables, or a C library without mallopt.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds, once per process; True if they are raised."""
    if not sys.platform.startswith("linux") or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return False
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
