"""A store someone else wrote is safe to open: symbolic links, absurd declared shapes, chunks that
declare a huge decompressed size, and lenses with non-finite weights are all refused, clearly.

Links point at a FIFO outside the store where it matters that the target is never opened: opening a
FIFO for reading blocks until a writer comes, so a reader that follows the link hangs (the child
process's timeout is a hang detector, not a timing assertion; permissions would not stop root)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import google_crc32c
import numcodecs.zstd
import numpy as np
import pytest
import torch
from numcodecs import Blosc

from lenscache.cache.build import BuildConfig, build_store
from lenscache.cache.model import ModelSpec
from lenscache.cache.text import DataSpec
from lenscache.errors import LensError, StoreError
from lenscache.fit.lens import Lens
from lenscache.guard import ChunkRule, check_chunk, safe_reason
from lenscache.reader import open_store
from lenscache.tools.inspect_store import describe, render
from lenscache.verify import verify_store

CLI = [sys.executable, "-m", "lenscache.tools.cli"]
SECRET = "TOP-SECRET-6f1d2a"
HANG = 120  # seconds: only a reader that blocks on a FIFO gets anywhere near this
GiB = 1 << 30


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=HANG)


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, timeout=HANG
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory, llama_dir, text_file) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "s.zarr"
    build_store(BuildConfig(out=str(out), model=ModelSpec(str(llama_dir)), data=DataSpec(str(text_file)),
                            seq_len=16, max_tokens=128, seqs_per_chunk=2, progress=False))  # fmt: skip
    return out


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def with_crc(data: bytes) -> bytes:
    return data + np.uint32(google_crc32c.value(data)).tobytes()


def blosc_zeros(nbytes: int, typesize: int) -> bytes:
    """A real blosc chunk (zstd, as lenscache writes) of `nbytes` zeros with a valid crc32c: a few KiB
    that decompress to `nbytes`. The zeros are calloc'd pages, never touched, so this costs no RAM."""
    codec = Blosc("zstd", 1, Blosc.SHUFFLE, blocksize=1 << 20, typesize=typesize)
    return with_crc(bytes(codec.encode(np.zeros(nbytes, dtype=np.uint8))))


# ---- symbolic links and special files --------------------------------------------------------------
# member in the store -> what it links to: a file, or a directory (a copy of the subtree it replaces)
PLACEMENTS = {
    "chunk": "resid/c/1/0/0/0",
    "array zarr.json": "logsumexp/zarr.json",
    "root zarr.json": "zarr.json",
    "directory": "resid/c/2",
}


def plant_link(store: Path, member: str, outside: Path, leaf: str) -> None:
    """Replace `member` with a link to `outside`, whose files are all `leaf` ('fifo' or 'secret')."""
    target = store / member

    def make(path: Path) -> None:
        if leaf == "fifo":
            os.mkfifo(path)
        else:
            path.write_text(SECRET * 100)

    if target.is_dir():
        shutil.copytree(target, outside)
        for path in [p for p in outside.rglob("*") if p.is_file()]:
            path.unlink()
            make(path)
        shutil.rmtree(target)
    else:
        make(outside)
        target.unlink()
    target.symlink_to(outside)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_links_are_refused_by_every_command_and_name_the_link(built, tmp_path, placement):
    member = PLACEMENTS[placement]
    store = copy_store(built, tmp_path / "s.zarr")
    plant_link(store, member, tmp_path / "outside", "secret")
    with pytest.raises(StoreError, match=f"symbolic link at '{member}'"):
        open_store(store)  # at open, before any chunk is read
    for command in ("verify", "info"):
        r = run(command, str(store))
        out = r.stdout + r.stderr
        assert r.returncode != 0, (command, out)
        assert f"symbolic link at '{member}'" in out, (command, out)
        assert SECRET not in out and "Traceback" not in out, (command, out)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_the_target_of_a_link_is_never_opened(built, tmp_path, placement):
    """The link points at a FIFO: open_store, verify and info would hang on opening it."""
    store = copy_store(built, tmp_path / "s.zarr")
    plant_link(store, PLACEMENTS[placement], tmp_path / "outside", "fifo")
    r = run_python(
        """
        import sys
        from lenscache.errors import StoreError
        from lenscache.reader import open_store
        from lenscache.tools.inspect_store import describe
        from lenscache.verify import verify_store
        for call in (open_store, describe):
            try:
                call(sys.argv[1])
                print("OPENED")
            except StoreError as exc:
                print("refused:", exc)
        print("verify:", verify_store(sys.argv[1]).problems)
        """,
        str(store),
    )
    assert r.returncode == 0, r.stderr
    assert "OPENED" not in r.stdout and r.stdout.count("symbolic link") == 3, r.stdout


def test_a_link_swapped_in_after_open_is_refused_by_the_read_path(built, tmp_path):
    """The open-time walk passed; the chunk's directory then becomes a link to a FIFO-filled copy."""
    store = copy_store(built, tmp_path / "s.zarr")
    r = run_python(
        """
        import os, shutil, sys
        from pathlib import Path
        from lenscache.errors import StoreError
        from lenscache.reader import open_store
        store, outside = Path(sys.argv[1]), Path(sys.argv[2])
        s = open_store(store)
        shutil.copytree(store / "resid/c/1", outside)
        (outside / "0/0/0").unlink()
        os.mkfifo(outside / "0/0/0")
        shutil.rmtree(store / "resid/c/1")
        (store / "resid/c/1").symlink_to(outside)
        try:
            s.resid(1)
            print("READ")
        except StoreError as exc:
            print("refused:", exc)
        print("layer 0 still reads:", s.resid(0).shape)
        """,
        str(store),
        str(tmp_path / "outside"),
    )
    assert r.returncode == 0, r.stderr
    assert "refused:" in r.stdout and "symbolic link at 'resid/c/1'" in r.stdout, r.stdout
    assert "layer 0 still reads: (8, 16, 64)" in r.stdout


def test_a_writer_lock_that_is_a_link_is_refused_without_opening_it(built, tmp_path):
    """The writer lock is read before the store is opened (verify and info report it): it gets the same care."""
    store = copy_store(built, tmp_path / "s.zarr")
    os.mkfifo(tmp_path / "fifo")
    (store / "lenscache.lock").symlink_to(tmp_path / "fifo")
    for command in ("verify", "info"):
        r = run(command, str(store))
        out = r.stdout + r.stderr
        assert r.returncode != 0 and "symbolic link at 'lenscache.lock'" in out, (command, out)
        assert "Traceback" not in out


def test_a_fifo_inside_the_store_is_refused_without_opening_it(built, tmp_path):
    store = copy_store(built, tmp_path / "s.zarr")
    (store / "tokens/c/0/0").unlink()
    os.mkfifo(store / "tokens/c/0/0")
    r = run("verify", str(store))
    assert r.returncode == 1 and "'tokens/c/0/0', which is neither a regular file" in r.stdout, r.stdout


# ---- declared shapes -------------------------------------------------------------------------------
def _absurd_tokens_shape(store: Path) -> str:
    edit_json(store / "tokens/zarr.json", lambda m: m.update(shape=[10**12, 16]))
    return "array 'tokens' declares shape (1000000000000, 16), but the store metadata implies (8, 16)"


def _absurd_width(store: Path) -> str:
    edit_json(store / "resid/zarr.json", lambda m: m.update(shape=[4, 8, 16, 10**10]))
    return (
        "array 'resid' declares shape (4, 8, 16, 10000000000), but the store metadata implies (4, 8, 16, 64)"
    )


def _absurd_head(store: Path) -> str:
    edit_json(store / "head/unembed/zarr.json", lambda m: m.update(shape=[2**40, 64]))
    return f"array 'head/unembed' declares shape ({2**40}, 64), but the store metadata implies (384, 64)"


def _absurd_metadata(store: Path) -> str:
    """Metadata and every shape agree on an absurd number of sequences: the plausibility bound."""
    n = 2**37  # under the bound on sequences, but n * seq_len is over the bound on tokens
    edit_json(store / "zarr.json", lambda m: m["attributes"]["lenscache"].update(n_sequences=n))
    for name, axis in (("tokens", 0), ("resid", 1), ("final_lo", 0), ("topk_ids", 0), ("topk_logprobs", 0),
                       ("logsumexp", 0)):  # fmt: skip
        edit_json(store / name / "zarr.json", lambda m, axis=axis: m["shape"].__setitem__(axis, n))
    return f"store metadata declares {n} sequences of 16 tokens, more than lenscache accepts"


def _absurd_chunk(store: Path) -> str:
    edit_json(
        store / "tokens/zarr.json", lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[2**30, 16])
    )
    return "array 'tokens' declares chunks of shape (1073741824, 16) (68,719,476,736 bytes)"


@pytest.mark.parametrize(
    "tamper", [_absurd_tokens_shape, _absurd_width, _absurd_head, _absurd_metadata, _absurd_chunk]
)
def test_absurd_declared_sizes_are_refused_at_open(built, tmp_path, tamper):
    store = copy_store(built, tmp_path / "s.zarr")
    expected = tamper(store)
    with pytest.raises(StoreError) as info:
        open_store(store)
    assert expected in str(info.value)
    r = run("verify", str(store))
    assert r.returncode == 1 and expected in r.stdout and "Traceback" not in r.stdout + r.stderr, (
        r.stdout + r.stderr
    )
    r = run("info", str(store))
    assert r.returncode == 2 and expected in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---- chunks that declare a huge decompressed size --------------------------------------------------
def test_a_chunk_declaring_a_huge_size_is_refused_before_decompressing(built, tmp_path, monkeypatch):
    store = copy_store(built, tmp_path / "s.zarr")
    (store / "resid/c/0/0/0/0").write_bytes(blosc_zeros(GiB, typesize=2))
    declared = []  # the nbytes in the header of every blosc buffer handed to blosc to decompress
    real = Blosc.decode

    def spy(self, buf, out=None):
        declared.append(int(np.frombuffer(bytes(buf)[4:8], dtype="<u4")[0]))
        return real(self, buf, out)

    monkeypatch.setattr(Blosc, "decode", spy)
    s = open_store(store)
    with pytest.raises(StoreError, match=r"array 'resid': chunk \(0, 0, 0, 0\).*declares 1,073,741,824 "
                                         r"decompressed bytes where its chunk holds 4,096"):  # fmt: skip
        s.resid(0)
    assert declared and GiB not in declared, declared  # other chunks decompressed, never the hostile one
    assert s.resid(1).shape == (8, 16, 64)
    report = verify_store(store)
    assert [p for p in report.problems if "chunk (0, 0, 0, 0)" in p and "refused before decompressing" in p]


def gzip(data: bytes) -> bytes:
    z = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return z.compress(data) + z.flush()


def zstd_without_size(frame: bytes) -> bytes:
    """The same zstd frame with its header rewritten to declare no content size (RFC 8878 3.1.1.1)."""
    descriptor = frame[4]
    assert descriptor & 0b00011111 == 0b00000  # numcodecs: no dictionary, no checksum
    single, width = (descriptor >> 5) & 1, (1, 2, 4, 8)[descriptor >> 6]
    assert single  # so the blocks follow the content size directly
    return frame[:4] + bytes([0x00, 9 << 3]) + frame[5 + width :]  # window 2^19, no content size


DECODED = 4096  # what the chunk of the rule below holds
BIG = bytes(64 * DECODED)  # what the hostile payloads decompress to
HOSTILE = {
    "blosc": ("blosc", bytes(Blosc("zstd", 1, Blosc.SHUFFLE).encode(BIG))),
    "zstd": ("zstd", bytes(numcodecs.zstd.compress(BIG, 1))),
    "zstd without a declared size": ("zstd", zstd_without_size(bytes(numcodecs.zstd.compress(BIG, 1)))),
    "gzip": ("gzip", gzip(BIG)),
    # a small first member, then a big one: gzip readers decode every member
    "gzip, two members": ("gzip", gzip(b"x") + gzip(BIG)),
    "uncompressed": (None, BIG),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_every_allowed_compressor_is_checked_against_the_chunk_size(case):
    compressor, payload = HOSTILE[case]
    if case == "zstd without a declared size":
        assert numcodecs.zstd.decompress(payload) == BIG  # a valid frame that declares nothing
    rule = ChunkRule(DECODED, compressor, crc32c=True)
    with pytest.raises(StoreError, match="refused before decompressing|does not decompress|stopped there"):
        check_chunk(rule, np.frombuffer(with_crc(payload), dtype=np.uint8), "a/c/0")
    # the same codecs at the right size pass
    exact = np.arange(DECODED, dtype=np.uint8).tobytes()
    good = {
        "blosc": bytes(Blosc("zstd", 1, Blosc.SHUFFLE).encode(exact)),
        "zstd": bytes(numcodecs.zstd.compress(exact, 1)),
        "gzip": gzip(exact[:100]) + gzip(exact[100:]),
        None: exact,
    }[compressor]
    if case == "zstd without a declared size":
        good = zstd_without_size(good)
    check_chunk(rule, np.frombuffer(with_crc(good), dtype=np.uint8), "a/c/0")


PEAK_RSS = """
    import sys
    from lenscache.errors import StoreError
    from lenscache.reader import open_store
    try:
        s = open_store(sys.argv[1])
        s.tokens()
        s.resid(0)
        print("read")
    except StoreError as exc:
        print("refused:", exc)
    # VmHWM: this process's peak since exec (ru_maxrss would include the forking parent's peak)
    status = open("/proc/self/status").read().split("VmHWM:")[1]
    print("peak_mib", int(status.split()[0]) / 1024)
"""


def _peak_mib(store: Path) -> tuple[float, str]:
    r = run_python(PEAK_RSS, str(store))
    assert r.returncode == 0, r.stderr
    return float(r.stdout.rsplit("peak_mib", 1)[1]), r.stdout


def _bomb_chunk(store: Path) -> None:
    (store / "resid/c/0/0/0/0").write_bytes(blosc_zeros(GiB, typesize=2))


def _bomb_chunk_shape(store: Path) -> None:
    # a plausible shape, a 1 GiB chunk, and a chunk that really decodes to it
    rows = GiB // (16 * 4)
    edit_json(
        store / "tokens/zarr.json", lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[rows, 16])
    )
    (store / "tokens/c/0/0").write_bytes(blosc_zeros(GiB, typesize=4))


def _bomb_array_shape(store: Path) -> None:
    # an absurd shape with chunks within the per-chunk bound (256 MiB), whose first chunk is real
    rows = (256 << 20) // (16 * 4)
    edit_json(store / "tokens/zarr.json", lambda m: m.update(shape=[rows, 16]))
    edit_json(
        store / "tokens/zarr.json", lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[rows, 16])
    )
    (store / "tokens/c/0/0").write_bytes(blosc_zeros(256 << 20, typesize=4))


@pytest.fixture(scope="module")
def clean_peak(built) -> float:
    peak, out = _peak_mib(built)
    assert "read" in out, out
    return peak


@pytest.mark.parametrize("tamper", [_bomb_chunk, _bomb_chunk_shape, _bomb_array_shape])
def test_reading_a_hostile_store_stays_within_100_mb_of_a_clean_one(built, tmp_path, clean_peak, tamper):
    """Peak RSS of a child that opens the store and reads tokens and a layer (a memory bound)."""
    store = copy_store(built, tmp_path / "s.zarr")
    tamper(store)
    hostile, out = _peak_mib(store)
    assert "refused:" in out, out
    assert hostile - clean_peak < 100, (clean_peak, hostile, out)


# ---- messages never echo chunk bytes ---------------------------------------------------------------
def test_error_messages_never_echo_chunk_bytes(built, tmp_path):
    store = copy_store(built, tmp_path / "s.zarr")
    chunk = store / "tokens/c/0/0"
    data = bytearray(chunk.read_bytes())
    data[-4:] = b"\xde\xad\xbe\xef"  # zarr's checksum error quotes the stored and computed bytes
    chunk.write_bytes(bytes(data))
    r = run("verify", str(store))
    assert "array 'tokens': chunk (0, 0) is corrupt (crc32c checksum mismatch)" in r.stdout, r.stdout
    assert "\\xde" not in r.stdout and "Stored" not in r.stdout
    with pytest.raises(StoreError) as info:
        open_store(store).tokens()
    assert "\\xde" not in str(info.value) and "crc32c checksum mismatch" in str(info.value)
    assert safe_reason(ValueError("bad data b'\\x00SECRET'")) == "ValueError"
    assert safe_reason(RuntimeError("error during blosc decompression: -1")) == (
        "RuntimeError: error during blosc decompression: -1"
    )


# ---- lenses with non-finite weights -----------------------------------------------------------------
def test_a_lens_with_non_finite_weights_is_refused(built, tmp_path):
    store = open_store(built)
    lens = Lens.identity(store, [0, 1, 2], kind="tuned")
    with torch.no_grad():
        lens.weight[1, 3, :3] = float("nan")
        lens.bias[2, 0] = float("inf")
    lens.save(tmp_path / "nan-lens")
    with pytest.raises(LensError, match="lens weight for layer 1 .* has 3 non-finite values"):
        Lens.load(tmp_path / "nan-lens")
    r = run("eval", str(built), "--lens", str(tmp_path / "nan-lens"), "--out", str(tmp_path / "report"),
            "--no-plot", "--no-progress")  # fmt: skip
    assert r.returncode == 2 and "lens weight for layer 1" in r.stderr and "Traceback" not in r.stderr, (
        r.stderr
    )
    with torch.no_grad():
        lens.weight.zero_()
    lens.save(tmp_path / "inf-bias")
    with pytest.raises(LensError, match="lens bias for layer 2 .* has 1 non-finite values"):
        Lens.load(tmp_path / "inf-bias")


# ---- info: no nonsense ratios, columns never run together -------------------------------------------
def test_info_guards_its_ratios_and_keeps_columns_apart(built, tmp_path):
    store = copy_store(built, tmp_path / "s.zarr")
    edit_json(
        store / "zarr.json",
        lambda m: m["attributes"]["lenscache"]["build"].update(committed=0, status="building"),
    )
    info = describe(store)
    assert info["bytes_per_token_per_layer"] is None and info["compression_ratio_resid"] is None
    lines = render(info).splitlines()
    assert "residual    - bytes/token/layer stored (128 raw, ratio -)" in lines
    assert "final dist. - bytes/token stored" in lines
    # a long dims cell (SmolLM2's resid) next to a dtype
    info["arrays"]["resid"].update(shape=[31, 64, 512, 576], stored_bytes=0)
    text = render(info)
    row = next(line for line in text.splitlines() if line.startswith("resid "))
    assert "d_model=576  bfloat16" in row and row.rstrip().endswith("-"), row


# ---- verify walks chunk files, not the declared grid ------------------------------------------------
def test_verify_counts_missing_chunks_instead_of_listing_them_all(built, tmp_path, monkeypatch):
    import lenscache.verify as verify

    store = copy_store(built, tmp_path / "s.zarr")
    shutil.rmtree(store / "resid" / "c")
    monkeypatch.setattr(verify, "MISSING_LISTED", 3)
    problems = [p for p in verify_store(store).problems if p.startswith("array 'resid'")]
    assert problems == [
        "array 'resid': chunk (0, 0, 0, 0) is missing",
        "array 'resid': chunk (0, 1, 0, 0) is missing",
        "array 'resid': chunk (0, 2, 0, 0) is missing",
        "array 'resid': 13 more chunks are missing",
    ]
    cells = verify._cells([10**12, 16, 10**9])  # lazily: np.ndindex would need memory per axis
    assert [next(cells) for _ in range(3)] == [(0, 0, 0), (0, 0, 1), (0, 0, 2)]
