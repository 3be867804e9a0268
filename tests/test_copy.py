"""`lenscache copy`: subsets equal the source's slice bit for bit, re-encoding stays within the preset's
bound, a killed copy resumes to an identical store, local <-> S3 both ways (a real S3 server on
loopback, tests/s3_server.py), and bad input is refused before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest
from s3_server import run_many, s3_server

from lenscache.cache.build import BuildConfig, build_store
from lenscache.cache.model import ModelSpec
from lenscache.cache.text import DataSpec
from lenscache.encoding import get_preset
from lenscache.errors import ResumeMismatch, SelectionError, StoreError
from lenscache.lock import LOCK_NAME
from lenscache.reader import open_store
from lenscache.tools.cli import main
from lenscache.tools.copy_store import CopyConfig, copy_store, source_fingerprint
from lenscache.verify import verify_store

CLI = [sys.executable, "-m", "lenscache.tools.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
ENV.pop("LENSCACHE_CRASH_AT", None)
N_SEQ, N_LAYERS = 10, 3  # the tiny llama has 3 blocks: boundaries 0..3


@pytest.fixture(scope="module")
def source(llama_dir, text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("copy_src") / "src.zarr"
    build_store(BuildConfig(out=str(out), model=ModelSpec(str(llama_dir)), data=DataSpec(str(text_file)),
                            seq_len=16, max_tokens=16 * N_SEQ, seqs_per_chunk=2, batch_size=2, progress=False))  # fmt: skip
    return out


def files(url: str | Path) -> dict[str, bytes]:
    """Every file of a store (local or URL) by its path inside the store; not the temporary file of a
    chunk whose write a kill cut short (it never replaced the chunk, as in tests/test_reliability.py)."""
    fs, root = fsspec.core.url_to_fs(str(url))
    root = root.rstrip("/")
    return {p[len(root) + 1 :]: fs.cat_file(p) for p in fs.find(root) if not p.endswith(".partial")}


def same_store(a, b) -> None:
    """Byte-identical chunk files; metadata equal but for the times it was written."""
    fa, fb = files(a), files(b)
    assert sorted(fa) == sorted(fb)
    assert [k for k in fa if k != "zarr.json" and fa[k] != fb[k]] == []
    ma, mb = open_store(a).meta.to_dict(), open_store(b).meta.to_dict()
    for m in (ma, mb):
        m["created"] = m["build"]["started"] = m["build"]["finished"] = None
    assert ma == mb


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run the CLI in this process: (exit code, stderr, stdout)."""
    capsys.readouterr()
    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def test_full_copy_is_the_source_bit_for_bit(source, tmp_path):
    dst = tmp_path / "copy.zarr"
    summary = copy_store(CopyConfig(str(source), str(dst), progress=False))
    assert summary.n_sequences == summary.copied == N_SEQ
    assert verify_store(dst).ok
    fa, fb = files(source), files(dst)
    assert sorted(fa) == sorted(fb) and [k for k in fa if k != "zarr.json" and fa[k] != fb[k]] == []
    src, out = open_store(source), open_store(dst)
    assert out.meta.data["fingerprint"] == src.meta.data["fingerprint"]  # the same tokens
    copied = out.meta.data["copied_from"]
    assert copied["url"] == str(source) and copied["seqs"] == [0, N_SEQ] and copied["layers"] == src.layers
    assert copied["fingerprint"] == source_fingerprint(src)
    assert copied["fingerprint"]["metadata_sha256"].startswith("sha256:")


@pytest.mark.parametrize("layers", [[0, 2], [1, N_LAYERS]])
def test_subset_equals_the_sources_slice(source, tmp_path, capsys, layers):
    dst = tmp_path / "sub.zarr"
    code, err, out = cli(capsys, "copy", str(source), str(dst), "--layers", ",".join(map(str, layers)), "--seqs", "3:8")
    assert code == 0, err
    assert "lenscache copy" in err  # the progress bar
    src, out = open_store(source), open_store(dst)
    assert verify_store(dst).ok and out.n_sequences == 5 and out.layers == layers
    rows = slice(3, 8)
    for b in layers:
        np.testing.assert_array_equal(out.resid(b), src.resid(b, rows))
        np.testing.assert_array_equal(out.resid_raw(b), src.resid_raw(b, rows))
    np.testing.assert_array_equal(out.tokens(), src.tokens(rows))
    np.testing.assert_array_equal(out.final_resid(), src.final_resid(rows))  # exact, kept or not in --layers
    np.testing.assert_array_equal(out.logsumexp(), src.logsumexp(rows))
    for x, y in zip(out.topk(), src.topk(rows), strict=True):
        np.testing.assert_array_equal(x, y)
    assert (out.final_logprobs() - src.final_logprobs(rows)).abs().max().item() == 0
    assert out.meta.data["fingerprint"] != src.meta.data["fingerprint"]  # other tokens, another fingerprint
    assert out.meta.data["copied_from"]["seqs"] == [3, 8]
    assert out.tokenizer().decode([int(t) for t in out.tokens()[0]]) == src.tokenizer().decode(
        [int(t) for t in src.tokens(rows)[0]]
    )


def _within_bound(preset_name: str, x: np.ndarray, y: np.ndarray) -> bool:
    """|x - y| within what the preset declares (tests/test_codecs.py states the same bounds)."""
    p = get_preset(preset_name)
    if p.quant == "block":
        blocks = np.abs(x).reshape(*x.shape[:-1], -1, p.block).max(-1, keepdims=True)
        limit = np.repeat(blocks / (2 * (2 ** (p.bits - 1) - 1)) * (1 + 2**-7), p.block, axis=-1).reshape(x.shape)
        return bool(np.all(np.abs(x - y) <= limit + 1e-30))
    bound = p.error_bound()
    return bool(np.all(np.abs(x - y) <= bound["value"] * np.maximum(np.abs(x), bound["floor"])))


@pytest.mark.parametrize("codec", ["int8b32-zstd", "bf16r3-zstd"])
def test_reencoded_copy_reads_back_within_the_presets_bound(source, tmp_path, codec):
    dst = tmp_path / f"{codec}.zarr"
    copy_store(CopyConfig(str(source), str(dst), codec=codec, progress=False))
    src, out = open_store(source), open_store(dst)
    assert verify_store(dst).ok and out.codec == codec and out.meta.storage == get_preset(codec).storage_meta()
    for b in range(N_LAYERS):
        x, y = src.resid(b), out.resid(b)
        assert not np.array_equal(x, y)  # it was re-encoded
        assert _within_bound(codec, x, y), b
    # the final distribution stays exact whatever the preset
    np.testing.assert_array_equal(out.final_resid(), src.final_resid())
    # and copying the re-encoded store again without --codec keeps its values as stored, bit for bit
    again = tmp_path / "again.zarr"
    copy_store(CopyConfig(str(dst), str(again), progress=False))
    fa, fb = files(dst), files(again)
    assert [k for k in fa if k != "zarr.json" and fa[k] != fb.get(k)] == []


@pytest.mark.parametrize("point", ["after-layout", "after-chunk:7"])
def test_killed_copy_resumes_to_an_identical_store(source, tmp_path, capsys, point):
    clean, dst = tmp_path / "clean.zarr", tmp_path / "killed.zarr"
    args = [str(source), "--layers", "0,1,3", "--seqs", "1:9", "--no-progress"]
    copy_store(CopyConfig(str(source), str(clean), layers=[0, 1, 3], seqs=(1, 9), progress=False))
    r = subprocess.run([*CLI, "copy", args[0], str(dst), *args[1:]], env={**ENV, "LENSCACHE_CRASH_AT": point},
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == -9, r.stderr
    assert not verify_store(dst).ok  # not a valid store before the end
    partial = open_store(dst)
    n = partial.n_sequences
    assert n < 8 and partial.meta.build.status in ("initializing", "building")
    if n:  # a reader of the partial copy sees only committed rows, and they are the source's
        np.testing.assert_array_equal(partial.resid(1), open_store(source).resid(1, slice(1, 1 + n)))
    with pytest.raises(SelectionError):
        partial.tokens(slice(0, n + 1))
    # the same command without --resume is refused; with it, the copy finishes (the subset is recorded)
    code, err, out = cli(capsys, "copy", args[0], str(dst), *args[1:])
    assert code == 2 and "--resume" in err
    code, err, out = cli(capsys, "copy", args[0], str(dst), "--resume", "--no-progress")
    assert code == 0, err
    # it continues from the committed count (after-chunk:7 is in the second row: 2 sequences committed)
    assert (f"resumed at sequence {n}" in out) == (n > 0) and n == (2 if point == "after-chunk:7" else 0), out
    assert verify_store(dst).ok
    same_store(dst, clean)


def test_resume_with_other_settings_is_refused(source, tmp_path):
    dst = tmp_path / "d.zarr"
    copy_store(CopyConfig(str(source), str(dst), seqs=(0, 4), progress=False))
    before = files(dst)
    with pytest.raises(ResumeMismatch, match="codec"):
        copy_store(CopyConfig(str(source), str(dst), seqs=(0, 4), codec="fp32-zstd", resume=True, progress=False))
    assert files(dst) == before


def test_bad_input_is_refused_and_leaves_nothing(source, tmp_path, capsys):
    before = files(source)
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    existing = tmp_path / "existing.zarr"
    copy_store(CopyConfig(str(source), str(existing), seqs=(0, 2), progress=False))
    existing_files = files(existing)
    cases = [
        ([str(source), str(source)], "onto itself"),
        ([str(source), str(source) + "/"], "onto itself"),
        ([str(source), str(source / "inner.zarr")], "inside the source"),
        ([str(source), str(source.parent)], "around the source"),
        ([str(source), str(tmp_path / "a.zarr"), "--seqs", "4:11"], "outside the source's committed sequences 0:10"),
        ([str(source), str(tmp_path / "a.zarr"), "--seqs", "5:5"], "selects no sequence"),
        ([str(source), str(tmp_path / "a.zarr"), "--layers", "0,7"], r"layers (--layers) [7] are not in the source"),
        ([str(source), str(tmp_path / "a.zarr"), "--seqs", "5"], "use A:B"),
        ([str(tmp_path / "nothing.zarr"), str(tmp_path / "a.zarr")], "no store at"),
        ([str(source), str(other)], "not a lenscache store"),
        ([str(source), str(existing)], "--resume"),
        ([str(source), str(existing), "--resume", "--overwrite"], "exclude each other"),
    ]
    for argv, expected in cases:
        code, err, out = cli(capsys, "copy", *argv, "--no-progress")
        assert code == 2, (argv, err)
        # one line naming the problem (click's usage errors put theirs after the usage)
        assert expected in err.strip().splitlines()[-1] and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "a.zarr").exists() and not (source / "inner.zarr").exists()
    assert files(source) == before
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    assert files(existing) == existing_files
    with pytest.raises(StoreError, match="onto itself"):
        copy_store(CopyConfig(str(source), f"file://{source}", progress=False))


# ---- between local disks and S3 ------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        server.make_bucket("copies")
        yield server


def test_copy_local_to_s3_and_back(source, tmp_path, s3):
    url = "s3://copies/up.zarr"
    with s3.as_identity("writer"):
        copy_store(CopyConfig(str(source), url, seqs=(2, 10), layers=[0, 3], progress=False))
        assert verify_store(url).ok
        local_copy = tmp_path / "local.zarr"
        copy_store(CopyConfig(str(source), str(local_copy), seqs=(2, 10), layers=[0, 3], progress=False))
        same_store(url, local_copy)  # the same store, whichever side it was written to
    # back down with read-only credentials (a copy only reads its source), and refused the other way
    mark = len(s3.requests())
    objects = s3.objects("copies")
    down = tmp_path / "down.zarr"
    (code, out, err), (up_code, _, up_err) = run_many(
        s3.env("reader", ENV),
        ["copy", url, str(down), "--no-progress", "--json"],
        ["copy", str(source), "s3://copies/ro.zarr", "--no-progress"],
    )
    assert code == 0, err
    assert json.loads(out)["n_sequences"] == 8
    # read-only credentials cannot copy *into* the bucket: one clear line at the lock's create, nothing written
    assert up_code == 2 and "does not let these credentials write" in up_err, up_err
    assert len(up_err.strip().splitlines()) == 1
    assert s3.writes_since(mark) == [("PUT", 403, f"/copies/ro.zarr/{LOCK_NAME}")]
    assert s3.objects("copies") == objects
    with s3.as_identity("writer"):
        fa, fb = files(url), files(down)
        assert [k for k in fa if k != "zarr.json" and fa[k] != fb.get(k)] == [] and sorted(fa) == sorted(fb)
        assert open_store(down).meta.data["copied_from"]["url"] == url
        np.testing.assert_array_equal(open_store(down).resid(3), open_store(source).resid(3, slice(2, 10)))
