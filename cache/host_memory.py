"""Process-wide host memory settings for long builds on CPU.

A CPU forward pass allocates and frees the same large tensors every batch (805 MB of logits per
4,096 SmolLM2 tokens, tens of MB per layer). glibc's malloc serves blocks above its mmap threshold
with fresh mappings and returns freed heap tops to the kernel, so each batch touches those pages
anew: about a million page faults and several seconds of kernel time per 16,384 tokens, more while
a build holds activations for its writer. Raising the mmap and trim thresholds keeps freed memory
in the process for the next batch. The cost is that the process keeps its peak heap until it ends,
which suits a build process but not, say, a notebook: `lenscache build` applies this, the Python
API leaves it to the caller.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap and are reused
TRIM_THRESHOLD = 2**31 - 1  # mallopt's largest (an int): keep up to 2 GiB of free heap top


def keep_freed_memory() -> bool:
    """Make this process reuse freed memory instead of returning it to the kernel (glibc only).

    Irreversible for the process. Returns True when applied, False where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
