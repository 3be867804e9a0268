"""keep_freed_memory: a freed large block stays with the process for the next allocation."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

FREE_A_BLOCK = """
import os, sys
import numpy as np
from lenscache.cache.host_memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
x = np.ones(25_000_000)  # 200 MB: above glibc's largest dynamic mmap threshold (32 MiB)
held = rss()
del x
print(applied, held - rss())
"""


def _returned_on_free(mode: str) -> tuple[bool, int]:
    out = subprocess.run(
        [sys.executable, "-c", FREE_A_BLOCK, mode], capture_output=True, text=True, check=True
    )
    applied, returned = out.stdout.split()
    return applied == "True", int(returned)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_memory_stays_with_the_process():
    applied, kept = _returned_on_free("keep")
    _, default = _returned_on_free("default")
    assert applied
    assert default > 150e6  # glibc unmaps the block on free: it is faulted in again next time
    assert kept < 10e6
