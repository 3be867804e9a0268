"""Where a store lives: a local path or any fsspec URL (``memory://``, ``s3://``, ``gs://`` …)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import fsspec
from zarr.abc.store import Store
from zarr.storage import FsspecStore, LocalStore

from .errors import StoreError


def is_url(location: str | os.PathLike) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def _local_path(location: str | os.PathLike) -> Path:
    return Path(str(location).removeprefix("file://")).expanduser()


def zarr_store(location: str | os.PathLike, *, read_only: bool) -> Store:
    """A zarr store object for `location`; fsspec options come from fsspec's own configuration."""
    if is_url(location):
        return FsspecStore.from_url(str(location), read_only=read_only)
    path = _local_path(location)
    if read_only and not path.exists():
        raise StoreError(f"no store at {path}: the path does not exist")
    return LocalStore(path, read_only=read_only)


def _fs(location: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    if is_url(location):
        fs, path = fsspec.core.url_to_fs(str(location))
        return fs, path
    return fsspec.filesystem("file"), str(_local_path(location).resolve())


def classify(location: str | os.PathLike) -> str:
    """'absent', 'empty' (an empty directory), 'store' (a lenscache store), or 'other'."""
    fs, path = _fs(location)
    if not fs.exists(path):
        return "absent"
    if not fs.isdir(path):
        return "other"
    if not fs.ls(path):
        return "empty"
    root = f"{path.rstrip('/')}/zarr.json"
    if not fs.exists(root):
        return "other"
    try:
        with fs.open(root, "rb") as f:
            meta = json.loads(f.read())
    except (OSError, ValueError):
        return "other"
    if meta.get("node_type") == "group" and "lenscache" in meta.get("attributes", {}):
        return "store"
    return "other"


def root_document(location: str | os.PathLike) -> dict:
    """The root group's zarr.json, parsed (callers have checked that it exists)."""
    fs, path = _fs(location)
    with fs.open(f"{path.rstrip('/')}/zarr.json", "rb") as f:
        return json.loads(f.read())


def unsafe_member(name: str) -> bool:
    """A member path that could resolve outside the store: absolute, '..', or a URL/drive prefix."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith("/") or ":" in name or any(p in ("..", ".") for p in parts)


def remove(location: str | os.PathLike) -> None:
    fs, path = _fs(location)
    if fs.exists(path):
        fs.rm(path, recursive=True)
