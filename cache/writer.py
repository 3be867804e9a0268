"""Writes a store: preallocates every array, writes rows of sequences by region, commits progress.

Crash safety rests on one ordering: a row's chunks are all written before the root metadata's
``committed`` count moves past it, and each chunk and metadata write is atomic (zarr's LocalStore
writes a temporary file and renames it). A killed build therefore leaves whole chunks and a
committed count that only names complete rows; resuming rewrites everything after that count.
On local disks the same ordering holds on the device (`StoreWriter.sync`, on unless `fsync` is off):
the row's files and their directories are fsync'ed before the commit is written, and the commit
after, so an OS crash or power loss leaves no commit naming a row that did not reach the disk.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.storage import WrapperStore

from lenscache import location
from lenscache.encoding import CARRIER, SERIALIZER, CodecPreset, compressors
from lenscache.errors import StoreError
from lenscache.quant import n_blocks
from lenscache.schema import (
    CHUNK_TARGET_BYTES,
    DIMS,
    FINAL_EXACT,
    FINAL_LO,
    HEAD,
    HEAD_ARRAYS,
    LOGICAL_DTYPE_ATTR,
    LOGITS,
    LOGSUMEXP,
    META_KEY,
    RESID,
    RESID_SCALE,
    TOKENIZER,
    TOKENIZER_DIMS,
    TOKENS,
    TOPK_IDS,
    TOPK_LOGPROBS,
    StoreMeta,
    plan_pos_chunk,
    plan_seq_chunks,
)

from .chunk_writer import RegionWrite, write_whole_chunks
from .direct_store import DirectLocalStore, direct_writes
from .faults import fault_point

# Every chunk the writer writes lands on disk, even one equal to the fill value (a zero norm bias,
# an all-zero layer block): verify expects each written chunk to exist, and it spares zarr a scan
# of every chunk for "all fill" (an extra pass over each row, ~0.2 s per 4,096 SmolLM2 tokens).
WRITE_EVERY_CHUNK = {"write_empty_chunks": True}


def utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class CountingStore(WrapperStore):
    """Counts the bytes written through it, for the progress bar and the build summary."""

    def __init__(self, store):
        super().__init__(store)
        self.bytes_written = 0

    async def set(self, key: str, value, byte_range=None) -> None:  # type: ignore[override]
        self.bytes_written += len(value)
        await self._store.set(key, value)


@dataclass
class ArrayPlan:
    name: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    zarr_dtype: str
    logical_dtype: str | None = None  # set when the zarr dtype only carries the bits
    preset_codec: bool = False  # compressed with the preset's settings (resid, logits)


def plan_arrays(meta: StoreMeta, preset: CodecPreset) -> list[ArrayPlan]:
    """Every per-sequence array of the store with its chunking (all share `seqs_per_chunk` rows)."""
    n, t, d = meta.n_sequences, meta.seq_len, meta.d_model
    s = meta.build.seqs_per_chunk
    carrier = CARRIER[preset.dtype]
    item = np.dtype(carrier).itemsize
    logical = preset.dtype if carrier != preset.dtype else None
    p = plan_pos_chunk(s, t, d * item)
    plans = [
        # tokens are tiny: group many rows per chunk (a multiple of s keeps rows aligned)
        ArrayPlan(TOKENS, (n, t), (plan_seq_chunks(t * 4, n, s), t), "int32"),
        ArrayPlan(RESID, (len(meta.layers), n, t, d), (1, s, p, d), carrier, logical, preset_codec=True),
    ]
    if preset.quant == "block":
        nb = n_blocks(d, preset.block)
        plans.append(
            ArrayPlan(RESID_SCALE, (len(meta.layers), n, t, nb), (1, s, p, nb), "uint16", "bfloat16")
        )
    encoding = meta.final["encoding"]
    if encoding == "lo16":
        plans.append(ArrayPlan(FINAL_LO, (n, t, d), (s, p, d), "uint16"))
    elif encoding == "float32":
        plans.append(ArrayPlan(FINAL_EXACT, (n, t, d), (s, plan_pos_chunk(s, t, d * 4), d), "float32"))
    k = meta.final["topk"]
    if k:
        rows = plan_seq_chunks(t * k * 4, n, s)
        plans.append(ArrayPlan(TOPK_IDS, (n, t, k), (rows, t, k), "int32"))
        plans.append(ArrayPlan(TOPK_LOGPROBS, (n, t, k), (rows, t, k), "float32"))
    plans.append(ArrayPlan(LOGSUMEXP, (n, t), (plan_seq_chunks(t * 4, n, s), t), "float32"))
    if meta.final["full_logits"]:
        v = meta.vocab_size
        fdt = preset.float_dtype
        fcarrier, fitem = CARRIER[fdt], np.dtype(CARRIER[fdt]).itemsize
        flogical = fdt if fcarrier != fdt else None
        plans.append(
            ArrayPlan(
                LOGITS,
                (n, t, v),
                (1, plan_pos_chunk(1, t, v * fitem), v),
                fcarrier,
                flogical,
                preset_codec=True,
            )
        )
    return plans


class StoreWriter:
    """Owns an open store during a build."""

    def __init__(self, group: zarr.Group, counter: CountingStore, meta: StoreMeta):
        self.group = group
        self.counter = counter
        self.meta = meta
        self.fsync = True  # commits wait until the row is on the device (see `sync`)
        self._arrays: dict[str, zarr.Array] = {}

    @classmethod
    def create(
        cls,
        url: str | os.PathLike,
        meta: StoreMeta,
        preset: CodecPreset,
        tokens: np.ndarray,
        head_arrays: dict[str, np.ndarray],
        *,
        existing: StoreWriter | None = None,
        tokenizer: dict[str, bytes] | None = None,
    ) -> StoreWriter:
        """Lay out a new store (or re-lay an 'initializing' one) and write tokens, head and tokenizer.

        `tokenizer` holds the bytes of each ``tokenizer/*`` array (`lenscache.tokenizer.serialize`).
        """
        meta.build.status = "initializing"
        meta.build.committed = 0
        if existing is None:
            # what zarr's mode "w" would do, but the writer lock (lenscache.lock) stays
            location.remove(url, keep_lock=True)
            counter = CountingStore(direct_writes(location.zarr_store(url, read_only=False)))
            # the group is born with its lenscache metadata (one write): a bare group left by a kill
            # here would be "not a lenscache store" and refuse --resume
            group = zarr.open_group(store=counter, mode="a", attributes={META_KEY: meta.to_dict()})
            fault_point("group-created")
        else:
            counter, group = existing.counter, existing.group
        writer = cls(group, counter, meta)
        writer._write_meta()
        fault_point("after-init")
        for plan in plan_arrays(meta, preset):
            attrs = {LOGICAL_DTYPE_ATTR: plan.logical_dtype} if plan.logical_dtype else {}
            item = np.dtype(plan.zarr_dtype).itemsize
            group.create_array(
                plan.name,
                shape=plan.shape,
                chunks=plan.chunks,
                dtype=plan.zarr_dtype,
                serializer=SERIALIZER,
                compressors=preset.compressors(item) if plan.preset_codec else compressors(item),
                fill_value=0,
                dimension_names=DIMS[plan.name],
                attributes=attrs,
                overwrite=True,
            )
        fault_point("after-layout")
        head = group.require_group(HEAD)
        for name, value in head_arrays.items():
            arr = head.create_array(
                name,
                shape=value.shape,
                chunks=_head_chunks(value),
                dtype="float32",
                serializer=SERIALIZER,
                compressors=compressors(4),
                dimension_names=HEAD_ARRAYS[name],
                overwrite=True,
                config=WRITE_EVERY_CHUNK,
            )
            arr[...] = value
        if tokenizer is not None:
            _write_bytes(group.require_group(TOKENIZER), tokenizer)
        fault_point("head-written")
        writer._array(TOKENS)[...] = tokens
        fault_point("tokens-written")
        meta.build.status = "building"
        writer._write_meta()
        writer.sync()
        fault_point("after-commit", 0)
        return writer

    @classmethod
    def reopen(cls, url: str | os.PathLike) -> StoreWriter:
        counter = CountingStore(direct_writes(location.zarr_store(url, read_only=False)))
        group = zarr.open_group(store=counter, mode="r+")
        try:
            meta = StoreMeta.from_dict(group.attrs[META_KEY])
        except KeyError:
            raise StoreError(f"{url} is a zarr group but not a lenscache store") from None
        return cls(group, counter, meta)

    def write_rows(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        """Write sequences [start, start + n) of every per-sequence array (resid's axis 1).

        Whole chunks (the residual arrays, when rows are chunk-aligned) go through `write_whole_chunks`;
        the rest (partial chunks of small arrays, a ragged last row) through zarr.
        """
        writes = []
        for name, block in arrays.items():
            seq_axis = 1 if name in (RESID, RESID_SCALE) else 0
            offset = tuple(start if axis == seq_axis else 0 for axis in range(block.ndim))
            writes.append(RegionWrite(self._array(name), offset, block))
        for w in write_whole_chunks(writes):
            w.array[tuple(slice(o, o + n) for o, n in zip(w.offset, w.block.shape, strict=True))] = w.block

    def _array(self, name: str) -> zarr.Array:
        """An array of the store, opened to write every chunk (see WRITE_EVERY_CHUNK)."""
        if name not in self._arrays:
            self._arrays[name] = self.group[name].with_config(WRITE_EVERY_CHUNK)
        return self._arrays[name]

    def commit(self, committed: int) -> None:
        """Advance the committed count past rows whose chunks are all written (and, `fsync`, on disk)."""
        fault_point("before-commit", committed)
        self.sync()
        self.meta.build.committed = committed
        if committed == self.meta.n_sequences:
            self.meta.build.status = "complete"
            self.meta.build.finished = utcnow()
        self._write_meta()
        self.sync()
        fault_point("after-commit", committed)

    def sync(self) -> None:
        """Local stores with `fsync`: flush what was written to the device (object stores are durable
        once a put returns)."""
        store = self.counter._store
        if self.fsync and isinstance(store, DirectLocalStore):
            store.sync()

    def _write_meta(self) -> None:
        self.group.attrs.update({META_KEY: self.meta.to_dict()})


def _write_bytes(group: zarr.Group, arrays: dict[str, bytes]) -> None:
    """Each value as a 1-D uint8 array, checksummed like every other array."""
    for name, blob in arrays.items():
        value = np.frombuffer(blob, dtype=np.uint8)
        arr = group.create_array(
            name,
            shape=value.shape,
            chunks=(max(1, min(value.size, CHUNK_TARGET_BYTES)),),
            dtype="uint8",
            serializer=SERIALIZER,
            compressors=compressors(1),
            dimension_names=TOKENIZER_DIMS,
            overwrite=True,
            config=WRITE_EVERY_CHUNK,
        )
        arr[...] = value


def _head_chunks(value: np.ndarray) -> tuple[int, ...]:
    if value.ndim == 1:
        return value.shape
    rows = max(1, min(value.shape[0], (4 << 20) // (value.shape[1] * 4)))
    return (rows, value.shape[1])
