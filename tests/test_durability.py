"""Durability on local disks: every file of a row is fsync'ed (and its directory) before the commit that names it.

A power cut cannot be simulated here, so the test checks the ordering that makes one survivable: at
each write of the root metadata (a commit point), every file then in the store has been fsync'ed,
and so has every directory holding one; after the commit, the root metadata itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import lenscache.cache.direct_store as direct_store
from lenscache.cache.build import BuildConfig, build_store
from lenscache.cache.model import ModelSpec
from lenscache.cache.text import DataSpec
from lenscache.cache.writer import StoreWriter
from lenscache.reader import open_store


def _config(llama_dir: Path, text_file: Path, out: Path, **kw) -> BuildConfig:
    return BuildConfig(out=str(out), model=ModelSpec(str(llama_dir)), data=DataSpec(str(text_file)), seq_len=16,
                       max_tokens=16 * 12, seqs_per_chunk=2, batch_size=2, progress=False, **kw)  # fmt: skip


@pytest.fixture
def fsynced(monkeypatch) -> list[Path]:
    calls: list[Path] = []
    real = direct_store._fsync

    def spy(path, flags):
        calls.append(Path(path))
        return real(path, flags)

    monkeypatch.setattr(direct_store, "_fsync", spy)
    return calls


def test_every_file_is_on_the_device_before_the_commit_that_names_it(llama_dir, text_file, tmp_path, fsynced,
                                                                       monkeypatch):  # fmt: skip
    out = tmp_path / "s.zarr"
    unsynced_at_commit: list[list[str]] = []
    real_write_meta = StoreWriter._write_meta

    def checked_write_meta(self):
        if out.exists():
            synced = set(fsynced)
            on_disk = [p for p in out.rglob("*") if ".partial" not in p.name and "lock" not in p.name]
            unsynced_at_commit.append(
                sorted(
                    str(p.relative_to(out))
                    for p in on_disk
                    if p.parent not in synced or (p.is_file() and p not in synced)
                )
            )
        real_write_meta(self)

    monkeypatch.setattr(StoreWriter, "_write_meta", checked_write_meta)
    build_store(_config(llama_dir, text_file, out))
    commits = unsynced_at_commit[2:]  # the first writes lay the store out; rows are committed after them
    assert len(commits) >= 6
    # only the root zarr.json itself (rewritten by this very write) may be unsynced at a commit
    assert all(missing in ([], ["zarr.json"]) for missing in commits), commits
    assert fsynced[-2:] == [out / "zarr.json", out]  # and the commit itself is synced last
    assert open_store(out).n_sequences == 12


def test_no_fsync_option_skips_it_and_builds_the_same(llama_dir, text_file, tmp_path, fsynced):
    build_store(_config(llama_dir, text_file, tmp_path / "fast.zarr", fsync=False))
    rows_synced = [p for p in fsynced if "fast.zarr" in str(p) and "resid/c/" in str(p)]
    assert rows_synced == []
    build_store(_config(llama_dir, text_file, tmp_path / "safe.zarr"))
    a, b = open_store(tmp_path / "fast.zarr"), open_store(tmp_path / "safe.zarr")
    assert (a.tokens() == b.tokens()).all() and (a.resid(1) == b.resid(1)).all()
