"""Where a store lives: a local path or any fsspec URL (``memory://``, ``s3://``, ``gs://`` …).

A local store someone else wrote may hold symbolic links (a chunk that points at a file elsewhere on
the reader's machine) or special files (a FIFO that blocks a read forever). Readers refuse both:
`check_local_tree` walks the store once when it is opened, and `SafeLocalStore` opens every member
one path component at a time without following links, so a link swapped in later is refused too.
No byte behind a link is ever read.

An fsspec URL takes its options (credentials, endpoint) from the environment and fsspec's own
configuration, never from lenscache: for ``s3://`` (s3fs, ``pip install 'lenscache[s3]'``) the
standard AWS variables (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` or ``AWS_PROFILE``,
``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` for an S3-compatible service) or fsspec's
``FSSPEC_S3_*`` variables / config files. A refusal by the service becomes a `StoreError` naming the
location (`remote_access`), as does a bucket that does not exist (`classify`).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import FsspecStore, LocalStore

from .errors import StoreError

# zarr.json documents of lenscache stores are a few KiB; a bigger one is not read into memory.
METADATA_MAX_BYTES = 16 << 20
# The writer lock (lenscache.lock) and its heartbeat's temporary files: not part of the store.
LOCK_NAME = "lenscache.lock"


def is_lock_member(name: str) -> bool:
    """Whether `name` (a member at the store's root) is the writer lock or one of its temporary files."""
    return name == LOCK_NAME or name.startswith(LOCK_NAME + ".")


def is_url(location: str | os.PathLike) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def _local_path(location: str | os.PathLike) -> Path:
    return Path(str(location).removeprefix("file://")).expanduser()


def local_root(location: str | os.PathLike) -> Path | None:
    """The resolved directory of a local store (the root may be a link the user made); None for a URL."""
    return None if is_url(location) else _local_path(location).resolve()


def zarr_store(location: str | os.PathLike, *, read_only: bool) -> Store:
    """A zarr store object for `location`; fsspec options come from fsspec's own configuration."""
    if is_url(location):
        return FsspecStore.from_url(str(location), read_only=read_only)
    path = _local_path(location)
    if read_only and not path.exists():
        raise StoreError(f"no store at {path}: the path does not exist")
    if read_only:
        # the root itself may be a link the user made; nothing below it may be
        return SafeLocalStore(path.resolve(), read_only=True)
    return LocalStore(path, read_only=read_only)


def url_fs(url: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec's filesystem and path for `url`; a protocol whose package is missing is a StoreError."""
    try:
        return fsspec.core.url_to_fs(str(url))
    except ImportError as exc:  # fsspec's message names the package (s3fs for s3://: lenscache[s3])
        raise StoreError(f"{url}: {exc}") from None


def _fs(location: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    if is_url(location):
        return url_fs(location)
    return fsspec.filesystem("file"), str(_local_path(location).resolve())


# What to set when an object store refuses access (named in the errors below).
CREDENTIALS_HINT = (
    "check the credentials (for s3://: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) and the "
    "endpoint (AWS_ENDPOINT_URL for an S3-compatible service)"
)


@contextmanager
def remote_access(location: str | os.PathLike, action: str = "read") -> Iterator[None]:
    """Turn an object store's refusal (wrong credentials, a read-only identity), or a service that cannot be
    reached at all, into a StoreError naming the location; local paths keep their own OSError (which
    names the file)."""
    try:
        yield
    except PermissionError as exc:
        if not is_url(location):
            raise
        if action == "write":
            raise StoreError(
                f"{location}: the storage service does not let these credentials write there ({exc}); "
                f"read-only credentials can read stores but not write them; {CREDENTIALS_HINT}"
            ) from None
        raise StoreError(f"{location}: the storage service refused access ({exc}); {CREDENTIALS_HINT}") from None
    except Exception as exc:
        if not is_url(location) or not _unreachable(exc):
            raise
        raise StoreError(
            f"{location}: cannot reach the storage service ({exc}); check the endpoint (AWS_ENDPOINT_URL for an "
            "S3-compatible service) and the network"
        ) from None


def _unreachable(exc: BaseException) -> bool:
    """Whether `exc` says that no connection to the service could be made (refused, timed out, reset);
    botocore's own ConnectionError is no OSError, so it is named here (when botocore is installed)."""
    try:
        from botocore.exceptions import ConnectionError as BotocoreConnectionError
    except ImportError:
        return isinstance(exc, ConnectionError)
    return isinstance(exc, (ConnectionError, BotocoreConnectionError))


def _missing_bucket(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """The bucket of `path` when the object store says it does not exist (s3fs: one listing request of
    at most one key); None when it exists or the filesystem cannot tell."""
    split, call = getattr(fs, "split_path", None), getattr(fs, "call_s3", None)
    if split is None or call is None:
        return None
    bucket = split(path)[0]
    try:
        call("list_objects_v2", Bucket=bucket, MaxKeys=1)
    except FileNotFoundError:
        return bucket
    return None


def classify(location: str | os.PathLike) -> str:
    """'absent', 'empty' (an empty directory, or one holding only a writer lock), 'store' (a lenscache
    store), or 'other'. On an object store a bucket that does not exist, or credentials it refuses,
    raise StoreError naming the location."""
    if not is_url(location):
        return _classify(location)
    with remote_access(location):
        state = _classify(location)
        if state == "absent" and (bucket := _missing_bucket(*_fs(location))) is not None:
            raise StoreError(f"{location}: the bucket {bucket!r} does not exist (or this endpoint does not have it)")
    return state


def _classify(location: str | os.PathLike) -> str:
    fs, path = _fs(location)
    if not fs.exists(path):
        return "absent"
    if not fs.isdir(path):
        return "other"
    if all(is_lock_member(p.rstrip("/").rsplit("/", 1)[-1]) for p in fs.ls(path, detail=False)):
        return "empty"
    try:
        raw = _read_root(location, fs, path)
        if raw is None:
            return "other"
        meta = json.loads(raw)
    except (OSError, ValueError):
        return "other"
    if not isinstance(meta, dict) or not isinstance(meta.get("attributes"), dict):
        return "other"
    if meta.get("node_type") == "group" and "lenscache" in meta.get("attributes", {}):
        return "store"
    return "other"


def root_document(location: str | os.PathLike) -> dict:
    """The root group's zarr.json, parsed (callers have checked that it exists)."""
    fs, path = _fs(location)
    with remote_access(location):
        raw = _read_root(location, fs, path)
    if raw is None:
        raise StoreError(f"{location} has no zarr.json")
    return json.loads(raw)


def _read_root(location: str | os.PathLike, fs: fsspec.AbstractFileSystem, path: str) -> bytes | None:
    """The root zarr.json's bytes, or None; a local one is read without following links."""
    if not is_url(location):
        return read_member(Path(path), "zarr.json")
    root = f"{path.rstrip('/')}/zarr.json"
    try:
        # one GET: open() + read() would send a HEAD, then a GET that fails (FileExpired) when the
        # writer's commit replaced zarr.json in between, as it does while a reader polls a growing store
        return fs.cat_file(root)
    except FileNotFoundError:
        return None


def unsafe_member(name: str) -> bool:
    """A member path that could resolve outside the store: absolute, '..', or a URL/drive prefix."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith("/") or ":" in name or any(p in ("..", ".") for p in parts)


def remove(location: str | os.PathLike, *, keep_lock: bool = False) -> None:
    """Remove the store at `location`; with `keep_lock`, all but the writer lock (its holder replaces the store)."""
    fs, path = _fs(location)
    if not fs.exists(path):
        return
    root = f"{path.rstrip('/')}/zarr.json"
    if fs.exists(root):  # first: a removal killed half-way must not leave something that looks like a store
        fs.rm(root)
    if not keep_lock:
        fs.rm(path, recursive=True)
        return
    for member in fs.ls(path, detail=False):
        if member.rstrip("/").rsplit("/", 1)[-1] != LOCK_NAME:
            fs.rm(member, recursive=True)


# ---- local stores: no links, no special files --------------------------------------------------


def _link_error(root: Path, member: str) -> StoreError:
    return StoreError(
        f"store {root} holds a symbolic link at {member!r}; lenscache does not follow links inside a "
        "store (copy the data in instead)"
    )


def _special_error(root: Path, member: str) -> StoreError:
    return StoreError(
        f"store {root} holds {member!r}, which is neither a regular file nor a directory "
        "(a FIFO, socket or device); refusing to open it"
    )


def check_local_tree(root: Path) -> int:
    """Refuse a local store with a symbolic link or special file anywhere below `root`; returns its files.

    One walk with os.scandir that never follows a link: the directory listing's entry types answer
    is_symlink/is_dir/is_file, so there is no stat per file (only per zarr.json, for its size)."""
    files, pending, base = 0, [""], str(root)
    while pending:
        rel = pending.pop()
        with os.scandir(f"{base}/{rel}" if rel else base) as entries:
            for entry in entries:
                member = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_symlink():
                    raise _link_error(root, member)
                if entry.is_dir(follow_symlinks=False):
                    pending.append(member)
                elif entry.is_file(follow_symlinks=False):
                    files += 1
                    if (
                        entry.name == "zarr.json"
                        and entry.stat(follow_symlinks=False).st_size > METADATA_MAX_BYTES
                    ):
                        raise StoreError(
                            f"store {root}: {member!r} is over {METADATA_MAX_BYTES >> 20} MiB; refusing to read it"
                        )
                else:
                    raise _special_error(root, member)
    return files


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO swapped in after the walk returns at once (and is then refused by fstat)
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _open_member(root: Path, key: str) -> int | None:
    """A file descriptor of regular file `key` below `root`, opened component by component without
    following a link (a link anywhere on the way raises StoreError); None when there is no such file."""
    parts = key.split("/")
    if unsafe_member(key) or "" in parts:
        raise StoreError(f"store {root}: refusing member name {key!r}")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            try:
                nxt = os.open(part, _FILE_FLAGS if last else _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                return None
            except OSError as exc:
                # O_NOFOLLOW: a link is ELOOP as the last component, ENOTDIR (like a file) before it
                if exc.errno == errno.ELOOP or (
                    exc.errno == errno.ENOTDIR
                    and stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode)
                ):
                    raise _link_error(root, "/".join(parts[: i + 1])) from None
                if exc.errno == errno.ENOTDIR:
                    return None
                raise
            os.close(fd)
            fd = nxt
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            return None
        if not stat.S_ISREG(mode):
            raise _special_error(root, key)
        opened, fd = fd, -1
        return opened
    finally:
        if fd >= 0:
            os.close(fd)


def read_member(root: Path, key: str, byte_range=None) -> bytes | None:
    """The bytes of `key` below `root` (or the part `byte_range` asks for), never through a link."""
    fd = _open_member(root, key)
    if fd is None:
        return None
    with open(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if key.rsplit("/", 1)[-1] in ("zarr.json", LOCK_NAME) and size > METADATA_MAX_BYTES:
            raise StoreError(
                f"store {root}: {key!r} is over {METADATA_MAX_BYTES >> 20} MiB; refusing to read it"
            )
        if byte_range is None:
            return f.read()
        if isinstance(byte_range, RangeByteRequest):
            f.seek(byte_range.start)
            return f.read(max(0, byte_range.end - byte_range.start))
        if isinstance(byte_range, OffsetByteRequest):
            f.seek(byte_range.offset)
        elif isinstance(byte_range, SuffixByteRequest):
            f.seek(max(0, size - byte_range.suffix))
        else:
            raise TypeError(f"unexpected byte_range {byte_range!r}")
        return f.read()


def _member_size(root: Path, key: str) -> int:
    fd = _open_member(root, key)
    if fd is None:
        raise FileNotFoundError(errno.ENOENT, "no such store member", str(root / key))
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


class SafeLocalStore(LocalStore):
    """A read-only LocalStore whose reads never follow a symbolic link below the root nor open a
    special file (see `read_member`); listing is LocalStore's (names only, no bytes)."""

    def _get_safe(self, key: str, prototype, byte_range):
        data = read_member(self.root, key, byte_range)
        return None if data is None else prototype.buffer.from_bytes(data)

    def get_sync(self, key, *, prototype=None, byte_range=None):  # type: ignore[override]
        self._ensure_open_sync()
        return self._get_safe(key, prototype or default_buffer_prototype(), byte_range)

    async def get(self, key, prototype=None, byte_range=None):  # type: ignore[override]
        if not self._is_open:
            await self._open()
        return await asyncio.to_thread(
            self._get_safe, key, prototype or default_buffer_prototype(), byte_range
        )

    async def get_partial_values(self, prototype, key_ranges):  # type: ignore[override]
        return list(await asyncio.gather(*(self.get(key, prototype, r) for key, r in key_ranges)))

    async def exists(self, key: str) -> bool:
        fd = await asyncio.to_thread(_open_member, self.root, key)
        if fd is not None:
            os.close(fd)
        return fd is not None

    async def getsize(self, key: str) -> int:
        return await asyncio.to_thread(_member_size, self.root, key)
