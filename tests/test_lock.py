"""One writer per store: the writer lock (lenscache.lock) against second writers, stale locks, readers.

Every race here is made deterministic: the first writer is either this test process holding the
lock through the API, or a real build stopped at a gate (it reads a line from its stdin right
before loading its model, with the lock held) until the second build has been refused.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import psutil
import pytest

import lenscache.cache.build as build_module
from lenscache import location
from lenscache.cache.build import BuildConfig, build_store
from lenscache.cache.model import ModelSpec
from lenscache.cache.text import DataSpec
from lenscache.errors import ModelError, StoreLocked
from lenscache.lock import (
    LOCK_NAME,
    LockRecord,
    lock_note,
    read_lock,
    stale_lock_problem,
    writer_lock,
)
from lenscache.reader import open_store
from lenscache.verify import verify_store

CLI = [sys.executable, "-m", "lenscache.tools.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
ENV.pop("LENSCACHE_CRASH_AT", None)
QUIET = 3600.0  # a heartbeat interval no test outlives: the lock file's bytes stay as acquired


def common(llama_dir: Path, text_file: Path) -> list[str]:
    return ["--model", str(llama_dir), "--data", str(text_file), "--seq-len", "16", "--max-tokens", "96",
            "--seqs-per-chunk", "2", "--batch-size", "2", "--no-progress"]  # fmt: skip


def build(args: list[str], out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, "build", *args, "--out", str(out), *extra], env=env or ENV, capture_output=True, text=True
    )


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env=ENV, capture_output=True, text=True)


def snapshot(root: Path) -> dict[str, str]:
    """Every file below `root` (the lock file too) and a hash of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def assert_same_store(a: Path, b: Path) -> None:
    sa, sb = open_store(a), open_store(b)
    assert verify_store(a).ok, verify_store(a).problems
    assert sa.meta.build.identity == sb.meta.build.identity
    assert set(sa.arrays) == set(sb.arrays)
    for name in sa.arrays:
        np.testing.assert_array_equal(sa.arrays[name][...], sb.arrays[name][...], err_msg=name)


def write_record(root: Path, **fields) -> LockRecord:
    """A lock file as another writer would have left it."""
    rec = LockRecord(**{**LockRecord.mine("build").__dict__, "token": os.urandom(8).hex(), **fields})
    root.mkdir(parents=True, exist_ok=True)
    (root / LOCK_NAME).write_bytes(rec.to_bytes())
    return rec


def dead_pid() -> tuple[int, float]:
    """The pid (and start time) of a process of this host that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    started = psutil.Process(proc.pid).create_time()
    proc.communicate()
    return proc.pid, started


@pytest.fixture(scope="module")
def args(llama_dir, text_file) -> list[str]:
    return common(llama_dir, text_file)


@pytest.fixture(scope="module")
def clean(tmp_path_factory, args) -> Path:
    """An uninterrupted build: what every build here must equal."""
    out = tmp_path_factory.mktemp("lock") / "clean.zarr"
    r = build(args, out)
    assert r.returncode == 0, r.stderr
    assert not (out / LOCK_NAME).exists()  # released at the end
    return out


@pytest.fixture(scope="module")
def killed(tmp_path_factory, args) -> tuple[Path, int]:
    """A build SIGKILLed after committing 2 of 6 sequences: a partial store and the lock it left."""
    out = tmp_path_factory.mktemp("lock") / "killed.zarr"
    proc = subprocess.Popen(
        [*CLI, "build", *args, "--out", str(out)],
        env={**ENV, "LENSCACHE_CRASH_AT": "after-commit:2"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.communicate()
    assert proc.returncode == -9
    return out, proc.pid


@pytest.fixture
def partial(killed, tmp_path) -> Path:
    """A copy of the killed build's partial store, without its lock."""
    out = shutil.copytree(killed[0], tmp_path / "partial.zarr")
    (out / LOCK_NAME).unlink(missing_ok=True)  # missing only when the lock is broken: other tests say so
    return out


# ---- a second writer fails at once and writes nothing ------------------------------------------


@pytest.mark.parametrize("mode", ["new", "resume", "overwrite"])
def test_a_second_build_fails_while_the_lock_is_held(mode, args, clean, partial, tmp_path):
    out = {"new": tmp_path / "new.zarr", "resume": partial, "overwrite": shutil.copytree(clean, tmp_path / "c.zarr")}[
        mode
    ]
    extra = {"new": [], "resume": ["--resume"], "overwrite": ["--overwrite"]}[mode]
    with writer_lock(out, command="build", heartbeat_s=QUIET) as held:
        before = snapshot(out)
        r = build(args, out, *extra)
        assert snapshot(out) == before  # not a byte written, the lock still ours
        assert read_lock(out).token == held.record.token
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{held.record.owner}@{socket.gethostname()} pid {os.getpid()}" in r.stderr
    assert f"since {held.record.started}, last heartbeat {held.record.heartbeat}" in r.stderr
    assert "is being written by" in r.stderr
    if mode == "new":
        assert sorted(before) == [LOCK_NAME]
        assert not out.exists()  # the fake writer's release leaves nothing behind
    # once the first writer is gone, the same command goes through and equals a clean build
    r = build(args, out, *extra)
    assert r.returncode == 0, r.stderr
    assert_same_store(out, clean)


@pytest.mark.parametrize("url", ["local", "memory://lenscache-test-lock/held.zarr"])
def test_a_locked_build_fails_before_loading_its_model(url, llama_dir, text_file, tmp_path, monkeypatch):
    out = str(tmp_path / "s.zarr") if url == "local" else url

    def no_load(spec):
        raise AssertionError("the model was loaded although the store is locked")

    monkeypatch.setattr(build_module, "load_model", no_load)
    cfg = BuildConfig(out=out, model=ModelSpec(str(llama_dir)), data=DataSpec(str(text_file)), seq_len=16,
                      max_tokens=96, progress=False)  # fmt: skip
    with writer_lock(out, command="copy", heartbeat_s=QUIET):
        with pytest.raises(StoreLocked, match=rf"pid {os.getpid()} \(copy\) since .*, last heartbeat"):
            build_store(cfg)
        assert location.classify(out) == "empty"  # holds the lock and nothing else


GATED = """
import sys
import lenscache.cache.build as build
real = build.load_model
def gated(spec):
    print("holding the lock", flush=True)
    sys.stdin.readline()
    return real(spec)
build.load_model = gated
from lenscache.tools.cli import main
main(sys.argv[1:])
"""


def test_two_real_builds_at_once_one_succeeds(args, clean, tmp_path):
    """A real first build holds the lock (stopped at a gate before its model loads) while a second runs."""
    out = tmp_path / "s.zarr"
    first = subprocess.Popen(
        [sys.executable, "-c", GATED, "build", *args, "--out", str(out)],
        env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert first.stdout.readline() == "holding the lock\n", first.stderr.read()
        second = build(args, out)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"pid {first.pid} (build)" in second.stderr and "is being written by" in second.stderr
        assert sorted(snapshot(out)) == [LOCK_NAME]  # the second wrote nothing; the first not yet
        first.stdin.write("\n")
        first.stdin.flush()
        _, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 0, err
    assert not (out / LOCK_NAME).exists()
    assert_same_store(out, clean)


# ---- stale locks and locks of other hosts ------------------------------------------------------


def test_a_killed_build_leaves_a_stale_lock_that_verify_info_and_resume_handle(args, clean, killed, tmp_path):
    out = shutil.copytree(killed[0], tmp_path / "s.zarr")
    pid = killed[1]
    rec = read_lock(out)
    assert rec.pid == pid and rec.running() is False

    v = cli("verify", str(out))
    assert v.returncode == 1
    assert f"stale writer lock left by {rec.holder} (build) since {rec.started}" in v.stdout
    assert f"(pid {pid} no longer runs); `lenscache build … --resume` clears it" in v.stdout
    i = cli("info", str(out))
    assert i.returncode == 0, i.stderr
    assert f"stale writer lock left by {rec.holder}" in i.stdout

    r = build(args, out)  # neither --resume nor --overwrite: the stale lock stays, and says why
    assert r.returncode == 2 and "has a stale writer lock left by" in r.stderr and "--resume" in r.stderr
    assert read_lock(out) == rec

    r = build(args, out, "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed at sequence 2" in r.stdout
    assert read_lock(out) is None
    assert_same_store(out, clean)


@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_a_stale_lock_with_no_store_yet_is_cleared_by_resume_or_overwrite(flag, args, clean, tmp_path):
    out = tmp_path / "s.zarr"
    pid, started = dead_pid()
    rec = write_record(out, pid=pid, pid_started=started)
    assert location.classify(out) == "empty"
    assert stale_lock_problem(out) is not None
    r = build(args, out)
    assert r.returncode == 2 and f"stale writer lock left by {rec.holder}" in r.stderr
    assert sorted(snapshot(out)) == [LOCK_NAME] and read_lock(out) == rec
    r = build(args, out, flag)
    assert r.returncode == 0, r.stderr
    assert read_lock(out) is None
    assert_same_store(out, clean)


def test_a_lock_from_another_host_is_broken_only_with_break_lock(args, clean, partial):
    # pid: one that runs here, so only the host tells that it cannot be checked
    rec = write_record(partial, owner="someone", host="elsewhere.example", pid=os.getpid())
    assert rec.running() is None and stale_lock_problem(partial) is None
    assert "on another host" in lock_note(partial)
    before = snapshot(partial)
    r = build(args, partial, "--resume")
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"is locked by someone@elsewhere.example pid {os.getpid()} (build) since" in r.stderr
    assert "on another host" in r.stderr and "--break-lock" in r.stderr
    assert snapshot(partial) == before
    r = build(args, partial, "--resume", "--break-lock")
    assert r.returncode == 0, r.stderr
    assert "resumed at sequence 2" in r.stdout
    assert read_lock(partial) is None
    assert_same_store(partial, clean)


def test_who_counts_as_gone(tmp_path):
    me = LockRecord.mine("build")
    assert me.running() is True
    pid, started = dead_pid()
    assert LockRecord(**{**me.__dict__, "pid": pid, "pid_started": started}).running() is False
    # a pid now used by a process started at another time is not the holder
    assert LockRecord(**{**me.__dict__, "pid_started": me.pid_started - 100}).running() is False
    # same hostname, another boot or pid namespace (a container): cannot be checked
    assert LockRecord(**{**me.__dict__, "machine": "another-boot/pid:[1]"}).running() is None
    assert LockRecord(**{**me.__dict__, "host": "elsewhere.example"}).running() is None
    (tmp_path / LOCK_NAME).write_bytes(b"")  # a writer killed between creating the file and filling it
    with pytest.raises(StoreLocked, match="cannot be read"):
        writer_lock(tmp_path, command="build", clear_stale=True).acquire()
    with writer_lock(tmp_path, command="build", break_lock=True, heartbeat_s=QUIET) as lk:
        assert lk.taken_over.problem and read_lock(tmp_path).token == lk.record.token


# ---- the lock itself: exclusive, heartbeat, release ---------------------------------------------


@pytest.fixture(params=["local", "memory"])
def where(request, tmp_path) -> str:
    return str(tmp_path / "s.zarr") if request.param == "local" else f"memory://lenscache-test-lock/{tmp_path.name}"


def test_the_lock_is_exclusive_and_released_on_exceptions(where):
    with pytest.raises(RuntimeError, match="boom"):
        with writer_lock(where, command="build", heartbeat_s=QUIET) as held:
            assert read_lock(where) == held.record
            for kw in ({}, {"clear_stale": True}, {"break_lock": True}):  # a live holder is never taken over
                with pytest.raises(StoreLocked, match=f"pid {os.getpid()} \\(build\\)"):
                    writer_lock(where, command="build", **kw).acquire()
            raise RuntimeError("boom")
    assert read_lock(where) is None
    with writer_lock(where, command="build", heartbeat_s=QUIET):  # free again
        pass
    assert location.classify(where) == "absent"


def test_heartbeat_refreshes_the_record(where):
    with writer_lock(where, command="build", heartbeat_s=QUIET) as lk:
        first = read_lock(where)
        assert lk.heartbeat()
        second = read_lock(where)
        assert second.beats == first.beats + 1 and second.token == first.token
        assert second.heartbeat >= first.heartbeat and second.started == first.started
    with writer_lock(where, command="build", heartbeat_s=0.01):
        deadline = time.monotonic() + 60  # generous: only the condition matters, not how long it took
        while read_lock(where).beats < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert read_lock(where).beats >= 3


def test_a_lock_taken_over_meanwhile_is_noticed_and_left_alone(where):
    other = LockRecord.mine("build").__dict__ | {"host": "elsewhere.example", "token": "f" * 32}
    with pytest.raises(StoreLocked, match="taken over while this build ran.*elsewhere.example"):
        with writer_lock(where, command="build", heartbeat_s=QUIET) as lk:
            with location._fs(where)[0].open(f"{location._fs(where)[1]}/{LOCK_NAME}", "wb") as f:
                f.write(LockRecord(**other).to_bytes())
            assert not lk.heartbeat()  # does not overwrite the new holder's record
            assert lk.lost.host == "elsewhere.example"
    assert read_lock(where).token == "f" * 32  # release did not delete it


def test_a_failed_build_releases_its_lock_and_leaves_nothing(llama_dir, text_file, tmp_path, monkeypatch):
    def broken(spec):
        raise ModelError("cannot load")

    monkeypatch.setattr(build_module, "load_model", broken)
    out = tmp_path / "s.zarr"
    with pytest.raises(ModelError):
        build_store(BuildConfig(out=str(out), model=ModelSpec(str(llama_dir)), data=DataSpec(str(text_file)),
                                seq_len=16, max_tokens=96, progress=False))  # fmt: skip
    assert not out.exists()


def test_overwrite_replaces_the_store_while_holding_the_lock(llama_dir, text_file, tmp_path, monkeypatch):
    out = tmp_path / "s.zarr"
    cfg = BuildConfig(out=str(out), model=ModelSpec(str(llama_dir)), data=DataSpec(str(text_file)), seq_len=16,
                      max_tokens=96, progress=False)  # fmt: skip
    build_store(cfg)
    seen = []
    real = build_module.StoreWriter.create

    def create(url, *a, **kw):
        seen.append(("old store removed", not (out / "resid").exists(), read_lock(out)))
        writer = real(url, *a, **kw)
        seen.append(("new store laid out", (out / "resid").exists(), read_lock(out)))
        return writer

    monkeypatch.setattr(build_module.StoreWriter, "create", create)
    cfg.overwrite = True
    build_store(cfg)
    assert [s[:2] for s in seen] == [("old store removed", True), ("new store laid out", True)]
    assert all(s[2] is not None and s[2].pid == os.getpid() for s in seen), seen
    assert read_lock(out) is None and verify_store(out).ok


# ---- readers are never blocked -------------------------------------------------------------------


def test_location_and_readers_ignore_the_lock(clean, tmp_path):
    from lenscache.analysis.evaluate import evaluate
    from lenscache.fit.affine import fit_affine

    out = shutil.copytree(clean, tmp_path / "s.zarr")
    (tmp_path / "only-lock").mkdir()
    with writer_lock(out, command="build", heartbeat_s=QUIET) as lk:
        lk.heartbeat()  # a heartbeat's temporary file may be left by a kill: readers ignore it too
        (out / f"{LOCK_NAME}.deadbeef.tmp").write_bytes(b"{}")
        assert location.classify(out) == "store"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # zarr warns about objects in a group it does not know
            store = open_store(out)
            assert store.resid(store.layers[0], slice(0, 2)).shape == (2, 16, store.d_model)
            lens = fit_affine(store, progress=False)
            report = evaluate(store, {"affine": lens}, split="all", tokenizer=None, progress=False)
            assert report is not None
        assert verify_store(out).ok  # a live writer's lock is no problem
        i = cli("info", str(out))
        assert i.returncode == 0, i.stderr
        assert f"being written by {lk.record.holder} (build)" in i.stdout
        e = cli("eval", str(out), "--split", "all", "--out", str(tmp_path / "report"), "--no-progress", "--no-plot")
        assert e.returncode == 0 and "Warning" not in e.stderr, e.stderr
    (out / f"{LOCK_NAME}.deadbeef.tmp").unlink()
    with writer_lock(tmp_path / "only-lock", command="build", heartbeat_s=QUIET):
        assert location.classify(tmp_path / "only-lock") == "empty"
