"""The CLI's heap settings: memory freed by one layer is reused by the next without faulting
fresh pages in (tsqp.heap)."""

import subprocess
import sys

import pytest

PROBE = """
import ctypes, resource, sys
from tsqp.heap import keep_freed_memory
if not keep_freed_memory():
    sys.exit("mallopt refused")
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
size = int(sys.argv[1]) << 20
block = libc.malloc(size); libc.memset(block, 1, size); libc.free(block)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc(size); libc.memset(block, 1, size); libc.free(block)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(megabytes: int) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, str(megabytes)], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("megabytes", [48, 96])
def test_a_freed_block_above_the_mmap_threshold_is_reused_without_page_faults(megabytes):
    """By default glibc maps such a block afresh each time and faults in every page again."""
    assert page_faults(megabytes) < (megabytes << 8) // 20  # 4 KiB pages
