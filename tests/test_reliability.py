"""Reliability: crash torture (reduced count; tools/crash_torture.py runs the full one), a disk that
fills up mid-build, and store metadata that tries to point outside the store."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

import lenscache.cache.build as build_module
from lenscache.cache.build import BuildConfig, build_store
from lenscache.cache.model import ModelSpec
from lenscache.cache.text import DataSpec
from lenscache.errors import LensCacheError, StoreError
from lenscache.reader import open_store
from lenscache.tools.crash_torture import torture
from lenscache.verify import verify_store


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rel") / "corpus.txt"
    path.write_text(
        "\n\n".join(f"Document {i}: " + "the quick brown fox jumps. " * (i % 7 + 3) for i in range(300))
    )
    return path


def test_sigkill_at_several_points_then_resume_equals_clean_build(llama_dir, corpus, tmp_path):
    args = [
        "--model", str(llama_dir), "--data", str(corpus), "--seq-len", "8", "--max-tokens", str(8 * 40),
        "--batch-size", "1", "--seqs-per-chunk", "1", "--no-progress",
    ]  # fmt: skip
    result = torture(args, tmp_path, points=3, seed=1)
    assert result["all_ok"], json.dumps(result["kills"], indent=1)
    assert result["distinct_kill_states"] >= 2


def test_sigkill_during_direct_writes_then_resume_equals_clean_build(llama_dir, tmp_path, direct_calls):
    """Rows of 128 sequences of 128 tokens make chunks of 1 MiB and more: the O_DIRECT path."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n\n".join(f"Document {i}: " + "the quick brown fox jumps. " * (i % 7 + 3) for i in range(3000))
    )
    args = [
        "--model", str(llama_dir), "--data", str(corpus), "--seq-len", "128", "--max-tokens", str(128 * 128 * 3),
        "--batch-size", "32", "--seqs-per-chunk", "128", "--no-progress",
    ]  # fmt: skip
    build_store(BuildConfig(out=str(tmp_path / "probe.zarr"), model=ModelSpec(str(llama_dir)), data=DataSpec(str(corpus)),
                            seq_len=128, max_tokens=128 * 128 * 3, batch_size=32, seqs_per_chunk=128, progress=False))  # fmt: skip
    if not direct_calls:  # the build checks O_DIRECT itself
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")
    result = torture(args, tmp_path, points=2, seed=3)
    assert result["all_ok"], json.dumps(result["kills"], indent=1)
    assert result["distinct_kill_states"] >= 2


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
