"""`verify_store`: read every chunk (checksums), and check shapes and metadata against the schema.

Shapes, dimension names and chunk sizes are checked when the store is opened (`lenscache.reader`);
a store that fails them is reported as one problem. The chunk walk costs one step per chunk file
plus a few per missing chunk, never one per cell of the declared chunk grid.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import zarr

from .errors import StoreError
from .guard import expected_shapes, safe_reason
from .lock import stale_lock_problem
from .reader import Store
from .schema import DIMS, HEAD, TOKENIZER, TOKENS
from .tokenizer import read_arrays as read_tokenizer


@dataclass
class VerifyReport:
    url: str
    problems: list[str] = field(default_factory=list)
    chunks_checked: int = 0
    arrays_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


MISSING_LISTED = 20  # missing chunks named one by one per array; the rest are counted


def _present(keys: set[str], name: str, grid: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Grid coordinates of the chunk files of `name`, in grid order (stray names are ignored)."""
    prefix, found = f"{name}/c/", []
    for key in keys:
        parts = key[len(prefix) :].split("/")
        if len(parts) == len(grid) and all(p.isdigit() for p in parts):
            coords = tuple(int(p) for p in parts)
            if all(c < g for c, g in zip(coords, grid, strict=True)):
                found.append(coords)
    return sorted(found)


def _cells(shape: list[int]) -> Iterator[tuple[int, ...]]:
    """Every cell of a grid in C order, lazily (np.ndindex and itertools.product first build a
    tuple of each axis, which for a huge declared grid is a MemoryError)."""
    if any(n <= 0 for n in shape):
        return
    index = [0] * len(shape)
    while True:
        yield tuple(index)
        for axis in reversed(range(len(shape))):
            index[axis] += 1
            if index[axis] < shape[axis]:
                break
            index[axis] = 0
        else:
            return


def verify_store(url: str | os.PathLike) -> VerifyReport:
    """Check a store completely. Opening problems are reported, not raised."""
    report = VerifyReport(str(url))
    if (stale := stale_lock_problem(url)) is not None:
        report.problems.append(stale)
    try:
        store = Store(url)
    except StoreError as exc:
        report.problems.append(str(exc))
        return report
    meta = store.meta
    if meta.build.status != "complete":
        report.problems.append(
            f"build is {meta.build.status}: {meta.committed} of {meta.n_sequences} sequences committed"
        )
    for name in expected_shapes(meta):
        if name not in store.arrays:
            _, _, short = name.partition(f"{HEAD}/")
            report.problems.append(
                f"head array {short!r} is missing" if short else f"array {name!r} is missing"
            )

    token_range = [None, None]  # min and max over the committed rows of the tokens read
    for name, arr in store.arrays.items():
        report.arrays_checked += 1
        _check_chunks(report, name, arr, store.chunk_keys(name), meta.committed, token_range)
    if meta.tokenizer is not None and not any(f"{TOKENIZER}/" in p for p in report.problems):
        try:
            read_tokenizer(store)  # its bytes against the hash in the metadata
        except StoreError as exc:
            report.problems.append(str(exc))
    low, high = token_range
    if low is not None and (low < 0 or high >= meta.vocab_size):
        report.problems.append(f"tokens outside [0, {meta.vocab_size})")
    return report


def _check_chunks(
    report: VerifyReport, name: str, arr: zarr.Array, keys: set[str], committed: int, token_range: list
) -> None:
    """Read every chunk file of one array; name the chunks missing from its committed rows."""
    grid = tuple(int(n) for n in arr.cdata_shape)
    dims = DIMS.get(name, ())
    seq_axis = dims.index("seq") if "seq" in dims else None
    needed = list(grid)
    if seq_axis is not None:
        # chunks past the committed rows may legitimately not exist yet
        needed[seq_axis] = min(grid[seq_axis], -(-committed // int(arr.chunks[seq_axis])))
    present = _present(keys, name, grid)
    for coords in present:
        try:
            block = arr.get_block_selection(coords)
            report.chunks_checked += 1
        except Exception as exc:
            report.problems.append(f"array {name!r}: chunk {coords} is corrupt ({safe_reason(exc)})")
            continue
        if name == TOKENS:
            rows = block[: max(0, committed - coords[0] * int(arr.chunks[0]))]
            if rows.size:
                low, high = int(rows.min()), int(rows.max())
                token_range[0] = low if token_range[0] is None else min(token_range[0], low)
                token_range[1] = high if token_range[1] is None else max(token_range[1], high)
    have = set(present)
    missing = math.prod(needed) - sum(all(c < n for c, n in zip(cell, needed, strict=True)) for cell in have)
    listed = 0
    for cell in _cells(needed):  # stops after MISSING_LISTED misses: steps <= chunk files + that
        if listed == min(missing, MISSING_LISTED):
            break
        if cell not in have:
            report.problems.append(f"array {name!r}: chunk {cell} is missing")
            listed += 1
    if missing > listed:
        report.problems.append(f"array {name!r}: {missing - listed:,} more chunks are missing")
