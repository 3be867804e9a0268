"""A local zarr store that writes large chunks around the page cache (O_DIRECT), where it can.

A build writes every chunk once and reads none of them back. Buffered writes copy each chunk into
fresh page-cache pages, and on a VM those pages are expensive: writing new files runs at about
600 MB/s of kernel time here, 0.17 core-seconds per 4,096-token row of SmolLM2, which the
forward pass pays for when the build runs on every core. Written with O_DIRECT, the same 103 MB
take 0.01 core-seconds (the disk's DMA does the copy) and 0.06 s of wall time.

Each large value is copied into a page-aligned buffer (one per thread, reused), written with
O_DIRECT up to its last whole 4 KiB block, and finished with a buffered write of the tail; like
zarr's LocalStore, it is written to a temporary file that then replaces the chunk, so a reader
never sees half a chunk. Small values, and filesystems that refuse O_DIRECT (tmpfs, some network
filesystems), go through LocalStore's own writes.

A direct write returns when the device has the data, so on a slow device (a disk, a throttled
cloud volume) it would stall the build where the page cache lets the kernel write back during the
next forward pass. The store therefore times its first `PROBE_WRITES` direct writes and goes back
to buffered writes for good if they ran below `MIN_DIRECT_BYTES_PER_S` each.
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import threading
import time
import uuid
from pathlib import Path

from zarr.abc.store import Store
from zarr.core.buffer import Buffer
from zarr.storage import LocalStore

from .faults import fault_point

ALIGN = 4096  # O_DIRECT's alignment of memory, offsets and lengths on common devices
MIN_DIRECT_BYTES = 1 << 20  # below this the page cache costs little and O_DIRECT's round trip more
PROBE_WRITES = 8
# Per write, with the build's compressing threads writing at once (this VM's disk: 0.53-0.58 GB/s
# over a build's first 8 writes, 0.85 GB/s median over a build, 1.7 GB/s alone). Below it, keeping
# the disk's time out of the build's critical path is worth more than the page-cache copy saved.
MIN_DIRECT_BYTES_PER_S = 250e6
try:
    import fcntl

    _O_DIRECT = getattr(os, "O_DIRECT", 0)
except ImportError:  # not a POSIX system: LocalStore's own writes
    _O_DIRECT = 0


class DirectLocalStore(LocalStore):
    """LocalStore whose writes of `MIN_DIRECT_BYTES` or more skip the page cache where the filesystem allows."""

    def __init__(self, root: Path | str, *, read_only: bool = False) -> None:
        super().__init__(root, read_only=read_only)
        # cleared the first time the filesystem refuses O_DIRECT, or when the device is slow
        self.direct = bool(_O_DIRECT)
        self._probed_writes, self._probed_bytes, self._probed_seconds = 0, 0, 0.0
        self._unsynced: set[Path] = set()  # files written since the last `sync`
        self._unsynced_lock = threading.Lock()

    async def set(self, key: str, value: Buffer) -> None:
        path = self.root / key
        if not self.direct or len(value) < MIN_DIRECT_BYTES:
            await super().set(key, value)
        else:
            if not self._is_open:
                await self._open()
            self._check_writable()
            if not await asyncio.to_thread(self._put_direct, path, value):
                await super().set(key, value)
        with self._unsynced_lock:
            self._unsynced.add(path)

    def sync(self) -> int:
        """fsync every file written since the last call, then the directories that hold them (their
        renames), so that what was written survives an OS crash or power loss. Returns the files synced."""
        with self._unsynced_lock:
            paths, self._unsynced = self._unsynced, set()
        for path in sorted(paths):
            _fsync(path, os.O_RDONLY)
        # a chunk's directories may be new too: each one's entry lives in its parent, up to the root
        folders = {folder for p in paths for folder in p.parents if folder == self.root or self.root in folder.parents}
        for folder in sorted(folders, reverse=True):
            _fsync(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        return len(paths)

    def _put_direct(self, path: Path, value: Buffer) -> bool:
        """Write `value` to `path` through a temporary file; False if the filesystem refuses O_DIRECT."""
        data = memoryview(value.as_buffer_like()).cast("B")
        whole = len(data) - len(data) % ALIGN
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{uuid.uuid4().hex}.partial")  # as zarr's LocalStore names them
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | _O_DIRECT, 0o666)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.direct = False
            return False
        try:
            try:
                t0 = time.perf_counter()
                written = _write_direct(fd, data, whole, _aligned(whole))
                if written:
                    self._timed(len(data), time.perf_counter() - t0)
            finally:
                os.close(fd)
            if written:
                fault_point("mid-chunk")  # the chunk is whole in its temporary file, not renamed
                os.replace(tmp, path)
            else:
                self.direct = False
                tmp.unlink()
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return written

    def _timed(self, nbytes: int, seconds: float) -> None:
        """Count a direct write towards the probe; after the last one, keep O_DIRECT only if fast."""
        if self._probed_writes >= PROBE_WRITES:
            return
        self._probed_writes += 1
        self._probed_bytes += nbytes
        self._probed_seconds += seconds
        if (
            self._probed_writes == PROBE_WRITES
            and self._probed_bytes < MIN_DIRECT_BYTES_PER_S * self._probed_seconds
        ):
            self.direct = False


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_BUFFERS = threading.local()


def _aligned(size: int) -> mmap.mmap:
    """This thread's page-aligned buffer (reused, so its pages are already mapped), grown to `size` bytes."""
    buf = getattr(_BUFFERS, "buf", None)
    if buf is None or len(buf) < size:
        buf = _BUFFERS.buf = mmap.mmap(-1, max(size, ALIGN))
    return buf


def _write_direct(fd: int, data: memoryview, whole: int, buf: mmap.mmap) -> bool:
    """`data`'s first `whole` bytes through the aligned `buf` with O_DIRECT, then the rest buffered.

    False if the device refuses the direct write (another alignment): nothing useful was written.
    """
    buf[:whole] = data[:whole]
    try:
        _write_all(fd, memoryview(buf)[:whole])
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
    _write_all(fd, data[whole:])
    return True


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


def direct_writes(store: Store) -> Store:
    """`store` as a DirectLocalStore when it is a writable LocalStore; any other store as it is."""
    if type(store) is LocalStore and not store.read_only:
        return DirectLocalStore(store.root)
    return store
