"""Keep freed memory in the process's heap, so that each layer's large tensors reuse it.

glibc serves an allocation above its mmap threshold (32 MB at most) from a fresh mapping and
unmaps it when it is freed, so every layer of a long prefill page-faults in and zeroes new pages
for its gate, SiLU and projections again, on both sides of the split (docs/latency.md, "Freed
memory"). Serving every allocation from the heap and never trimming it removes that; the price
is a process that keeps the memory of its peak, which a server and a TEE reach again at once.
"""

from __future__ import annotations

import ctypes

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 256 << 20))


def keep_freed_memory() -> bool:
    """Whether the C library took the settings (glibc does; elsewhere nothing changes). A heap
    that cannot grow falls back to mappings by itself, which glibc allows even with mmap off."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all([mallopt(param, value) == 1 for param, value in SETTINGS])  # a list: every one is set
