"""Stores on object storage, against a real S3 API server on loopback (moto's server, tests/s3_server.py;
not a mock of the client): build, resume, info, verify, fit, eval and cbe on ``s3://`` stores equal
their local twins; readers see only committed sequences; one writer per store; read-only
credentials read everything and write nothing; bad buckets and credentials get one clear line.

lenscache reaches the server as a user reaches any S3-compatible service: the standard AWS
environment variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), read by s3fs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from s3_server import run_many, s3_server
from safetensors.numpy import load_file

from lenscache.cache.build import BuildConfig, build_store
from lenscache.cache.model import ModelSpec
from lenscache.cache.text import DataSpec
from lenscache.errors import SelectionError, StoreLocked
from lenscache.lock import LOCK_NAME, LockRecord, _LockFile, lock_note, read_lock, writer_lock
from lenscache.reader import open_store
from lenscache.tools.cli import main
from lenscache.verify import verify_store

CLI = [sys.executable, "-m", "lenscache.tools.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
ENV.pop("LENSCACHE_CRASH_AT", None)
BUCKET = "lenscache"
N_SEQ = 10
QUIET = 3600.0  # no heartbeat rewrites the lock during a test

def build_args(llama_dir: Path, text_file: Path) -> list[str]:
    return ["--model", str(llama_dir), "--data", str(text_file), "--seq-len", "16", "--max-tokens", str(16 * N_SEQ),
            "--seqs-per-chunk", "2", "--batch-size", "2", "--no-progress"]  # fmt: skip


def build(env: dict, args: list[str], out: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "build", *args, "--out", out, *extra], env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        server.make_bucket(BUCKET)
        yield server


@pytest.fixture(scope="module")
def args(llama_dir, text_file) -> list[str]:
    return build_args(llama_dir, text_file)


def config(llama_dir: Path, text_file: Path, out: str, **kw) -> BuildConfig:
    """The same build as `build_args`, through the API."""
    return BuildConfig(out=out, model=ModelSpec(str(llama_dir)), data=DataSpec(str(text_file)), seq_len=16,
                       max_tokens=16 * N_SEQ, seqs_per_chunk=2, batch_size=2, progress=False, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def local(llama_dir, text_file, tmp_path_factory) -> Path:
    """The same store built on the local disk."""
    out = tmp_path_factory.mktemp("local") / "s.zarr"
    build_store(config(llama_dir, text_file, str(out)))
    return out


@pytest.fixture(scope="module")
def s3_store(s3, llama_dir, text_file) -> str:
    url = f"s3://{BUCKET}/clean.zarr"
    with s3.as_identity("writer"):
        build_store(config(llama_dir, text_file, url))
    return url


def same_arrays(a, b) -> None:
    """Every array of two stores holds the same numbers, bit for bit."""
    x, y = open_store(a), open_store(b)
    assert sorted(x.arrays) == sorted(y.arrays)
    for name in x.arrays:
        np.testing.assert_array_equal(x.arrays[name][...], y.arrays[name][...], err_msg=name)
    assert x.n_sequences == y.n_sequences and x.meta.build.status == y.meta.build.status


def key_prefix(url: str) -> str:
    """The object keys' prefix of a store at s3://BUCKET/..."""
    return url.removeprefix(f"s3://{BUCKET}/").rstrip("/") + "/"


def chunk_etags(s3, url: str) -> dict[str, str]:
    """The ETag (MD5 of the bytes) of every object of a store but its root metadata (which holds times)."""
    prefix = key_prefix(url)
    return {k[len(prefix) :]: e for k, e in s3.objects(BUCKET).items() if k.startswith(prefix) and k != prefix + "zarr.json"}


def seq_chunks_present(s3, url: str) -> set[int]:
    """Indices (along seq) of the resid and final_lo chunks on the server."""
    found = set()
    for key in chunk_etags(s3, url):
        parts = key.split("/")
        if parts[0] == "resid" and parts[1] == "c":
            found.add(int(parts[3]))
        elif parts[0] == "final_lo" and parts[1] == "c":
            found.add(int(parts[2]))
    return found


def test_build_on_s3_equals_the_local_build(s3, s3_store, local):
    with s3.as_identity("writer"):
        assert verify_store(s3_store).ok
        same_arrays(s3_store, local)
        assert open_store(s3_store).meta.data["fingerprint"] == open_store(local).meta.data["fingerprint"]
    assert read_lock(str(local)) is None
    assert not any(k.endswith(LOCK_NAME) for k in s3.objects(BUCKET))  # the build released its lock


def test_a_two_worker_build_into_s3_writes_the_same_objects(s3, s3_store, args):
    """`--workers 2` into S3: the workers (processes of a LocalCluster, with the driver's AWS variables)
    write their rows' chunks themselves; every object equals the one-process S3 build's (same ETags)."""
    url = f"s3://{BUCKET}/two-workers.zarr"
    r = build(s3.env("writer", ENV), args, url, "--workers", "2", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["workers"]["workers"] == 2 and summary["workers"]["tasks"] == N_SEQ // 2
    assert chunk_etags(s3, url) == chunk_etags(s3, s3_store)
    with s3.as_identity("reader"):
        assert verify_store(url).ok and open_store(url).meta.build.status == "complete"


def test_read_commands_with_read_only_credentials_write_nothing(s3, s3_store, local, args, tmp_path, capsys):
    """info, verify, fit, eval and cbe from an identity that may only read: they work, their results equal
    those from the local twin, and the server receives no write request at all."""
    objects, mark = s3.objects(BUCKET), len(s3.requests())

    def commands(store: str, out: Path) -> list[list[str]]:
        return [
            ["info", store, "--json"],
            ["verify", store],
            ["fit", store, "--lens", "affine", "--out", str(out / "lens"), "--no-progress"],
            ["eval", store, "--lens", f"affine={out / 'lens'}", "--out", str(out / "report"), "--no-plot",
             "--no-progress"],
            ["cbe", store, "--lens", str(out / "lens"), "--out", str(out / "basis"), "--layers", "1", "--k", "2",
             "--steps", "3", "--no-progress"],
        ]  # fmt: skip

    ro_build = ["build", *args, "--out", f"s3://{BUCKET}/ro.zarr"]
    remote = run_many(s3.env("reader", ENV), *commands(s3_store, tmp_path / "s3"), ro_build)
    for (code, _, err), cmd in zip(remote[:-1], commands(s3_store, tmp_path / "s3"), strict=True):
        assert code == 0, (cmd[0], err)
    # not one PUT, POST or DELETE by the read commands, refused or not; the build is refused at its
    # first write (the lock's exclusive create) with one clear line
    assert s3.writes_since(mark) == [("PUT", 403, f"/{BUCKET}/ro.zarr/{LOCK_NAME}")]
    code, _, err = remote[-1]
    assert code == 2 and "does not let these credentials write there" in err, err
    assert len(err.strip().splitlines()) == 1
    assert s3.objects(BUCKET) == objects

    twin = []
    for cmd in commands(str(local), tmp_path / "local"):
        capsys.readouterr()
        try:
            main(cmd)
        except SystemExit as exc:
            assert exc.code == 0, cmd
        twin.append((0, capsys.readouterr().out, ""))
    info_s3, info_local = json.loads(remote[0][1]), json.loads(twin[0][1])
    assert info_s3["meta"]["data"] == info_local["meta"]["data"]
    assert {k: v["stored_bytes"] for k, v in info_s3["arrays"].items()} == {
        k: v["stored_bytes"] for k, v in info_local["arrays"].items()
    }
    assert "clean" in remote[1][1]
    for rel in ("lens/lens.safetensors", "basis/basis.safetensors"):
        a, b = load_file(tmp_path / "s3" / rel), load_file(tmp_path / "local" / rel)
        assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a), rel
    metrics = [json.loads((tmp_path / w / "report" / "metrics.json").read_text()) for w in ("s3", "local")]
    for m in metrics:
        m.pop("store"), m.pop("seconds")
    assert metrics[0] == metrics[1] and metrics[0]["lenses"]["affine"]


def test_a_build_killed_on_s3_resumes_to_the_clean_store(s3, s3_store, local, args, llama_dir, text_file):
    url = f"s3://{BUCKET}/killed.zarr"
    # killed (SIGKILL) in the middle of a row: some of its chunks written, its commit not
    r = build({**s3.env("writer", ENV), "LENSCACHE_CRASH_AT": "after-chunk:12"}, args, url)
    assert r.returncode == -9, r.stderr
    with s3.as_identity("writer"):
        partial = open_store(url)
        n = partial.n_sequences
        assert 0 < n < N_SEQ and partial.meta.build.status == "building"
        # chunks past the committed count are on the server already (2 sequences a chunk), yet no reader sees them
        assert n // 2 in seq_chunks_present(s3, url)
        np.testing.assert_array_equal(partial.resid(2), open_store(local).resid(2, slice(0, n)))
        with pytest.raises(SelectionError):
            partial.resid(2, slice(0, n + 1))
        assert read_lock(url).running() is False  # the killed writer's lock, stale
    with s3.as_identity("writer"):
        assert build_store(config(llama_dir, text_file, url, resume=True)).resumed_from == n
        assert verify_store(url).ok
        same_arrays(url, local)
    # every object bit-identical to the uninterrupted build's
    assert chunk_etags(s3, url) == chunk_etags(s3, s3_store)


GATED = """
import sys
import lenscache.cache.writer as writer
real = writer.StoreWriter.commit
def gated(self, committed):
    if committed == 6:  # rows 4 and 5 are written, their commit not yet
        print("at commit 6", flush=True)
        sys.stdin.readline()
    return real(self, committed)
writer.StoreWriter.commit = gated
from lenscache.tools.cli import main
main(sys.argv[1:])
"""


def test_a_reader_during_a_build_on_s3_sees_only_committed_sequences(s3, local, args):
    url = f"s3://{BUCKET}/growing.zarr"
    first = subprocess.Popen([sys.executable, "-c", GATED, "build", *args, "--out", url], env=s3.env("writer", ENV),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert first.stdout.readline() == "at commit 6\n", first.stderr.read()
        with s3.as_identity("reader"):
            store = open_store(url)
            assert store.n_sequences == 4 and store.meta.build.status == "building"
            np.testing.assert_array_equal(store.resid(1), open_store(local).resid(1, slice(0, 4)))
            with pytest.raises(SelectionError, match="only 4 are committed"):
                store.tokens(slice(0, 6))
            assert lock_note(url).startswith("being written by")  # seen, and left alone
        assert 2 in seq_chunks_present(s3, url)  # the chunks of rows 4-5 are on the server, uncommitted
        first.stdin.write("\n")
        first.stdin.close()
        assert first.wait(timeout=120) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    with s3.as_identity("reader"):
        same_arrays(url, local)


def test_one_writer_per_store_on_s3(s3):
    """The writer lock's exclusive create holds on the server: a second writer is refused, naming the first."""
    url = f"s3://{BUCKET}/locked.zarr"
    with s3.as_identity("writer"):
        with writer_lock(url, command="copy", heartbeat_s=QUIET) as held:
            assert _LockFile(url).create(b"another writer") is False  # If-None-Match: the server says no
            with pytest.raises(StoreLocked, match=rf"pid {os.getpid()} \(copy\)"):
                writer_lock(url, command="build", heartbeat_s=QUIET).acquire()
            assert LockRecord.parse(s3.client().get_object(Bucket=BUCKET, Key=f"locked.zarr/{LOCK_NAME}")["Body"]
                                    .read()).token == held.record.token  # fmt: skip
        assert read_lock(url) is None


def test_bad_buckets_and_credentials_get_one_clear_line(s3, s3_store, args, tmp_path):
    objects, buckets = s3.objects(BUCKET), s3.client().list_buckets()["Buckets"]
    nowhere = "s3://no-such-bucket/s.zarr"
    missing = run_many(s3.env("writer", ENV), ["info", nowhere], ["build", *args, "--out", nowhere],
                       ["fit", nowhere, "--lens", "logit", "--out", str(tmp_path / "lens")], ["verify", nowhere])  # fmt: skip
    wrong = run_many(s3.env(("AKIAWRONGWRONGWRONG", "not-the-secret"), ENV), ["info", s3_store], ["verify", s3_store],
                     ["fit", s3_store, "--lens", "logit", "--out", str(tmp_path / "lens")],
                     ["build", *args, "--out", s3_store, "--resume"])  # fmt: skip
    for code, _, err in missing[:-1]:
        assert code == 2 and "the bucket 'no-such-bucket' does not exist" in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    code, out, err = missing[-1]  # verify reports it as the store's problem
    assert code == 1 and "BAD  s3://no-such-bucket/s.zarr: the bucket 'no-such-bucket' does not exist" in out, out
    for code, _, err in wrong:
        assert code == 2 and "refused access" in err and "AWS_ACCESS_KEY_ID" in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert s3.objects(BUCKET) == objects and s3.client().list_buckets()["Buckets"] == buckets
    assert not (tmp_path / "lens").exists()
