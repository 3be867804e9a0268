"""`copy_store`: copy, subset or re-encode a store between any two locations (``lenscache copy``).

A copy is a build whose forward pass is a read of the source. Every value comes through the one
reader (`lenscache.reader.Store`, which checks each chunk's crc32c and header before decoding it)
and goes out through the build's writer (`lenscache.cache.writer.StoreWriter`) with the build's
row encoder, so the destination has exactly the layout, checks and write protocol of a build:

- it is laid out as 'initializing', then 'building' with a committed count that moves only after a
  row's chunks are all written, and 'complete' at the very end: it verifies clean only then, and
  readers of a partial copy see only committed sequences;
- a killed copy continues with ``--resume`` from its committed count (the copy's settings and the
  source's fingerprint must match; the result equals an uninterrupted copy bit for bit);
- it holds the destination's writer lock (`lenscache.lock`) while it writes.

Without ``--codec`` the stored values are copied as stored (carriers, block scales, exact final
boundary): the copy holds the source's numbers bit for bit. With ``--codec`` each layer is decoded
to float32 and encoded with the new preset, within that preset's declared bound; the final
distribution stays exact whatever the preset (its last boundary is taken at full precision).

Nothing is ever written to the source: it is opened read-only, and a destination equal to, inside or
around the source is refused before anything is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lenscache import __version__, location
from lenscache.cache.build import _final_encoding
from lenscache.cache.staging import BatchOutput, RowEncoder
from lenscache.cache.writer import StoreWriter, utcnow
from lenscache.encoding import CodecPreset, get_preset
from lenscache.errors import DataError, ResumeMismatch, SelectionError, StoreError
from lenscache.lock import read_lock, writer_lock
from lenscache.reader import Store, open_store
from lenscache.schema import (
    FINAL_EXACT,
    FINAL_LO,
    HEAD,
    LOGITS,
    LOGSUMEXP,
    QUANT_SCHEMA_VERSION,
    RESID,
    RESID_SCALE,
    TOPK_IDS,
    TOPK_LOGPROBS,
    StoreMeta,
)
from lenscache.tokenizer import read_arrays as read_tokenizer

# the parts of a store's metadata that change while it is built or copied: not part of its fingerprint
PROGRESS_KEYS = ("status", "committed", "finished")


@dataclass
class CopyConfig:
    """Everything `lenscache copy` takes; see the CLI's help for each option."""

    src: str
    dst: str
    layers: list[int] | None = None  # None: every layer of the source
    seqs: tuple[int, int] | None = None  # [start, stop) of the source's committed sequences; None: all
    codec: str | None = None  # None: the source's preset, values copied as stored
    resume: bool = False
    overwrite: bool = False
    break_lock: bool = False
    fsync: bool = True
    progress: bool = True


@dataclass
class CopySummary:
    src: str
    dst: str
    n_sequences: int
    copied: int  # sequences copied by this run
    resumed_from: int
    seconds: float
    bytes_written: int


def source_fingerprint(store: Store) -> dict[str, Any]:
    """What identifies a source store: its data fingerprint, the model's weights hash, and the sha256
    of its metadata without the build's progress (a store still being built keeps its fingerprint)."""
    meta = store.meta.to_dict()
    meta["build"] = {k: v for k, v in meta["build"].items() if k not in PROGRESS_KEYS}
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()
    return {
        "data_fingerprint": store.meta.data.get("fingerprint"),
        "weights_hash": store.meta.model.get("weights_hash"),
        "metadata_sha256": f"sha256:{digest}",
    }


def _place(url: str) -> tuple[str, str]:
    """(protocol, absolute path) of a location, to compare two of them."""
    root = location.local_root(url)
    if root is not None:
        return "file", str(root)
    fs, path = location.url_fs(url)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol, "/" + path.strip("/")


def _check_places(src: str, dst: str) -> None:
    """Refuse a destination that is the source, lies inside it or holds it (--overwrite would delete it)."""
    (sp, spath), (dp, dpath) = _place(src), _place(dst)
    if sp != dp:
        return
    if spath == dpath:
        raise StoreError(f"cannot copy {src} onto itself (the destination is the source); nothing was written")
    inside = dpath.startswith(spath.rstrip("/") + "/")
    around = spath.startswith(dpath.rstrip("/") + "/")
    if inside or around:
        raise StoreError(
            f"cannot copy {src} to {dst}: the destination lies {'inside' if inside else 'around'} the source, "
            "and a copy never writes into its source; nothing was written"
        )


def check_config(cfg: CopyConfig) -> None:
    """The checks that need no store."""
    if cfg.resume and cfg.overwrite:
        raise DataError("resume and overwrite (--resume, --overwrite) exclude each other")
    if cfg.codec is not None:
        get_preset(cfg.codec)
    if cfg.seqs is not None:
        start, stop = cfg.seqs
        if not 0 <= start < stop:
            raise SelectionError(f"seqs (--seqs) {start}:{stop} selects no sequence (it needs 0 <= A < B)")
    if cfg.layers is not None and not cfg.layers:
        raise SelectionError("layers (--layers) selects no layer boundary")
    _check_places(cfg.src, cfg.dst)


def _selection(src: Store, cfg: CopyConfig, seqs: tuple[int, int] | None) -> tuple[list[int], tuple[int, int]]:
    layers = sorted(set(cfg.layers)) if cfg.layers is not None else src.layers
    missing = [b for b in layers if b not in src.layers]
    if missing:
        raise SelectionError(f"layers (--layers) {missing} are not in the source (it has {src.layers})")
    n = src.n_sequences
    start, stop = seqs if seqs is not None else (0, n)
    if n == 0:
        raise SelectionError(f"the source {src.url} has no committed sequence yet; there is nothing to copy")
    if stop > n:
        raise SelectionError(
            f"seqs (--seqs) {start}:{stop} is outside the source's committed sequences 0:{n}"
        )
    return layers, (start, stop)


def _dest_meta(src: Store, preset: CodecPreset, layers: list[int], seqs: tuple[int, int], fp: dict) -> StoreMeta:
    """The destination's metadata: the source's provenance, its own shape and storage, and `copied_from`."""
    meta = StoreMeta.from_dict(src.meta.to_dict())  # a deep copy, validated
    start, stop = seqs
    n = stop - start
    whole = (start, stop) == (0, src.meta.n_sequences)
    compute = src.meta.build.identity.get("compute_dtype") or src.meta.model.get("dtype") or "float32"
    meta.schema_version = QUANT_SCHEMA_VERSION if preset.quant == "block" else 1
    meta.package_version = __version__
    meta.created = utcnow()
    meta.n_sequences = n
    meta.layers = layers
    meta.storage = preset.storage_meta()
    meta.final = {**meta.final, "encoding": _final_encoding(preset, getattr(torch, compute), layers, meta.n_layers)}
    copied = {"url": src.url, "fingerprint": fp, "layers": layers, "seqs": [start, stop], "codec": preset.name}
    data = dict(meta.data)
    if not whole:
        # other sequences, so another data fingerprint (lenses and bases record it)
        tokens = np.ascontiguousarray(src.tokens(slice(start, stop)), dtype="<i4")
        h = hashlib.sha256(json.dumps({"source": fp["data_fingerprint"], "seqs": [start, stop]}).encode())
        h.update(b"\0")
        h.update(tokens.tobytes())
        data.update(fingerprint=f"sha256:{h.hexdigest()}", n_sequences=n, n_tokens=n * meta.seq_len, n_documents=None)
        if "lengths" in data:
            data["lengths"] = data["lengths"][start:stop]
    data["copied_from"] = copied
    meta.data = data
    s = min(meta.build.seqs_per_chunk, n)
    meta.build.seqs_per_chunk = s
    meta.build.batch_size = min(meta.build.batch_size, s)
    # what a --resume must match: the source (by fingerprint) and the copy's settings
    meta.build.identity = {**meta.build.identity, "layers": layers, "codec": preset.name, "seqs_per_chunk": s,
                           "copy_source": fp, "copy_seqs": [start, stop]}  # fmt: skip
    meta.build.started = utcnow()
    meta.build.finished = None
    return meta


class RowSource:
    """Reads sequences of the source and turns them into the destination's row arrays."""

    def __init__(self, src: Store, meta: StoreMeta, preset: CodecPreset, offset: int):
        self.src, self.meta, self.preset, self.offset = src, meta, preset, offset
        # the source's own preset: every stored value is copied as stored, bit for bit
        self.as_stored = preset.name == src.codec
        self.encoder = RowEncoder(meta, preset)

    def row(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """The destination arrays for its sequences [start, stop)."""
        seqs = slice(start + self.offset, stop + self.offset)
        if self.as_stored:
            return self._as_stored(seqs)
        return self._reencoded(start, seqs)

    def _final(self, seqs: slice) -> np.ndarray:
        return self.src.final_resid(seqs)

    def _common(self, seqs: slice) -> dict[str, np.ndarray]:
        src, out = self.src, {LOGSUMEXP: self.src.logsumexp(seqs)}
        if self.meta.final["topk"]:
            out[TOPK_IDS], out[TOPK_LOGPROBS] = src.topk(seqs)
        return out

    def _as_stored(self, seqs: slice) -> dict[str, np.ndarray]:
        src, meta = self.src, self.meta
        index = np.asarray([src.layer_index(b) for b in meta.layers], dtype=np.int64)
        # Store._read: the reader's checked read of stored (undecoded) values, as the block-scaled
        # int8 carriers and their scales have no public raw accessor
        out = self._common(seqs)
        out[RESID] = src._read(RESID, (index, seqs))
        if RESID_SCALE in src.arrays:
            out[RESID_SCALE] = src._read(RESID_SCALE, (index, seqs))
        encoding = meta.final["encoding"]
        if encoding == src.meta.final["encoding"]:
            for name in (FINAL_LO, FINAL_EXACT):
                if name in src.arrays:
                    out[name] = src._read(name, (seqs,))
        elif encoding == "float32":  # the last boundary left --layers: keep it exactly, on its own
            out[FINAL_EXACT] = self._final(seqs)
        else:  # cannot happen with the same preset and layer set; refuse rather than guess
            raise StoreError(f"cannot copy a store with final encoding {src.meta.final['encoding']!r} as {encoding!r}")
        if meta.final["full_logits"]:
            out[LOGITS] = src._read(LOGITS, (seqs,))
        return out

    def _reencoded(self, start: int, seqs: slice) -> dict[str, np.ndarray]:
        src, meta = self.src, self.meta
        final = torch.from_numpy(np.ascontiguousarray(self._final(seqs)))
        states = [final if b == meta.n_layers else torch.from_numpy(src.resid(b, seqs)) for b in meta.layers]
        top = src.topk(seqs) if meta.final["topk"] else (None, None)
        batch = BatchOutput(
            states=states,
            final=final,
            lse=torch.from_numpy(src.logsumexp(seqs)),
            top_ids=None if top[0] is None else torch.from_numpy(top[0]),
            top_logprobs=None if top[1] is None else torch.from_numpy(top[1]),
            logits=torch.from_numpy(src.logits(seqs)) if meta.final["full_logits"] else None,
        )
        # the build's own encoding step: its range checks, its rounding, its exact last boundary
        return self.encoder.encode_row(start, [batch])


def _head_and_tokenizer(src: Store) -> tuple[dict[str, np.ndarray], dict[str, bytes] | None]:
    prefix = f"{HEAD}/"
    head = {p[len(prefix) :]: src._read(p, (Ellipsis,)) for p in src.arrays if p.startswith(prefix)}
    return head, (read_tokenizer(src) if src.meta.tokenizer is not None else None)


def _dst_state(cfg: CopyConfig) -> str:
    state = location.classify(cfg.dst)
    if state == "other":
        raise StoreError(f"{cfg.dst} exists and is not a lenscache store; refusing to write there")
    if state == "store" and not (cfg.resume or cfg.overwrite):
        raise StoreError(
            f"{cfg.dst} already holds a store: pass --resume to continue a copy into it or --overwrite to replace it"
        )
    return state


def copy_store(cfg: CopyConfig) -> CopySummary:
    """Copy (a subset of) the store at `cfg.src` to `cfg.dst`, holding the destination's writer lock."""
    check_config(cfg)
    src = open_store(cfg.src)
    if read_lock(cfg.dst) is None:
        _dst_state(cfg)  # before the lock: a refused copy leaves no lock file behind
    with writer_lock(cfg.dst, command="copy", clear_stale=cfg.resume or cfg.overwrite, break_lock=cfg.break_lock):
        return _copy_locked(cfg, src, _dst_state(cfg))


def _copy_locked(cfg: CopyConfig, src: Store, state: str) -> CopySummary:
    fp = source_fingerprint(src)
    existing = StoreWriter.reopen(cfg.dst) if state == "store" and cfg.resume else None
    if existing is not None:  # a resume continues what it started: options not given are the recorded ones
        cfg = _recorded_defaults(cfg, existing.meta)
    layers, seqs = _selection(src, cfg, cfg.seqs)
    preset = get_preset(cfg.codec or src.codec)
    meta = _dest_meta(src, preset, layers, seqs, fp)
    start = 0
    if existing is not None:
        _check_resume(cfg, existing.meta, meta)
        if existing.meta.complete:
            return CopySummary(cfg.src, cfg.dst, meta.n_sequences, 0, meta.n_sequences, 0.0, 0)
        if existing.meta.build.status == "building":
            start = existing.meta.build.committed
    writer = existing
    if writer is None or writer.meta.build.status == "initializing":
        head, tokenizer = _head_and_tokenizer(src)
        if state == "store" and existing is None:
            location.remove(cfg.dst, keep_lock=True)  # --overwrite: the old store goes, this lock stays
        writer = StoreWriter.create(cfg.dst, meta, preset, src.tokens(slice(*seqs)), head, existing=writer,
                                    tokenizer=tokenizer)  # fmt: skip
    writer.fsync = cfg.fsync
    return _run(cfg, src, writer, preset, seqs[0], start)


def _recorded_defaults(cfg: CopyConfig, stored: StoreMeta) -> CopyConfig:
    identity = stored.build.identity
    if "copy_source" not in identity:
        raise StoreError(f"{cfg.dst} is a store that no copy made; --resume continues a copy (use --overwrite)")
    seqs = cfg.seqs if cfg.seqs is not None else tuple(identity["copy_seqs"])
    layers = cfg.layers if cfg.layers is not None else list(identity["layers"])
    return dataclasses.replace(cfg, seqs=seqs, layers=layers, codec=cfg.codec or identity["codec"])


def _check_resume(cfg: CopyConfig, stored: StoreMeta, new: StoreMeta) -> None:
    a, b = stored.build.identity, new.build.identity
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if keys:
        detail = "; ".join(f"{k}: destination has {a.get(k)!r}, this copy has {b.get(k)!r}" for k in keys)
        raise ResumeMismatch(f"cannot resume the copy into {cfg.dst}: it was made with other settings ({detail})")


def _run(cfg: CopyConfig, src: Store, writer: StoreWriter, preset: CodecPreset, offset: int, start: int) -> CopySummary:
    meta = writer.meta
    n, s = meta.n_sequences, meta.build.seqs_per_chunk
    rows = RowSource(src, meta, preset, offset)
    before = writer.counter.bytes_written
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, initial=start, unit="seq", desc="lenscache copy", dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for row_start in range(start, n, s):
            row_end = min(row_start + s, n)
            writer.write_rows(row_start, rows.row(row_start, row_end))
            writer.commit(row_end)
            if bar is not None:
                bar.update(row_end - row_start)
                bar.set_postfix(written=f"{(writer.counter.bytes_written - before) / 2**20:,.1f}MiB", refresh=False)
    finally:
        if bar is not None:
            bar.close()
    return CopySummary(cfg.src, cfg.dst, n, n - start, start, time.perf_counter() - t0,
                       writer.counter.bytes_written - before)  # fmt: skip


def describe_summary(s: CopySummary) -> str:
    """The one line `lenscache copy` prints."""
    resumed = f", resumed at sequence {s.resumed_from}" if s.resumed_from else ""
    return (
        f"copied {s.src} to {s.dst}: {s.n_sequences:,} sequences ({s.copied:,} this run{resumed}) in "
        f"{s.seconds:,.1f} s; wrote {s.bytes_written / 2**20:,.2f} MiB"
    )

