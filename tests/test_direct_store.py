"""DirectLocalStore writes large values around the page cache, and falls back cleanly where it cannot."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import numpy as np
import pytest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

import lenscache.cache.direct_store as direct_store
from lenscache.cache.build import BuildConfig, build_store
from lenscache.cache.direct_store import ALIGN, MIN_DIRECT_BYTES, DirectLocalStore, direct_writes
from lenscache.cache.model import ModelSpec
from lenscache.cache.text import DataSpec
from lenscache.reader import open_store
from lenscache.verify import verify_store


def _payload(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _set(store: DirectLocalStore, key: str, data: bytes) -> None:
    sync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def _partials(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".partial")]


@pytest.fixture
def o_direct(tmp_path) -> None:
    """Skips the test where the filesystem of its tmp_path refuses O_DIRECT."""
    if not getattr(os, "O_DIRECT", 0):
        pytest.skip("this platform has no O_DIRECT")
    try:
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError:
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")
    (tmp_path / "probe").unlink()


@pytest.mark.usefixtures("o_direct")
def test_large_values_are_written_directly_and_read_back_exactly(tmp_path, direct_calls):
    store = DirectLocalStore(tmp_path / "s")
    sizes = [MIN_DIRECT_BYTES, MIN_DIRECT_BYTES + 1, MIN_DIRECT_BYTES + ALIGN - 1, 3 * MIN_DIRECT_BYTES + 123]
    for i, n in enumerate(sizes):
        _set(store, f"c/{i}", _payload(n, seed=i))
    _set(store, "small", b"x" * 100)  # below the threshold: LocalStore's own write
    assert direct_calls == sizes
    for i, n in enumerate(sizes):
        assert (tmp_path / "s" / "c" / str(i)).read_bytes() == _payload(n, seed=i)
    assert (tmp_path / "s" / "small").read_bytes() == b"x" * 100
    assert store.direct and not _partials(tmp_path)
    _set(store, "c/1", _payload(MIN_DIRECT_BYTES + 7, seed=9))  # replaces a chunk whole
    assert (tmp_path / "s" / "c" / "1").read_bytes() == _payload(MIN_DIRECT_BYTES + 7, seed=9)


def test_a_filesystem_that_refuses_o_direct_at_open_gets_buffered_writes(tmp_path, monkeypatch):
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    store = DirectLocalStore(tmp_path / "s")
    data = _payload(MIN_DIRECT_BYTES + 5)
    _set(store, "c/0", data)
    assert (tmp_path / "s" / "c" / "0").read_bytes() == data
    assert not store.direct and not _partials(tmp_path)


@pytest.mark.usefixtures("o_direct")
def test_a_device_that_refuses_the_direct_write_gets_buffered_writes(tmp_path, monkeypatch):
    import fcntl

    real_write = os.write

    def refusing_write(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", refusing_write)
    store = DirectLocalStore(tmp_path / "s")
    data = _payload(2 * MIN_DIRECT_BYTES + 3)
    _set(store, "c/0", data)
    assert (tmp_path / "s" / "c" / "0").read_bytes() == data
    assert not store.direct and not _partials(tmp_path)


def test_a_failed_write_keeps_the_old_chunk_and_leaves_no_partial_file(tmp_path, monkeypatch):
    store = DirectLocalStore(tmp_path / "s")
    old = _payload(MIN_DIRECT_BYTES + 11, seed=1)
    _set(store, "c/0", old)

    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _set(store, "c/0", _payload(MIN_DIRECT_BYTES + 11, seed=2))
    monkeypatch.undo()
    assert (tmp_path / "s" / "c" / "0").read_bytes() == old
    assert not _partials(tmp_path)


@pytest.mark.usefixtures("o_direct")
def test_a_slow_device_goes_back_to_buffered_writes_after_the_probe(tmp_path, monkeypatch, direct_calls):
    spied = direct_store._write_direct  # the spy: it counts the calls

    def slow(fd, data, whole, buf):  # a device at a fifth of the floor
        time.sleep(len(data) / (direct_store.MIN_DIRECT_BYTES_PER_S / 5))
        return spied(fd, data, whole, buf)

    monkeypatch.setattr(direct_store, "_write_direct", slow)
    store = DirectLocalStore(tmp_path / "s")
    values = [_payload(MIN_DIRECT_BYTES + i, seed=i) for i in range(direct_store.PROBE_WRITES + 3)]
    for i, data in enumerate(values):
        _set(store, f"c/{i}", data)
    assert len(direct_calls) == direct_store.PROBE_WRITES  # then buffered
    assert not store.direct
    for i, data in enumerate(values):
        assert (tmp_path / "s" / "c" / str(i)).read_bytes() == data


@pytest.mark.usefixtures("o_direct")
def test_a_fast_device_keeps_direct_writes_after_the_probe(tmp_path, monkeypatch, direct_calls):
    monkeypatch.setattr(direct_store, "MIN_DIRECT_BYTES_PER_S", 1.0)  # any real device is faster
    store = DirectLocalStore(tmp_path / "s")
    for i in range(direct_store.PROBE_WRITES + 2):
        _set(store, f"c/{i}", _payload(MIN_DIRECT_BYTES, seed=i))
    assert store.direct and len(direct_calls) == direct_store.PROBE_WRITES + 2


def test_only_writable_local_stores_are_wrapped(tmp_path):
    assert type(direct_writes(LocalStore(tmp_path))) is DirectLocalStore
    read_only = LocalStore(tmp_path, read_only=True)
    assert direct_writes(read_only) is read_only


@pytest.mark.usefixtures("o_direct")
def test_a_build_written_directly_equals_one_written_through_memory(
    tmp_path, llama_dir, monkeypatch, direct_calls
):
    monkeypatch.setattr(direct_store, "MIN_DIRECT_BYTES", 0)  # every value, chunks and metadata alike,
    monkeypatch.setattr(direct_store, "MIN_DIRECT_BYTES_PER_S", 0)  # however slow tiny writes look
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Document {i}: " + "a lazy dog sleeps. " * (i % 5 + 2) for i in range(80)))
    cfg = dict(model=ModelSpec(str(llama_dir)), data=DataSpec(str(corpus)), seq_len=8, max_tokens=8 * 24,
               batch_size=2, seqs_per_chunk=4, progress=False)  # fmt: skip
    out, reference = tmp_path / "direct.zarr", "memory://direct-reference.zarr"
    build_store(BuildConfig(out=str(out), **cfg))
    build_store(BuildConfig(out=reference, **cfg))
    assert len(direct_calls) > 10
    assert verify_store(str(out)).ok
    assert not _partials(out)
    a, b = open_store(out), open_store(reference)
    assert a.n_sequences == b.n_sequences == 24
    for name in a.arrays:
        np.testing.assert_array_equal(a.arrays[name][...], b.arrays[name][...], err_msg=name)
