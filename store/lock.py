"""One writer per store: a lock object inside the store location (`writer_lock`).

A writer (``lenscache build``, later ``copy``) holds ``<store>/lenscache.lock`` for as long as it
writes. The lock is a small JSON record (who, where, which process, since when, last heartbeat)
created atomically, so that of two writers racing for it exactly one wins and the other fails at
once with `StoreLocked` naming the holder, before it has written anything or loaded a model:

- a local path: ``os.open(..., O_CREAT | O_EXCL)``;
- an fsspec URL: ``fs.open(path, "xb")``, an exclusive create. Assumption: the filesystem implements
  "xb" atomically. ``memory://`` does (one process), and so do object stores with conditional writes:
  s3fs from 2025.7.0 (a put with ``If-None-Match: *``; earlier releases wrote small files with "xb"
  as if "wb", fsspec/s3fs#974, so they are refused here), gcsfs and adlfs. s3fs is not a dependency
  of lenscache; the code only uses fsspec's file API. A filesystem that accepts "xb" but overwrites
  would not keep two writers apart: lenscache cannot detect that.

While held, a heartbeat thread rewrites the record every `HEARTBEAT_S` seconds (with a check that
the record is still this writer's), so a reader of the lock sees how recently its holder was alive.

A lock left by a killed writer is *stale*. Staleness is never guessed from time: on the same host
(same hostname, boot and pid namespace) the holder is gone when its pid no longer runs (or now
belongs to a process started at another time); on another host it cannot be known, so it is never
assumed. `clear_stale` (``--resume``, ``--overwrite``) clears only a lock whose holder is known to
be gone; `break_lock` (``--break-lock``) also takes over a lock whose holder cannot be checked (another
host, an unreadable record) and that the user knows is gone; a holder running on this host is never
taken over.

Clearing re-reads the record and deletes it only if it is still the one judged stale, then creates
a new one exclusively; between that re-read and the delete (microseconds) a third writer could slip
in, which the heartbeat and the release then notice (the record is no longer this writer's) and
report as a `StoreLocked` error instead of finishing silently.

Readers never take the lock: ``lenscache.reader`` and ``location.classify`` ignore the lock files.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import json
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import fsspec
import psutil

from . import location
from .errors import StoreError, StoreLocked

LOCK_NAME = location.LOCK_NAME
HEARTBEAT_S = 5.0
RECORD_VERSION = 1
# A record that exists but does not parse is most likely being written right now (the exclusive
# create and the write of its bytes are two steps locally): look again a few times before judging it.
UNREADABLE_RETRIES = 5
UNREADABLE_WAIT_S = 0.05


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (a container's uid): the uid still names the owner
        return f"uid{os.getuid()}" if hasattr(os, "getuid") else "unknown"


def _machine() -> str:
    """Boot id and pid namespace: two containers that share a hostname but not their pids differ here."""
    parts = []
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        return ""
    return "/".join(parts)


def _pid_started(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


def pid_running(pid: int, started: float | None = None) -> bool:
    """Whether process `pid` of this host runs (a zombie does not), and is the one started at `started`."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        # a pid reused by a later process is not the holder; create_time is stable within a boot
        return started is None or abs(proc.create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False
    except (psutil.AccessDenied, OSError):  # another user's process: it exists
        return True


def _ago(stamp: str) -> str:
    try:
        then = _dt.datetime.fromisoformat(stamp)
    except (TypeError, ValueError):
        return "at an unknown time"
    seconds = max(0, int((_dt.datetime.now(_dt.timezone.utc) - then).total_seconds()))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds / 3600:.1f} h ago"


@dataclass(frozen=True)
class LockRecord:
    """What a lock file says about its holder. `problem` is set (and the rest unknown) when it cannot be read."""

    owner: str = "?"
    host: str = "?"
    pid: int = 0
    token: str = ""
    started: str = ""
    heartbeat: str = ""
    command: str = ""
    machine: str = ""
    pid_started: float | None = None
    beats: int = 0
    version: int = RECORD_VERSION
    problem: str = field(default="", compare=False)

    @classmethod
    def mine(cls, command: str) -> LockRecord:
        now = _now()
        return cls(
            owner=_user(),
            host=socket.gethostname(),
            pid=os.getpid(),
            token=secrets.token_hex(16),
            started=now,
            heartbeat=now,
            command=command,
            machine=_machine(),
            pid_started=_pid_started(os.getpid()),
        )

    def to_bytes(self) -> bytes:
        raw = asdict(self)
        raw.pop("problem")
        return json.dumps(raw, indent=1).encode() + b"\n"

    @classmethod
    def parse(cls, raw: bytes) -> LockRecord:
        """The record in `raw`; one with `problem` set when it is not a lock record."""
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or not isinstance(doc.get("token"), str) or not doc["token"]:
                raise ValueError("no token")
            known = {k: doc[k] for k in cls.__dataclass_fields__ if k in doc and k != "problem"}
            rec = cls(**known)
            if not isinstance(rec.pid, int) or isinstance(rec.pid, bool):
                raise ValueError("no pid")
            return rec
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            return cls(problem=f"{len(raw)} bytes, not a lenscache lock record ({exc})")

    @property
    def holder(self) -> str:
        return f"{self.owner}@{self.host} pid {self.pid}"

    def on_this_host(self) -> bool:
        if self.problem or self.host != socket.gethostname():
            return False
        mine = _machine()
        return not (self.machine and mine) or self.machine == mine

    def running(self) -> bool | None:
        """True or False on this host; None where it cannot be known (another host, an unreadable record)."""
        if not self.on_this_host():
            return None
        return pid_running(self.pid, self.pid_started)

    def describe(self) -> str:
        if self.problem:
            return f"an unreadable lock record ({self.problem})"
        what = f" ({self.command})" if self.command else ""
        return (
            f"{self.holder}{what} since {self.started}, last heartbeat {self.heartbeat} ({_ago(self.heartbeat)})"
        )


# ---- the lock file: local path or fsspec URL --------------------------------------------------


class _LockFile:
    """Create-exclusively / read / replace / delete of the one lock file of a store location."""

    def __init__(self, url: str | os.PathLike):
        self.url = str(url)
        self.fs: fsspec.AbstractFileSystem | None = None
        if location.is_url(url):
            self.fs, root = location.url_fs(self.url)
            self.root = root.rstrip("/")
            self.path = f"{self.root}/{LOCK_NAME}"
            _check_exclusive_create(self.fs)
        else:
            self.local = Path(str(url).removeprefix("file://")).expanduser().resolve()
            self.path = str(self.local / LOCK_NAME)
        self.created_root = False

    def create(self, data: bytes) -> bool:
        """Write `data` as the lock file if there is none; False when one exists."""
        if self.fs is not None:
            try:
                with location.remote_access(self.url, "write"), self.fs.open(self.path, "xb") as f:
                    f.write(data)
            except FileExistsError:
                return False
            return True
        if not self.local.exists():
            self.local.mkdir(parents=True)
            self.created_root = True
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        except FileExistsError:
            return False
        try:
            _write_all(fd, data)
        except BaseException:
            os.close(fd)
            os.unlink(self.path)
            raise
        os.close(fd)
        return True

    def read(self) -> bytes | None:
        try:
            if self.fs is not None:
                return self.fs.cat_file(self.path)
            with open(self.path, "rb") as f:
                return f.read(1 << 16)
        except FileNotFoundError:
            return None

    def replace(self, data: bytes, token: str) -> None:
        if self.fs is not None:
            self.fs.pipe_file(self.path, data)  # one put: an object store never shows half a record
            return
        tmp = f"{self.path}.{token[:8]}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            _write_all(fd, data)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)  # a full disk: this beat is lost, the next one tries again
            raise
        os.close(fd)
        os.replace(tmp, self.path)  # readers see the old record or the new one, never a part

    def delete(self) -> None:
        try:
            if self.fs is not None:
                self.fs.rm_file(self.path)
            else:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        if self.created_root:  # a build that failed before writing leaves no empty directory behind
            try:
                self.local.rmdir()
            except OSError:
                pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _check_exclusive_create(fs: fsspec.AbstractFileSystem) -> None:
    """Refuse s3fs releases whose "xb" overwrites small files (see the module docstring)."""
    module = type(fs).__module__.split(".")[0]
    if module != "s3fs":
        return
    import s3fs

    try:
        year, month = (int(p) for p in s3fs.__version__.split(".")[:2])
    except ValueError:
        return
    if (year, month) < (2025, 7):
        raise StoreError(
            f"s3fs {s3fs.__version__} cannot create a file exclusively (mode 'xb'), which the writer lock "
            "needs; install s3fs 2025.7.0 or later"
        )


# ---- the lock ----------------------------------------------------------------------------------


def read_lock(url: str | os.PathLike) -> LockRecord | None:
    """The lock record at `url`, or None when no writer holds (or left) a lock there."""
    if location.is_url(url):
        fs, root = location.url_fs(url)
        try:
            with location.remote_access(url):
                raw = fs.cat_file(f"{root.rstrip('/')}/{LOCK_NAME}")
        except (FileNotFoundError, NotADirectoryError):
            return None
    else:
        root = location.local_root(url)
        if root is None or not root.is_dir():
            return None
        raw = location.read_member(root, LOCK_NAME)  # never through a link, never a FIFO, size capped
        if raw is None:
            return None
    return LockRecord.parse(raw)


def _refusal(url: str, rec: LockRecord) -> str:
    if rec.problem:
        return (
            f"{url} holds a writer lock ({LOCK_NAME}) that cannot be read: {rec.describe()}; if no other "
            "writer is running, pass break_lock (--break-lock) to take it over"
        )
    running = rec.running()
    if running:
        return (
            f"{url} is being written by {rec.describe()}; one writer per store: wait for it to finish "
            "(a writer that runs on this host is never taken over, not even with --break-lock)"
        )
    if running is False:
        return (
            f"{url} has a stale writer lock left by {rec.describe()}, which no longer runs; pass "
            "--resume to continue its build or --overwrite to replace it (either clears the lock)"
        )
    return (
        f"{url} is locked by {rec.describe()}, on another host; lenscache cannot check whether that process "
        "still runs: if it is gone, pass break_lock (--break-lock) to take the lock over"
    )


class WriterLock:
    """The writer lock of one store location; a context manager (see `writer_lock`)."""

    def __init__(
        self,
        url: str | os.PathLike,
        *,
        command: str,
        clear_stale: bool = False,
        break_lock: bool = False,
        heartbeat_s: float = HEARTBEAT_S,
    ):
        self.url = str(url)
        self.command = command
        self.clear_stale = clear_stale
        self.break_lock = break_lock
        self.heartbeat_s = heartbeat_s
        self.record = LockRecord.mine(command)
        self.held = False
        self.lost: LockRecord | None = None  # what replaced this writer's record, once noticed
        self.taken_over: LockRecord | None = None  # the stale or broken lock this one replaced
        self._file = _LockFile(url)
        self._io = threading.Lock()  # the heartbeat thread and release never write at once
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- acquire / release
    def acquire(self) -> WriterLock:
        """Take the lock or raise `StoreLocked` naming its holder; starts the heartbeat thread."""
        for _ in range(8):  # each round ends with a create attempt; losing a race means another round
            if self._file.create(self.record.to_bytes()):
                self.held = True
                self._start_heartbeat()
                return self
            raw, current = self._current()
            if current is None:  # released between our attempt and our look
                continue
            running = current.running()
            # a holder known to run here is never taken over, not even with break_lock
            takeover = running is False and (self.clear_stale or self.break_lock)
            if not (takeover or (running is None and self.break_lock)):
                raise StoreLocked(_refusal(self.url, current))
            if self._file.read() == raw:  # still the record judged stale or broken
                self._file.delete()
                self.taken_over = current
        raise StoreLocked(f"{self.url}: the writer lock changed hands repeatedly while this {self.command} waited")

    def _current(self) -> tuple[bytes | None, LockRecord | None]:
        raw = self._file.read()
        for _ in range(UNREADABLE_RETRIES):
            if raw is None or not LockRecord.parse(raw).problem:
                break
            time.sleep(UNREADABLE_WAIT_S)
            raw = self._file.read()
        return raw, None if raw is None else LockRecord.parse(raw)

    def release(self) -> None:
        """Stop the heartbeat and delete the lock, if it is still this writer's (else record `lost`)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._io:
            if not self.held:
                return
            self.held = False
            if self._still_mine():
                self._file.delete()

    def _still_mine(self) -> bool:
        raw = self._file.read()
        current = None if raw is None else LockRecord.parse(raw)
        if current is not None and current.token == self.record.token:
            return True
        self.lost = current or LockRecord(problem="the lock file was removed")
        return False

    # -- heartbeat
    def heartbeat(self) -> bool:
        """Rewrite the record with a fresh heartbeat; False (and `lost` set) once it is not this writer's."""
        with self._io:
            if not self.held or self.lost is not None or not self._still_mine():
                return False
            record = replace(self.record, heartbeat=_now(), beats=self.record.beats + 1)
            self._file.replace(record.to_bytes(), record.token)
            self.record = record
            return True

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="lenscache-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.heartbeat():
                    return
            except Exception:  # a transient storage error: the next beat tries again
                continue

    # -- context manager
    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.release()
        if self.lost is not None and exc_type is None:
            raise StoreLocked(
                f"the writer lock of {self.url} was removed or taken over while this {self.command} ran "
                f"(now: {self.lost.describe()}); another writer may have written into the store: run "
                "`lenscache verify` before trusting it"
            )


def writer_lock(
    url: str | os.PathLike,
    *,
    command: str,
    clear_stale: bool = False,
    break_lock: bool = False,
    heartbeat_s: float = HEARTBEAT_S,
) -> WriterLock:
    """``with writer_lock(url, command="build"): ...`` holds the store's writer lock for the block.

    clear_stale: take over a lock whose holder ran on this host and no longer runs (--resume, --overwrite).
    break_lock: also take over a lock whose holder cannot be checked (--break-lock; another host)."""
    return WriterLock(url, command=command, clear_stale=clear_stale, break_lock=break_lock, heartbeat_s=heartbeat_s)


# ---- what info and verify say -------------------------------------------------------------------


def lock_note(url: str | os.PathLike) -> str | None:
    """One line on the lock at `url` for ``lenscache info``; None when there is none."""
    rec = read_lock(url)
    if rec is None:
        return None
    running = rec.running()
    if rec.problem:
        return f"locked: {rec.describe()}"
    if running:
        return f"being written by {rec.describe()}"
    if running is False:
        return f"stale writer lock left by {rec.describe()} (pid {rec.pid} no longer runs)"
    return f"being written by {rec.describe()}, on another host (lenscache cannot check that it still runs)"


def stale_lock_problem(url: str | os.PathLike) -> str | None:
    """A problem line for ``lenscache verify`` when the lock at `url` was left by a writer that is gone."""
    rec = read_lock(url)
    if rec is None or rec.running() is not False:
        return None
    return (
        f"stale writer lock left by {rec.describe()} (pid {rec.pid} no longer runs); "
        f"`lenscache {rec.command or 'build'} … --resume` clears it"
    )
