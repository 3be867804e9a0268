"""`build_store`: one model pass over packed text into a store (the `lenscache build` command).

The main thread runs forward passes. Rows of sequences are encoded (bf16/fp16 conversion,
overflow checks), compressed and written either between forward passes (a CPU forward pass that
uses every core) or by a writer thread fed through a bounded queue (GPU, or spare cores); either
way host memory is bounded by a few rows whatever the number of tokens. On CPU with a lossless
preset, hooks encode each layer into a reused row buffer as soon as its block has run. On CUDA,
device-to-host copies go to pinned buffers on a separate stream, so the next forward pass starts
while the previous batch is still copying.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lenscache import __version__, location
from lenscache.encoding import CARRIER, CodecPreset, get_preset
from lenscache.errors import DataError, LensCacheError, ModelError, ResumeMismatch, StoreError
from lenscache.head import Unembed
from lenscache.lock import read_lock, writer_lock
from lenscache.schema import QUANT_SCHEMA_VERSION, BuildState, StoreMeta, plan_seq_chunks
from lenscache.tokenizer import serialize as serialize_tokenizer

from .arch import ResidualRecorder, extract_head, find_taps
from .chunk_writer import available_cores
from .model import LoadedModel, ModelSpec, check_model_spec, load_model
from .staging import BatchOutput, RowEncoder, to_host
from .text import DataSpec, PackedTokens, check_packing, check_source, pack_tokens, pad_documents
from .writer import StoreWriter, utcnow

DEFAULT_TOKENS_PER_BATCH = 4096
PACKINGS = ("packed", "padded")
ROW_BUFFERS = 3  # resid rows in flight with a writer thread: one filling, one queued, one writing
LOGIT_ROWS = 64  # rows of logits per block when reducing them
TOPK_WIDTH = 128  # entries per piece in topk_rows


@dataclass
class BuildConfig:
    """Everything `lenscache build` takes; see the CLI's help for each option."""

    out: str
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=lambda: DataSpec("builtin:stdlib-docstrings"))
    seq_len: int = 512
    max_tokens: int | None = None
    layers: list[int] | None = None  # None: every boundary 0..n_layers
    codec: str = "bf16-zstd"
    topk: int = 16
    full_logits: bool = False
    batch_size: int | None = None  # sequences per forward pass
    seqs_per_chunk: int | None = None
    prepend_bos: bool | None = None
    separator: str | None = None
    packing: str = "packed"  # "packed": documents cut into a token stream; "padded": one per sequence
    resume: bool = False
    overwrite: bool = False
    break_lock: bool = False  # take over a writer lock whose holder cannot be checked (--break-lock)
    fsync: bool = True  # local stores: a row is on the device before the commit that names it
    progress: bool = True
    workers: int = 1  # more: rows are built by that many Dask worker processes (a LocalCluster; --workers)
    scheduler: str | None = None  # an existing Dask cluster's scheduler address builds the rows (--scheduler)

    @property
    def distributed(self) -> bool:
        """Whether Dask workers build the rows (cache/distributed.py) rather than this process."""
        return self.workers > 1 or self.scheduler is not None


@dataclass
class BuildSummary:
    url: str
    n_sequences: int
    n_tokens: int
    tokens_built: int  # this run (less than n_tokens after a resume)
    seconds: float
    bytes_written: int  # by this run's rows (compressed)
    raw_bytes: int
    head_max_abs_error: float | None
    resumed_from: int
    workers: dict[str, Any] | None = None  # distributed builds: workers, tasks and their timings

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_built / self.seconds if self.seconds else 0.0

    @property
    def compression_ratio(self) -> float:
        return self.raw_bytes / self.bytes_written if self.bytes_written else 0.0


def _check_head(loaded: LoadedModel, taps, unembed: Unembed, tokens: np.ndarray) -> float:
    """Max abs error between the stored head's logits and the model's own; refuse a head that differs."""
    ids = torch.from_numpy(tokens.astype(np.int64)).to(loaded.device)
    with torch.inference_mode(), ResidualRecorder(taps, []) as rec:
        logits = loaded.model(input_ids=ids, use_cache=False).logits.float()
        recomputed = unembed.to(loaded.device)(rec.final)
    if not bool(torch.isfinite(logits).all()):
        raise ModelError(
            "the model produced non-finite (NaN/inf) logits on the first sequence; check its weights"
        )
    err = (recomputed - logits).abs().max().item()
    scale = max(1.0, logits.abs().max().item())
    # fp32 forward passes agree to rounding; 16-bit ones round the model's own logits
    tol = (1e-4 if loaded.dtype == torch.float32 else 2e-2) * scale
    if not err <= tol:
        raise ModelError(
            f"the extracted output head does not reproduce the model's logits (max abs error {err:.3g}, "
            f"tolerance {tol:.3g}); this architecture's head is not supported yet"
        )
    return err


def _resolve_layers(requested: list[int] | None, n_layers: int) -> list[int]:
    if requested is None:
        return list(range(n_layers + 1))
    bad = [i for i in requested if not 0 <= i <= n_layers]
    if bad:
        raise DataError(f"layers (--layers) {bad} outside 0..{n_layers} (this model has {n_layers} blocks)")
    return sorted(set(requested))


def _final_encoding(preset: CodecPreset, compute: torch.dtype, layers: list[int], n_layers: int) -> str:
    if preset.lossy:
        return "float32"  # the last boundary's exact values must not depend on a lossy encoding
    storage_dtype = preset.dtype
    exact_in_storage = storage_dtype == "float32" or (
        storage_dtype == "bfloat16" and compute == torch.bfloat16
    )
    if n_layers in layers and exact_in_storage:
        return "resid"
    if n_layers in layers and storage_dtype == "bfloat16" and compute == torch.float32:
        return "lo16"
    return "float32"


def _identity(
    loaded: LoadedModel, packed: PackedTokens, cfg: BuildConfig, layers: list[int], plan: dict
) -> dict:
    """What a resume must match for the result to equal one uninterrupted build."""
    return {
        "architecture": loaded.provenance["architecture"],
        "weights_hash": loaded.provenance["weights_hash"],
        "tokenizer_hash": loaded.provenance["tokenizer"]["hash"],
        "data_fingerprint": packed.fingerprint,
        "seq_len": cfg.seq_len,
        "layers": layers,
        "codec": cfg.codec,
        "topk": cfg.topk,
        "full_logits": cfg.full_logits,
        "compute_dtype": str(loaded.dtype).removeprefix("torch."),
        "device_type": loaded.device.type,
        **plan,
    }


def _open_for_resume(cfg: BuildConfig, identity: dict) -> StoreWriter:
    writer = StoreWriter.reopen(cfg.out)
    stored = writer.meta.build.identity
    diffs = sorted(k for k in identity.keys() | stored.keys() if identity.get(k) != stored.get(k))
    if diffs:
        detail = "; ".join(
            f"{k}: store has {stored.get(k)!r}, this build has {identity.get(k)!r}" for k in diffs
        )
        raise ResumeMismatch(f"cannot resume {cfg.out}: it was built with different settings ({detail})")
    return writer


def check_config(cfg: BuildConfig) -> None:
    """Every check that needs no model, so that a bad option fails before a model takes its time to load."""
    for name in ("batch_size", "seqs_per_chunk"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise DataError(f"{name} (--{name.replace('_', '-')}) must be at least 1, got {value}")
    if cfg.topk < 0:
        raise DataError(f"topk (--topk) must be >= 0, got {cfg.topk}")
    if cfg.layers is not None:
        if not cfg.layers:
            raise DataError("layers (--layers) selects no layer boundary")
        if min(cfg.layers) < 0:
            raise DataError(f"layers (--layers) must be boundaries >= 0, got {sorted(set(cfg.layers))}")
    if cfg.resume and cfg.overwrite:
        raise DataError("resume and overwrite (--resume, --overwrite) exclude each other")
    if cfg.packing not in PACKINGS:
        raise DataError(f"packing (--packing) must be one of {', '.join(PACKINGS)}, got {cfg.packing!r}")
    if cfg.packing == "padded" and cfg.separator is not None:
        raise DataError("--separator has no use with --packing padded (one document per sequence)")
    if cfg.workers < 1:
        raise DataError(f"workers (--workers) must be at least 1, got {cfg.workers}")
    if cfg.scheduler is not None and cfg.workers > 1:
        raise DataError(
            "workers and scheduler (--workers, --scheduler) exclude each other: --workers N starts a local "
            "cluster of N workers, --scheduler uses the workers of an existing one"
        )
    if cfg.distributed:
        from .distributed import check_distributed

        check_distributed(cfg)
    get_preset(cfg.codec)
    check_model_spec(cfg.model)
    check_packing(cfg.seq_len, cfg.max_tokens)
    check_source(cfg.data)


def build_store(cfg: BuildConfig) -> BuildSummary:
    """Run the model over the data and write (or resume) the store at `cfg.out`, holding its writer lock."""
    if read_lock(cfg.out) is None:
        _out_state(cfg)  # before the lock: no lock file is left in a directory that holds no store
    check_config(cfg)
    if cfg.distributed:
        from .distributed import connect

        # the cluster first: a scheduler that does not answer fails here, before the store location
        # is touched (not even the lock file), and a local cluster's workers start while the model loads
        with connect(cfg) as cluster:
            cluster.preload(cfg.model)
            return _locked(cfg, cluster)
    return _locked(cfg, None)


def _locked(cfg: BuildConfig, cluster) -> BuildSummary:
    # One writer per store: a second one fails here (StoreLocked, naming the holder), before a model
    # loads or a byte is written. The state is checked again under the lock: what it was before may
    # have been another writer's work in progress.
    with writer_lock(
        cfg.out, command="build", clear_stale=cfg.resume or cfg.overwrite, break_lock=cfg.break_lock
    ) as lock:
        return _build_locked(cfg, _out_state(cfg), cluster, lock)


def _pack(cfg: BuildConfig, tokenizer) -> PackedTokens:
    if cfg.packing == "padded":
        return pad_documents(cfg.data, tokenizer, cfg.seq_len, cfg.max_tokens, prepend_bos=cfg.prepend_bos)
    return pack_tokens(
        cfg.data, tokenizer, cfg.seq_len, cfg.max_tokens, prepend_bos=cfg.prepend_bos, separator=cfg.separator
    )


def _out_state(cfg: BuildConfig) -> str:
    state = location.classify(cfg.out)
    if state == "other":
        raise StoreError(f"{cfg.out} exists and is not a lenscache store; refusing to write there")
    if state == "store" and not (cfg.resume or cfg.overwrite):
        raise StoreError(
            f"{cfg.out} already holds a store: pass --resume to continue it or --overwrite to replace it"
        )
    return state


def _build_locked(cfg: BuildConfig, state: str, cluster=None, lock=None) -> BuildSummary:
    loaded = load_model(cfg.model)
    taps = find_taps(loaded.model)
    n_layers = taps.n_layers
    max_ctx = loaded.provenance.get("max_context")
    if max_ctx and cfg.seq_len > max_ctx:
        raise DataError(
            f"seq_len (--seq-len) {cfg.seq_len} is larger than the model's context ({max_ctx} tokens)"
        )
    layers = _resolve_layers(cfg.layers, n_layers)
    preset = get_preset(cfg.codec)
    packed = _pack(cfg, loaded.tokenizer)
    n_seq = packed.tokens.shape[0]
    vocab = taps.lm_head.weight.shape[0]
    if packed.tokens.max() >= vocab:
        raise DataError(
            f"the tokenizer produced id {int(packed.tokens.max())} beyond the model's vocabulary ({vocab})"
        )

    batch = cfg.batch_size or max(1, DEFAULT_TOKENS_PER_BATCH // cfg.seq_len)
    item = np.dtype(CARRIER[preset.dtype]).itemsize
    s = cfg.seqs_per_chunk or plan_seq_chunks(cfg.seq_len * _d_model(loaded) * item, n_seq, batch)
    plan = {"batch_size": min(batch, s), "seqs_per_chunk": s}
    identity = _identity(loaded, packed, cfg, layers, plan)
    head_spec, head_arrays = extract_head(taps)
    unembed = Unembed(head_spec, head_arrays)

    replace = state == "store" and cfg.overwrite and not cfg.resume
    writer: StoreWriter | None = None
    if state == "store" and not replace:
        writer = _open_for_resume(cfg, identity)
        if writer.meta.build.status == "complete":
            return _summary(cfg, writer, n_seq, 0, 0.0, 0, 0, writer.meta.build.committed)

    meta = StoreMeta(
        # stores readable by lenscache 0.x before block-scaled presets keep schema version 1
        schema_version=QUANT_SCHEMA_VERSION if preset.quant == "block" else 1,
        package_version=__version__,
        created=utcnow(),
        model=loaded.provenance,
        data={"spec": cfg.data.to_dict(), "max_tokens": cfg.max_tokens, **packed.describe()},
        seq_len=cfg.seq_len,
        n_sequences=n_seq,
        n_layers=n_layers,
        layers=layers,
        d_model=_d_model(loaded),
        vocab_size=vocab,
        storage=preset.storage_meta(),
        final={
            "encoding": _final_encoding(preset, loaded.dtype, layers, n_layers),
            "topk": cfg.topk,
            "full_logits": cfg.full_logits,
        },
        head=head_spec,
        build=BuildState(identity=identity, started=utcnow(), **plan),
    )
    start = 0
    if writer is not None and writer.meta.build.status == "building":
        start = writer.meta.build.committed
    else:
        # Check the head before anything is written (or an old store replaced): a store whose
        # logits cannot be trusted is worse than none. One sequence covers every vocabulary entry.
        meta.head.check_max_abs_error = _check_head(loaded, taps, unembed, packed.tokens[:1])
        # the tokenizer travels with the store, so its text can be read where the model is not
        stored = serialize_tokenizer(loaded.tokenizer)
        meta.tokenizer = stored.record if stored else None
        if replace:
            location.remove(cfg.out, keep_lock=True)  # the old store goes; this writer's lock stays
        writer = StoreWriter.create(
            cfg.out, meta, preset, packed.tokens, head_arrays, existing=writer,
            tokenizer=stored.arrays if stored else None,
        )  # fmt: skip

    writer.fsync = cfg.fsync
    if cluster is not None:
        # the workers build with their own copies (loaded while this process laid the store out): this
        # process's copy has served its purpose (identity, head check, layout) and goes
        del loaded, taps, unembed, head_arrays
        return cluster.run(cfg, writer, preset, packed.tokens, start, lock)
    return _run(cfg, loaded, taps, packed, writer, RowEncoder(writer.meta, preset), start)


def _d_model(loaded: LoadedModel) -> int:
    return int(loaded.provenance["d_model"])


def topk_rows(rows: torch.Tensor, k: int, width: int = TOPK_WIDTH) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows.topk(k, dim=-1)` (values descending, their indices) for a contiguous 2-D block, faster.

    Cuts each row into pieces of `width` entries and keeps the k pieces with the largest maxima:
    every one of the k largest entries lies in one of them (an entry outside them is at most the
    k-th largest piece maximum, and those k maxima are k distinct entries at least as large), so
    an exact top-k of those k * width candidates is the top-k of the row. On 49,152-entry rows this
    reads each logit once instead of running a selection over it: about 2x faster than torch's topk.
    The candidates are copied a whole piece at a time (one index per piece, not per entry).
    """
    n, vocab = rows.shape
    pieces = vocab // width
    if pieces < 4 * k:
        return rows.topk(k, dim=-1)
    body = pieces * width
    by_piece = rows[:, :body].view(n, pieces, width)
    best = by_piece.amax(-1).topk(k, dim=-1).indices  # (n, k)
    cand = by_piece[torch.arange(n, device=rows.device).unsqueeze(1), best].reshape(n, k * width)
    if body < vocab:  # the ragged end is always a candidate, after the k pieces
        cand = torch.cat([cand, rows[:, body:]], dim=1)
    values, pick = cand.topk(k, dim=-1)
    piece = pick // width
    in_pieces = best.gather(1, piece.clamp(max=k - 1)) * width + pick % width
    return values, torch.where(piece < k, in_pieces, pick - k * width + body)


def _final_distribution(
    logits: torch.Tensor, topk: int
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """log-sum-exp and top-k (ids, log-probs) of the model's logits, a few rows at a time.

    Small row blocks stay in cache, top-k's maximum is reused as log-sum-exp's shift, and exp
    runs in place in one reused buffer: on SmolLM2 (4096 x 49152 logits) this takes 0.17 s
    where logsumexp + topk over the whole tensor take 0.8 s.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    k = max(1, min(topk, flat.shape[-1]))
    lse = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    ids = torch.empty((flat.shape[0], k), dtype=torch.int32, device=flat.device)
    lps = torch.empty((flat.shape[0], k), dtype=torch.float32, device=flat.device)
    buf = torch.empty(
        (min(LOGIT_ROWS, flat.shape[0]), flat.shape[-1]), dtype=torch.float32, device=flat.device
    )
    for start in range(0, flat.shape[0], LOGIT_ROWS):
        block = flat[start : start + LOGIT_ROWS].float().contiguous()
        values, indices = topk_rows(block, k)
        shift = values[:, :1]
        shifted = buf[: block.shape[0]]
        torch.sub(block, shift, out=shifted)
        block_lse = shift.squeeze(1) + shifted.exp_().sum(-1).log()
        lse[start : start + LOGIT_ROWS] = block_lse
        ids[start : start + LOGIT_ROWS] = indices
        lps[start : start + LOGIT_ROWS] = values - block_lse.unsqueeze(-1)
    shape = logits.shape[:-1]
    top = (ids.reshape(*shape, k), lps.reshape(*shape, k)) if topk else None
    return lse.reshape(shape), top


def _forward(
    loaded: LoadedModel,
    taps,
    tokens: np.ndarray,
    layers: list[int],
    topk: int,
    *,
    keep_logits: bool,
    sink: Callable[[int, torch.Tensor], None] | None = None,
) -> BatchOutput:
    ids = torch.from_numpy(tokens.astype(np.int64)).to(loaded.device)
    with torch.inference_mode(), ResidualRecorder(taps, layers, sink) as rec:
        logits = loaded.model(input_ids=ids, use_cache=False).logits
        lse, top = _final_distribution(logits, topk)
        return to_host(rec.states, rec.final, lse, top, logits.float() if keep_logits else None)


def writes_between_passes(device: torch.device) -> bool:
    """Whether to write rows between forward passes rather than in a writer thread.

    A CPU forward pass that already runs on every core loses about twice the writer's CPU time
    when a writer thread competes with it (its OpenMP threads wait at each barrier for the one
    that was descheduled); between passes, the writer's compression has both cores to itself.
    A GPU forward pass, or one that leaves cores free, overlaps with a writer thread instead.
    """
    if device.type != "cpu":
        return False
    return torch.get_num_threads() >= available_cores()


StoreRow = Callable[[int, int, dict[str, np.ndarray]], None]


class RowWriter:
    """Hands each encoded row to `store_row` (which writes it, and commits it or reports it), between
    forward passes (`inline`) or from a writer thread fed through a bounded queue; hands reused row
    buffers out and back.

    A failure in the writer is kept and raised in the main thread by `raise_failure`; after one,
    the thread keeps taking rows (giving their buffers back) so the producer never blocks.
    """

    def __init__(self, meta: StoreMeta, encoder: RowEncoder, store_row: StoreRow, *, staging: bool, inline: bool,
                 rows: int):  # fmt: skip
        self.encoder, self.store_row, self.inline = encoder, store_row, inline
        self.failure: BaseException | None = None
        self.raw_bytes = 0
        self._work: queue.Queue = queue.Queue(maxsize=2)
        # last in, first out: writing between passes, one buffer serves every row (the others are
        # never touched, so they cost no memory)
        self._free: queue.LifoQueue | None = queue.LifoQueue() if staging else None
        for _ in range(ROW_BUFFERS if staging else 0):
            self._free.put(encoder.new_row(rows, (meta.seq_len, meta.d_model)))
        self._thread = threading.Thread(target=self._loop, name="lenscache-writer", daemon=True)
        if not inline:
            self._thread.start()

    def row_buffer(self) -> np.ndarray | None:
        """A free row buffer for the hooks to encode into (None when rows are encoded afterwards)."""
        return None if self._free is None else self._free.get()

    def submit(self, row_start: int, batches: list[BatchOutput], row: np.ndarray | None) -> None:
        if self.inline:
            self._take((row_start, batches, row))
        else:
            self._work.put((row_start, batches, row))

    def close(self) -> None:
        if not self.inline:
            self._work.put(None)
            self._thread.join()

    def raise_failure(self, out: str) -> None:
        exc = self.failure
        if exc is None:
            return
        if not isinstance(exc, Exception) or isinstance(exc, LensCacheError):  # as they came (Ctrl-C, ...)
            # not `raise exc from exc`: an exception that is its own cause sends a walk of the causes
            # (Dask's, when a worker reports a task's error) round in circles
            raise exc
        raise StoreError(f"writing {out} failed: {exc!r}") from exc

    def _write(self, row_start: int, batches: list[BatchOutput], row: np.ndarray | None) -> None:
        n = sum(b.n for b in batches)
        arrays = self.encoder.encode_row(row_start, batches, None if row is None else row[:, :n])
        self.raw_bytes += sum(a.nbytes for a in arrays.values())
        self.store_row(row_start, n, arrays)

    def _take(self, item: tuple[int, list[BatchOutput], np.ndarray | None]) -> None:
        row_start, batches, row = item
        if self.failure is None:
            try:
                self._write(row_start, batches, row)
            except BaseException as exc:  # surfaced in the main thread
                self.failure = exc
        if row is not None:
            self._free.put(row)

    def _loop(self) -> None:
        while (item := self._work.get()) is not None:
            self._take(item)


def build_rows(
    out: str,
    loaded: LoadedModel,
    taps,
    meta: StoreMeta,
    encoder: RowEncoder,
    tokens: np.ndarray,
    start: int,
    store_row: StoreRow,
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[int, int]:
    """Build sequences [start, start + len(tokens)) of a store: forward passes, encoding, and
    `store_row(row_start, n, arrays)` for each row of `seqs_per_chunk` sequences, in order.

    The one-process build (`_run`) and each task of a distributed build (cache/distributed.py) run
    this same code, so a row's batches and bytes do not depend on which of them built it; `start`
    is a multiple of `seqs_per_chunk`. `on_batch(sequences, raw_bytes)` follows each forward pass
    (sequences forwarded so far, bytes encoded so far). Returns (sequences stored, raw bytes encoded).
    """
    end = start + tokens.shape[0]
    s, batch = meta.build.seqs_per_chunk, meta.build.batch_size
    # On CPU with a lossless preset the forward pass encodes each boundary into a row buffer from
    # its hook (see ResidualRecorder's sink); the writer hands each buffer back when it is written.
    rows = RowWriter(
        meta,
        encoder,
        store_row,
        staging=encoder.stages_in_hooks(loaded.device),
        inline=writes_between_passes(loaded.device),
        rows=min(s, meta.n_sequences),
    )
    built = 0
    try:
        for row_start in range(start, end, s):
            row_end = min(row_start + s, end)
            row = rows.row_buffer()
            if rows.failure is not None:
                break
            batches = []
            for b0 in range(row_start, row_end, batch):
                b1 = min(b0 + batch, row_end)
                sink = None if row is None else encoder.sink(row, b0 - row_start, row_start)
                batches.append(_forward(loaded, taps, tokens[b0 - start : b1 - start], meta.layers,
                                        meta.final["topk"], keep_logits=meta.final["full_logits"], sink=sink))  # fmt: skip
                if on_batch is not None:
                    on_batch(built + b1 - row_start, rows.raw_bytes)
            rows.submit(row_start, batches, row)
            built += row_end - row_start
    finally:
        rows.close()
    rows.raise_failure(out)
    return built, rows.raw_bytes


def _run(cfg, loaded, taps, packed, writer: StoreWriter, encoder: RowEncoder, start: int) -> BuildSummary:
    meta = writer.meta
    # only the rows count towards throughput and compression (not the head and tokens written up front)
    written_before = writer.counter.bytes_written
    n_seq = meta.n_sequences
    bar = _progress(cfg, n_seq, start, meta.seq_len)
    t0 = time.perf_counter()
    shown = 0

    def store_row(row_start: int, n: int, arrays: dict[str, np.ndarray]) -> None:
        writer.write_rows(row_start, arrays)
        writer.commit(row_start + n)

    def on_batch(seqs: int, raw: int) -> None:
        nonlocal shown
        bar.update(seqs - shown)
        shown = seqs
        _postfix(bar, seqs, meta.seq_len, t0, writer.counter.bytes_written - written_before, raw)

    try:
        built, raw = build_rows(cfg.out, loaded, taps, meta, encoder, packed.tokens[start:], start, store_row,
                                None if bar is None else on_batch)  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    written = writer.counter.bytes_written - written_before
    return _summary(cfg, writer, n_seq, built * meta.seq_len, seconds, written, raw, start)


def _summary(
    cfg, writer: StoreWriter, n_seq: int, tokens: int, seconds: float, written: int, raw: int, start: int
) -> BuildSummary:
    return BuildSummary(
        url=str(cfg.out),
        n_sequences=n_seq,
        n_tokens=n_seq * writer.meta.seq_len,
        tokens_built=tokens,
        seconds=seconds,
        bytes_written=written,
        raw_bytes=raw,
        head_max_abs_error=writer.meta.head.check_max_abs_error,
        resumed_from=start,
    )


def _progress(cfg: BuildConfig, total: int, initial: int, seq_len: int) -> Any:
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="seq", desc="lenscache build", dynamic_ncols=True)


def _postfix(bar, seqs_done: int, seq_len: int, t0: float, written: int, raw: int) -> None:
    elapsed = max(1e-9, time.perf_counter() - t0)
    bar.set_postfix(
        tok_s=f"{seqs_done * seq_len / elapsed:,.0f}",
        written=f"{written / 2**20:,.1f}MiB",
        ratio=f"{raw / written:.2f}x" if written and raw else "-",
        refresh=False,
    )
