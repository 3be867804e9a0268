"""write_whole_chunks stores exactly the bytes zarr would, and leaves to zarr what it cannot write whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, BytesCodec, ZstdCodec

from lenscache.cache.chunk_writer import RegionWrite, write_whole_chunks
from lenscache.encoding import compressors

SHAPE, CHUNKS = (3, 8, 6, 5), (1, 4, 3, 5)


def _values(dtype: str, shape, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return (rng.standard_normal(shape) * 3).astype(dtype)
    return rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)


def _pair(root: Path, dtype: str, codecs) -> tuple[zarr.Array, zarr.Array]:
    """Two arrays with identical metadata in one local group: 'zarr' and 'ours'."""
    group = zarr.open_group(root, mode="w")
    kw = dict(shape=SHAPE, chunks=CHUNKS, dtype=dtype, serializer=BytesCodec(endian="little"),
              compressors=codecs, fill_value=0, config={"write_empty_chunks": True})  # fmt: skip
    return group.create_array("zarr", **kw), group.create_array("ours", **kw)


def _chunk_files(root: Path, name: str) -> dict[str, bytes]:
    base = root / name
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("c/**/*")) if p.is_file()}


@pytest.mark.parametrize(
    "dtype,codecs",
    [
        ("uint16", compressors(2)),  # bf16 carrier: byte shuffle, typesize 2 (the default preset)
        ("float32", compressors(4, clevel=3)),
        ("int8", compressors(1)),  # no shuffle
        ("float16", compressors(2, bitshuffle=True)),
    ],
)
def test_whole_chunk_writes_store_the_same_bytes_as_zarr(tmp_path, dtype, codecs):
    ref, ours = _pair(tmp_path, dtype, codecs)
    block = _values(dtype, (3, 4, 6, 5))  # sequences 4..8 of every layer: six whole chunks
    ref[:, 4:8] = block
    rest = write_whole_chunks([RegionWrite(ours, (0, 4, 0, 0), block)])
    assert rest == []
    written = _chunk_files(tmp_path, "ours")
    assert len(written) == 6
    assert written == _chunk_files(tmp_path, "zarr")
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "ours", mode="r")[:, 4:8], block)


def test_regions_that_are_not_whole_chunks_are_handed_back_unwritten(tmp_path):
    _, ours = _pair(tmp_path, "uint16", compressors(2))
    cases = [
        RegionWrite(ours, (0, 2, 0, 0), _values("uint16", (3, 4, 6, 5))),  # not chunk-aligned
        RegionWrite(ours, (0, 4, 0, 0), _values("uint16", (3, 2, 6, 5))),  # part of a chunk
        RegionWrite(ours, (0, 4, 0, 0), _values("float32", (3, 4, 6, 5))),  # another dtype
        RegionWrite(ours, (0, 4, 0), _values("uint16", (3, 4, 6))),  # wrong rank
    ]
    assert write_whole_chunks(cases) == cases
    assert _chunk_files(tmp_path, "ours") == {}


def test_arrays_with_other_codecs_are_left_to_zarr(tmp_path):
    group = zarr.open_group(tmp_path, mode="w")
    plain = group.create_array(
        "zstd", shape=(8, 4), chunks=(4, 4), dtype="float32", compressors=[ZstdCodec()]
    )
    lz4 = group.create_array("lz4", shape=(8, 4), chunks=(4, 4), dtype="float32",
                             compressors=[BloscCodec(cname="lz4", shuffle=BloscShuffle.shuffle)])  # fmt: skip
    skips_empty = group.create_array("skips", shape=(8, 4), chunks=(4, 4), dtype="float32",
                                     config={"write_empty_chunks": False})  # fmt: skip
    block = _values("float32", (8, 4))
    writes = [RegionWrite(a, (0, 0), block) for a in (plain, lz4, skips_empty)]
    # zstd alone; blosc without a crc32c; an array that leaves all-fill chunks unwritten
    assert write_whole_chunks(writes) == writes
    assert not any((tmp_path / name / "c").exists() for name in ("zstd", "lz4", "skips"))


def test_writes_through_an_fsspec_store_and_reads_back():
    group = zarr.open_group("memory://chunk-writer-test.zarr", mode="w")
    arr = group.create_array("resid", shape=SHAPE, chunks=CHUNKS, dtype="uint16",
                             serializer=BytesCodec(endian="little"), compressors=compressors(2), fill_value=0,
                             config={"write_empty_chunks": True})  # fmt: skip
    block = _values("uint16", SHAPE, seed=3)
    assert write_whole_chunks([RegionWrite(arr, (0, 0, 0, 0), block)]) == []
    again = zarr.open_group("memory://chunk-writer-test.zarr", mode="r")["resid"]
    np.testing.assert_array_equal(again[...], block)
