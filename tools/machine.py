"""What machine a benchmark ran on, as a JSON-able dict (every benchmark's ``"machine"`` entry).

Benchmark figures are only comparable between runs on like machines; the CPU model, core counts,
memory and library versions say whether two runs were.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch


def _cpuinfo() -> tuple[str | None, int | None]:
    """CPU model name and physical core count from /proc/cpuinfo (Linux); (None, None) elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, None
    model, cores, phys, core = None, set(), None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name" and model is None:
            model = value
        elif key == "physical id":
            phys = value
        elif key == "core id":
            core = value
        elif not key:  # a blank line ends one logical CPU's block
            if core is not None:
                cores.add((phys, core))
            phys, core = None, None
    if core is not None:
        cores.add((phys, core))
    return model, (len(cores) or None)


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _physical_cores() -> int | None:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except Exception:  # psutil may be missing or unable to tell on this platform
        return None


def describe_machine() -> dict[str, Any]:
    """CPU, cores, RAM, OS, Python, torch (version, threads) and CUDA GPUs of this process's machine."""
    model, physical = _cpuinfo()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    ram = _ram_bytes()
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    return {
        "cpu_model": model or platform.processor() or platform.machine(),
        "logical_cores": os.cpu_count(),
        "physical_cores": physical or _physical_cores(),
        "cores_available": affinity,  # this process's affinity mask, what the benchmark could use
        "ram_gib": round(ram / 2**30, 1) if ram else None,
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpus": gpus,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(describe_machine(), indent=2))
