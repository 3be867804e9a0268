"""The CLI (build/info/verify) and store-level safety: corruption, unsafe codecs, schema versions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from tiny_models import TRAIN_TEXT

from lenscache.errors import StoreError
from lenscache.reader import open_store
from lenscache.verify import verify_store

CLI = [sys.executable, "-m", "lenscache.tools.cli"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory, llama_dir) -> Path:
    root = tmp_path_factory.mktemp("cli")
    text = root / "t.txt"
    text.write_text("\n".join(TRAIN_TEXT * 8), encoding="utf-8")
    out = root / "s.zarr"
    r = run("build", "--model", str(llama_dir), "--data", str(text), "--out", str(out), "--seq-len", "16",
            "--max-tokens", "128", "--seqs-per-chunk", "2", "--json", "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["sequences"] == 8 and summary["compression_ratio"] > 0
    return out


def copy_store(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_info_reports_contents_and_provenance(built):
    r = run("info", str(built))
    assert r.returncode == 0, r.stderr
    for needle in (
        "complete: 8 of 8 sequences",
        "LlamaForCausalLM",
        "bf16-zstd",
        "resid",
        "bytes/token/layer",
    ):
        assert needle in r.stdout
    info = json.loads(run("info", str(built), "--json").stdout)
    assert info["arrays"]["resid"]["shape"] == [4, 8, 16, 64]
    assert info["bytes_per_token_per_layer"] > 0


def flip_byte(chunk: Path) -> None:
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))


def test_verify_clean_store_exits_zero(built):
    r = run("verify", str(built))
    assert r.returncode == 0 and "clean" in r.stdout


def test_flipped_byte_is_named_by_verify_and_reader(built, tmp_path):
    store = copy_store(built, tmp_path / "bad.zarr")
    flip_byte(store / "resid" / "c" / "2" / "1" / "0" / "0")
    r = run("verify", str(store))
    assert r.returncode == 1
    assert "array 'resid': chunk (2, 1, 0, 0) is corrupt" in r.stdout
    with pytest.raises(StoreError, match=r"array 'resid': chunk \(2, 1, 0, 0\)"):
        open_store(store).resid(2, slice(0, 8))
    # other layers still read fine
    assert open_store(store).resid(1).shape == (8, 16, 64)


def test_truncated_chunk_and_missing_chunk(built, tmp_path):
    store = copy_store(built, tmp_path / "trunc.zarr")
    chunk = store / "tokens" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:10])
    (store / "resid" / "c" / "0" / "3" / "0" / "0").unlink()
    report = verify_store(store)
    assert not report.ok
    text = "\n".join(report.problems)
    assert "array 'tokens': chunk (0, 0) is corrupt" in text
    assert "array 'resid': chunk (0, 3, 0, 0) is missing" in text


def test_newer_schema_and_broken_metadata_are_refused(built, tmp_path):
    newer = copy_store(built, tmp_path / "newer.zarr")
    meta = json.loads((newer / "zarr.json").read_text())
    meta["attributes"]["lenscache"]["schema_version"] = 99
    (newer / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="schema version 99, newer"):
        open_store(newer)

    truncated = copy_store(built, tmp_path / "trunc-meta.zarr")
    raw = (truncated / "zarr.json").read_text()
    (truncated / "zarr.json").write_text(raw[: len(raw) // 2])
    with pytest.raises(StoreError, match="not a lenscache store"):
        open_store(truncated)
    r = run("verify", str(truncated))
    assert r.returncode == 1


def test_unsafe_codec_is_refused_before_reading(built, tmp_path):
    store = copy_store(built, tmp_path / "pickle.zarr")
    arr_meta = store / "logsumexp" / "zarr.json"
    meta = json.loads(arr_meta.read_text())
    meta["codecs"].insert(1, {"name": "numcodecs.pickle", "configuration": {}})
    arr_meta.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="pickle"):
        open_store(store)


def test_object_dtype_is_refused(built, tmp_path):
    store = copy_store(built, tmp_path / "strings.zarr")
    g = zarr.open_group(store, mode="r+")
    g.create_array("notes", shape=(2,), dtype=str)
    with pytest.raises(StoreError, match="non-numeric dtype"):
        open_store(store)


def test_cli_errors_are_clear_and_nonzero(tmp_path, llama_dir):
    r = run("info", str(tmp_path / "nope.zarr"))
    assert r.returncode == 2 and "error: no store at" in r.stderr and "Traceback" not in r.stderr
    r = run(
        "build", "--model", str(tmp_path / "no-such-model"), "--data", "x.txt", "--out", str(tmp_path / "o")
    )
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
    r = run(
        "build",
        "--model",
        str(llama_dir),
        "--data",
        str(tmp_path / "missing.txt"),
        "--out",
        str(tmp_path / "o"),
        "--seq-len",
        "16",
    )
    assert r.returncode == 2 and "missing.txt" in r.stderr
    assert not (tmp_path / "o").exists()
    r = run("build", "--out", str(tmp_path / "o"), "--layers", "a-b")
    assert r.returncode == 2 and "cannot parse" in r.stderr


def test_reader_values_match_raw_bits(built):
    store = open_store(built)
    raw = store.arrays["resid"][1, :2]
    decoded = store.resid(1, slice(0, 2))
    np.testing.assert_array_equal((raw.astype(np.uint32) << 16).view(np.float32), decoded)


def test_fit_and_eval_name_a_corrupt_chunk(built, tmp_path):
    store = copy_store(built, tmp_path / "bad-fit.zarr")
    flip_byte(store / "resid" / "c" / "2" / "1" / "0" / "0")
    for args in (
        ("fit", str(store), "--out", str(tmp_path / "lens"), "--lens", "affine"),
        ("fit", str(store), "--out", str(tmp_path / "lens2"), "--lens", "tuned", "--no-progress"),
        ("eval", str(store), "--split", "all", "--out", str(tmp_path / "report"), "--no-progress"),
    ):
        r = run(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "array 'resid': chunk (2, 1, 0, 0) is corrupt" in r.stderr, (args, r.stderr)
    assert not (tmp_path / "lens" / "lens.json").exists() and not (tmp_path / "report").exists()
