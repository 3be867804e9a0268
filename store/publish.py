"""Output directories that appear whole or not at all.

Every command that writes a results directory (a basis, a report, linrep or anomaly results) builds it
under a hidden sibling name and renames it into place when complete, so ``out`` is only ever absent,
the old output, or the new one; a run that fails leaves the old output as it was.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def sibling(out: Path, tag: str) -> Path:
    """A fresh hidden name beside `out` (unique per call, so concurrent runs do not share one)."""
    return out.with_name(f".{out.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def replace_dir(work: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Rename the finished directory `work` to `out`, replacing an old `out` only once the new one is whole."""
    work, out = Path(work), Path(out)
    old = sibling(out, "old")
    if out.exists():
        os.replace(out, old)
    os.replace(work, out)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    elif old.exists():
        old.unlink()
    return out


def publish_dir(out: str | os.PathLike, write: Callable[[Path], T]) -> T:
    """Run ``write(tmp)`` in a new directory beside `out`, then rename it to `out`; returns what it returned.

    The directory is made with the process's umask (not ``mkdtemp``'s 0700), so `out` gets the mode
    any directory made here would. If `write` raises, the partial directory is removed and `out` is
    untouched.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling(out, "tmp")
    tmp.mkdir()
    try:
        result = write(tmp)
        replace_dir(tmp, out)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
