"""Reliability: SIGKILL at named crash points then resume (tools/crash_torture.py runs every point,
and randomly timed kills), a disk that fills up mid-build, and store metadata that tries to point
outside the store."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pytest
from conftest import spy_direct_writes
from fsspec.implementations.memory import MemoryFileSystem

import lenscache.cache.build as build_module
from lenscache.cache import faults
from lenscache.cache.build import BuildConfig, build_store
from lenscache.cache.chunk_writer import available_cores
from lenscache.cache.faults import ENV, CrashPointError
from lenscache.cache.model import ModelSpec
from lenscache.cache.text import DataSpec
from lenscache.errors import LensCacheError, StoreError
from lenscache.reader import open_store
from lenscache.tools.crash_torture import (
    CLI,
    Crash,
    Geometry,
    accepts_o_direct,
    corpus_text,
    crash_at,
    geometry,
)
from lenscache.verify import verify_store


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rel") / "corpus.txt"
    path.write_text(
        "\n\n".join(f"Document {i}: " + "the quick brown fox jumps. " * (i % 7 + 3) for i in range(300))
    )
    return path


# -- SIGKILL at named crash points (cache/faults.py): the same state on every run, however loaded --

SMALL = dict(seq_len=8, n_seq=10, seqs_per_chunk=1, batch_size=1)  # buffered LocalStore writes
DIRECT = dict(seq_len=128, n_seq=256, seqs_per_chunk=128, batch_size=32)  # chunks of 1 MiB and more: O_DIRECT


@dataclass
class Build:
    """One build geometry: its `lenscache build` options, its clean store and that store's geometry."""

    args: list[str]
    cfg: dict
    clean: Path
    geo: Geometry

    @property
    def work(self) -> Path:
        """Where its killed stores go (beside the clean one, on the same filesystem)."""
        return self.clean.parent


def _build(model: Path, corpus: Path, work: Path, seq_len: int, n_seq: int, seqs_per_chunk: int,
           batch_size: int) -> Build:  # fmt: skip
    args = [
        "--model", str(model), "--data", str(corpus), "--seq-len", str(seq_len),
        "--max-tokens", str(seq_len * n_seq), "--batch-size", str(batch_size),
        "--seqs-per-chunk", str(seqs_per_chunk), "--no-progress",
    ]  # fmt: skip
    cfg = dict(model=ModelSpec(str(model)), data=DataSpec(str(corpus)), seq_len=seq_len,
               max_tokens=seq_len * n_seq, batch_size=batch_size, seqs_per_chunk=seqs_per_chunk,
               progress=False)  # fmt: skip
    clean = work / "clean.zarr"
    build_store(BuildConfig(out=str(clean), **cfg))
    return Build(args, cfg, clean, geometry(clean))


@pytest.fixture(scope="module")
def small(llama_dir, corpus, tmp_path_factory) -> Build:
    return _build(llama_dir, corpus, tmp_path_factory.mktemp("small"), **SMALL)


@pytest.fixture(scope="module")
def o_direct_dir(tmp_path_factory, request) -> Iterator[Path]:
    """A fresh directory on a filesystem that takes O_DIRECT: pytest's temporary one, or where /tmp is a
    tmpfs (as many distributions mount it), one in the checkout's .pytest_cache, removed afterwards."""
    work = tmp_path_factory.mktemp("direct")
    if accepts_o_direct(work) or request.config.cache is None:
        yield work  # (a platform without O_DIRECT: the build falls back, and `direct` says so)
        return
    work = request.config.cache.mkdir("o-direct-builds") / f"run-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def direct(llama_dir, o_direct_dir) -> Build:
    work = o_direct_dir
    text = work / "corpus.txt"
    text.write_text(corpus_text(3000))
    with pytest.MonkeyPatch.context() as mp:  # conftest's direct_calls spy, for a module-wide clean build
        calls = spy_direct_writes(mp)
        built = _build(llama_dir, text, work, **DIRECT)
    if not calls:  # the build checks O_DIRECT itself: a platform without it (not Linux, say)
        pytest.skip(f"the filesystem of {work} refuses O_DIRECT")
    assert len(calls) == sum(built.geo.direct_per_row)  # the geometry counts the direct writes right
    return built


def _files(root: Path) -> dict[str, bytes]:
    """Every file of a store, byte for byte; the root metadata without its timestamps.

    Temporary files of killed writes are left out: they are never read (the chunk's own file is).
    """
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
             if p.is_file() and not p.name.endswith(".partial")}  # fmt: skip
    meta = json.loads(files.pop("zarr.json"))
    info = meta["attributes"]["lenscache"]
    del info["created"], info["build"]["started"], info["build"]["finished"]
    files["zarr.json"] = json.dumps(meta, sort_keys=True).encode()
    return files


def _kill_then_resume(build: Build, point: str, out: Path) -> Crash:
    """Kill a CLI build at `point`, resume it without the variable, and check it equals the clean build."""
    crash = crash_at(build.args, out, point)
    assert crash.returncode == -signal.SIGKILL, crash.stderr_tail
    assert crash.said, crash.stderr_tail  # killed by the crash point, not by something else
    assert not verify_store(out).ok  # incomplete, and says so
    assert os.environ.get(ENV) is None  # this process resumes with no crash point armed
    summary = build_store(BuildConfig(out=str(out), resume=True, **build.cfg))
    assert summary.resumed_from == (crash.committed if crash.status == "building" else 0)
    assert verify_store(out).ok
    a, b = _files(out), _files(build.clean)
    assert sorted(a) == sorted(b)
    assert [name for name in a if a[name] != b[name]] == []  # bit-identical, chunk by chunk
    return crash


# (point, status and committed count it leaves) for a build's geometry g
SMALL_POINTS = {
    # the root group is born with its metadata: a kill here used to leave "not a lenscache store"
    "group-created": lambda g: ("group-created", "initializing", 0),
    "tokens-written": lambda g: ("tokens-written", "initializing", 0),  # laid out, head and tokens written
    "after-commit:0": lambda g: ("after-commit:0", "building", 0),
    "mid-row": lambda g: (f"after-chunk:{g.chunks_per_row + 2}", "building", g.seqs_per_chunk),
    "before-commit": lambda g: (f"before-commit:{3 * g.seqs_per_chunk}", "building", 2 * g.seqs_per_chunk),
}
DIRECT_POINTS = {
    # the first direct write of the second row, caught in its temporary file
    "mid-chunk": lambda g: (f"mid-chunk:{g.direct_per_row[0] + 1}", "building", g.seqs_per_chunk),
    "mid-row": lambda g: (f"after-chunk:{g.chunks_per_row + 2}", "building", g.seqs_per_chunk),
    "before-commit": lambda g: (f"before-commit:{2 * g.seqs_per_chunk}", "building", g.seqs_per_chunk),
}


@pytest.mark.parametrize("case", SMALL_POINTS)
def test_sigkill_at_a_named_point_then_resume_equals_clean_build(case, small):
    point, status, committed = SMALL_POINTS[case](small.geo)
    crash = _kill_then_resume(small, point, small.work / f"killed-{case}.zarr")
    assert (crash.status, crash.committed) == (status, committed)


@pytest.mark.parametrize("case", DIRECT_POINTS)
def test_sigkill_during_direct_writes_then_resume_equals_clean_build(case, direct):
    """Rows of 128 sequences of 128 tokens make chunks of 1 MiB and more: the O_DIRECT path."""
    point, status, committed = DIRECT_POINTS[case](direct.geo)
    assert direct.geo.rows == 2 and direct.geo.direct_per_row[1] > 0
    crash = _kill_then_resume(direct, point, direct.work / f"killed-{case}.zarr")
    assert (crash.status, crash.committed) == (status, committed)
    if point.startswith("mid-chunk"):
        assert crash.partial_files >= 1  # the chunk in flight never replaced its file
        assert direct.geo.committed_before_direct_write(int(point.split(":")[1])) == committed


def test_crash_points_land_in_the_same_state_under_cpu_load(small):
    """Busy loops on every core: the kill still lands at its point (no assertion on time)."""
    point, status, committed = SMALL_POINTS["mid-row"](small.geo)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(available_cores())]
    try:
        crash = _kill_then_resume(small, point, small.work / "killed-under-load.zarr")
        assert all(p.poll() is None for p in busy)  # the load lasted the whole build
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert (crash.status, crash.committed) == (status, committed)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("nowhere", "unknown crash point 'nowhere'"),
        ("after-chunk", "needs a number"),
        ("after-chunk:x", "'x' is not a whole number"),
        ("after-chunk:0", "at least 1"),
        ("before-commit:-1", "at least 0"),
        ("after-layout:2", "takes no ':N'"),
    ],
)
def test_a_bad_crash_point_is_refused_naming_it(value, problem):
    with pytest.raises(CrashPointError, match=re.escape(problem)):
        faults.parse(value)


def test_good_crash_points_parse():
    assert str(faults.parse(" after-chunk:5 ")) == "after-chunk:5"
    assert faults.parse("after-commit:0") == faults.CrashPoint("after-commit", 0)
    assert faults.parse("head-written") == faults.CrashPoint("head-written")


def test_a_bad_crash_point_fails_the_build_at_start(tmp_path):
    """Before the model loads (here: one that does not exist), with one line naming the variable."""
    done = subprocess.run(
        [*CLI, "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "s.zarr")],
        env={**os.environ, ENV: "after-chunk:five"}, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line == f"error: {ENV}='after-chunk:five': 'five' is not a whole number"
    assert not (tmp_path / "s.zarr").exists()


class FullDisk(MemoryFileSystem):
    """An in-memory filesystem that fails writes with ENOSPC once `budget` bytes are used."""

    protocol = "fulldisk"
    budget = 0
    used = 0

    def pipe_file(self, path, value, *args, **kwargs):
        FullDisk.used += len(value)
        if FullDisk.used > FullDisk.budget:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return super().pipe_file(path, value, *args, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if "w" in mode or "a" in mode:
            write = f.write

            def limited(data):
                FullDisk.used += len(data)
                if FullDisk.used > FullDisk.budget:
                    raise OSError(errno.ENOSPC, "No space left on device", path)
                return write(data)

            f.write = limited
        return f


@pytest.mark.parametrize("writer_thread", [False, True])
def test_out_of_disk_during_a_build_fails_clearly_and_resumes_when_space_returns(
    writer_thread, llama_dir, corpus, monkeypatch
):
    monkeypatch.setattr(build_module, "writes_between_passes", lambda device: not writer_thread)
    fsspec.register_implementation("fulldisk", FullDisk, clobber=True)
    url, reference = f"fulldisk://full-{writer_thread}.zarr", f"memory://reference-full-{writer_thread}.zarr"
    cfg = dict(model=ModelSpec(str(llama_dir)), data=DataSpec(str(corpus)), seq_len=8, max_tokens=8 * 40,
               batch_size=1, seqs_per_chunk=1, progress=False)  # fmt: skip
    FullDisk.used, FullDisk.budget = 0, 10**9
    build_store(BuildConfig(out=reference, **cfg))
    FullDisk.budget = 150_000  # room for the head and some rows, not for all of them
    with pytest.raises((LensCacheError, OSError), match="[Nn]o space left"):
        build_store(BuildConfig(out=url, **cfg))
    partial = open_store(url)  # what was committed is readable and consistent
    assert 0 < partial.n_sequences < 40
    committed = partial.n_sequences
    np.testing.assert_array_equal(partial.tokens(), open_store(reference).tokens(slice(0, committed)))
    FullDisk.budget = 10**9
    build_store(BuildConfig(out=url, resume=True, **cfg))
    assert verify_store(url).ok
    a, b = open_store(url), open_store(reference)
    for name in a.arrays:
        np.testing.assert_array_equal(a.arrays[name][...], b.arrays[name][...], err_msg=name)


def test_store_metadata_cannot_point_outside_the_store(llama_dir, corpus, tmp_path):
    out = tmp_path / "s.zarr"
    build_store(BuildConfig(out=str(out), model=ModelSpec(str(llama_dir)), data=DataSpec(str(corpus)),
                            seq_len=8, max_tokens=64, progress=False))  # fmt: skip
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "zarr.json").write_text((out / "tokens" / "zarr.json").read_text())
    root = json.loads((out / "zarr.json").read_text())
    # a hand-edited root that lists a member outside the store through consolidated metadata
    root["consolidated_metadata"] = {
        "kind": "inline",
        "must_understand": False,
        "metadata": {"../secret": json.loads((secret / "zarr.json").read_text())},
    }
    (out / "zarr.json").write_text(json.dumps(root))
    with pytest.raises(StoreError, match="outside the store|\\.\\."):
        open_store(out)
