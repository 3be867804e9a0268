"""Fault injection for crash tests: a build SIGKILLs itself at a named point of its write protocol.

Set ``LENSCACHE_CRASH_AT=POINT`` or ``POINT:N`` and the process kills itself with SIGKILL (no
cleanup, no atexit, no flush: as ``kill -9`` or a power loss would) when it reaches that point,
after printing one line naming it on stderr. The points, in the order a fresh build meets them:

- ``group-created``: the root group exists, its lenscache metadata not yet.
- ``after-init``: metadata says 'initializing'; no array yet.
- ``after-layout``: every array created, empty; the tokenizer and the head not yet written.
- ``head-written``: the tokenizer and the head written; the token ids not yet.
- ``tokens-written``: the token ids written; metadata still says 'initializing'.
- ``after-chunk:N``: the N-th chunk this process wrote through the row writer (cache/chunk_writer.py)
  is on disk; its row is not committed.
- ``mid-chunk:N``: the N-th O_DIRECT chunk (chunks of 1 MiB and more into a local directory) is in
  its temporary file, not yet renamed over the chunk (cache/direct_store.py).
- ``before-commit:N``: every chunk of the sequences before N is written; the committed count
  does not say N yet.
- ``after-commit:N``: metadata says N sequences are committed (0: the layout is finished and
  the build about to start its rows; the last N: the store is complete).

N counts from 1 for the chunk points (this process's writes, so a resumed build counts afresh)
and is a committed count for the commit points. The variable is read once, when this module is
first imported; a value that names no point raises `CrashPointError` there, before a model loads.
With the variable unset, `fault_point` returns at once (tens of nanoseconds per call).
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass

from lenscache.errors import LensCacheError

ENV = "LENSCACHE_CRASH_AT"

# point -> what its N means: None (no N), "count" (the N-th call, from 1), "value" (the caller's index)
POINTS: dict[str, str | None] = {
    "group-created": None,
    "after-init": None,
    "after-layout": None,
    "head-written": None,
    "tokens-written": None,
    "after-chunk": "count",
    "mid-chunk": "count",
    "before-commit": "value",
    "after-commit": "value",
}


class CrashPointError(LensCacheError):
    """The value of LENSCACHE_CRASH_AT names no crash point."""


@dataclass(frozen=True)
class CrashPoint:
    name: str
    index: int | None = None

    def __str__(self) -> str:
        return self.name if self.index is None else f"{self.name}:{self.index}"


def parse(text: str) -> CrashPoint:
    """'POINT' or 'POINT:N' as a CrashPoint; CrashPointError naming the problem otherwise."""
    name, sep, raw = text.strip().partition(":")
    where = f"{ENV}={text!r}"
    if name not in POINTS:
        raise CrashPointError(f"{where}: unknown crash point {name!r}; the points are {', '.join(POINTS)}")
    kind = POINTS[name]
    if kind is None:
        if sep:
            raise CrashPointError(f"{where}: the point {name!r} takes no ':N'")
        return CrashPoint(name)
    if not sep:
        raise CrashPointError(f"{where}: the point {name!r} needs a number, as in '{name}:3'")
    try:
        index = int(raw)
    except ValueError:
        raise CrashPointError(f"{where}: {raw!r} is not a whole number") from None
    low = 1 if kind == "count" else 0
    if index < low:
        raise CrashPointError(f"{where}: the number must be at least {low} for {name!r}")
    return CrashPoint(name, index)


def armed() -> CrashPoint | None:
    """The crash point this process will stop at, if any."""
    return _TARGET


def fault_point(name: str, index: int | None = None) -> None:
    """Reached the point `name` (with the caller's `index` for the commit points): die here if armed."""
    if _TARGET is None:  # the common case: one global load and one comparison
        return
    _reached(name, index)


_TARGET: CrashPoint | None = parse(os.environ[ENV]) if os.environ.get(ENV, "").strip() else None
_counts: dict[str, int] = {}
_lock = threading.Lock()  # chunk points are reached from several writer threads at once


def _reached(name: str, index: int | None) -> None:
    assert name in POINTS, name  # a typo at a call site would otherwise never fire
    target = _TARGET
    if target is None or name != target.name:
        return
    if POINTS[name] == "count":
        with _lock:
            _counts[name] = index = _counts.get(name, 0) + 1
    if index != target.index:
        return
    os.write(2, f"lenscache: {ENV}: killing this process (SIGKILL) at {target}\n".encode())
    os.kill(os.getpid(), signal.SIGKILL)
