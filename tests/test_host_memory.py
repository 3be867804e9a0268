"""keep_freed_memory: after it, a freed large block is reused instead of faulted in afresh."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

REALLOCATE = """
import resource, sys
import numpy as np
from lenscache.cache.host_memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
x = np.ones(25_000_000)  # 200 MB: above glibc's largest dynamic mmap threshold (32 MiB)
del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = np.ones(25_000_000)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", REALLOCATE, mode], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    applied, kept = _faults("keep")
    _, default = _faults("default")
    assert applied
    assert default > 40_000  # 200 MB of fresh 4 KiB pages
    assert kept < default / 10
