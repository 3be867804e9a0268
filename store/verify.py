"""`verify_store`: read every chunk (checksums), and check shapes and metadata against the schema."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import zarr

from .errors import StoreError
from .reader import Store
from .schema import (
    DIMS,
    FINAL_EXACT,
    FINAL_LO,
    HEAD,
    LOGITS,
    LOGSUMEXP,
    RESID,
    TOKENS,
    TOPK_IDS,
    TOPK_LOGPROBS,
)


@dataclass
class VerifyReport:
    url: str
    problems: list[str] = field(default_factory=list)
    chunks_checked: int = 0
    arrays_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _expected_shapes(store: Store) -> dict[str, tuple[int, ...]]:
    m = store.meta
    n, t, d = m.n_sequences, m.seq_len, m.d_model
    shapes = {TOKENS: (n, t), RESID: (len(m.layers), n, t, d), LOGSUMEXP: (n, t)}
    if m.final["encoding"] == "lo16":
        shapes[FINAL_LO] = (n, t, d)
    elif m.final["encoding"] == "float32":
        shapes[FINAL_EXACT] = (n, t, d)
    if m.final["topk"]:
        shapes[TOPK_IDS] = shapes[TOPK_LOGPROBS] = (n, t, m.final["topk"])
    if m.final["full_logits"]:
        shapes[LOGITS] = (n, t, m.vocab_size)
    return shapes


def _committed_chunk_rows(arr: zarr.Array, name: str, committed: int) -> int:
    """How many chunk rows along the sequence axis hold committed sequences."""
    axis = 1 if name == RESID else 0
    return -(-committed // arr.chunks[axis])


def verify_store(url: str | os.PathLike) -> VerifyReport:
    """Check a store completely. Opening problems are reported, not raised."""
    report = VerifyReport(str(url))
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
    expected = _expected_shapes(store)
    for name, shape in expected.items():
        arr = store.arrays.get(name)
        if arr is None:
            report.problems.append(f"array {name!r} is missing")
            continue
        if tuple(arr.shape) != shape:
            report.problems.append(f"array {name!r} has shape {tuple(arr.shape)}, metadata implies {shape}")
        if tuple(arr.metadata.dimension_names or ()) != DIMS[name]:
            report.problems.append(f"array {name!r} has dimension names {arr.metadata.dimension_names}")
    head_expected = {"unembed"}
    if meta.head.norm != "none":
        head_expected.add("norm_weight")
    if meta.head.has_norm_bias:
        head_expected.add("norm_bias")
    if meta.head.has_proj_out:
        head_expected.add("proj_out")
    if meta.head.has_unembed_bias:
        head_expected.add("unembed_bias")
    for name in sorted(head_expected):
        if f"{HEAD}/{name}" not in store.arrays:
            report.problems.append(f"head array {name!r} is missing")

    for name, arr in store.arrays.items():
        report.arrays_checked += 1
        keys = store.chunk_keys(name)
        per_seq = name in expected
        seq_axis = 1 if name == RESID else 0
        rows_needed = _committed_chunk_rows(arr, name, meta.committed) if per_seq else None
        for coords in np.ndindex(*arr.cdata_shape):
            key = f"{name}/c/" + "/".join(map(str, coords))
            if key not in keys:
                # chunks past the committed rows may legitimately not exist yet
                if not per_seq or coords[seq_axis] < rows_needed:
                    report.problems.append(f"array {name!r}: chunk {coords} is missing")
                continue
            try:
                arr.get_block_selection(coords)
                report.chunks_checked += 1
            except Exception as exc:
                report.problems.append(f"array {name!r}: chunk {coords} is corrupt ({exc})")
    if TOKENS in store.arrays and meta.committed and not any(TOKENS in p for p in report.problems):
        tokens = store.tokens()
        if tokens.min() < 0 or tokens.max() >= meta.vocab_size:
            report.problems.append(f"tokens outside [0, {meta.vocab_size})")
    return report
