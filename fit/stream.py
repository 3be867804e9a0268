"""Minibatches of residual states streamed from a store: the one reader every fitter and analysis uses.

How a pass works: the split's sequences are cut into blocks aligned with the store's chunks, so a
block read touches whole chunks and nothing else. Each epoch visits the blocks in a seeded random
order. A background thread reads blocks `read_ahead` ahead of the consumer, each with Dask (one
task per layer, decompressed in parallel threads). Consecutive blocks fill a shuffle buffer of at
least `buffer_tokens` tokens whose tokens are permuted and cut into minibatches; the remainder is
carried into the next fill. Memory is bounded by (read_ahead + 1) blocks plus the buffer, whatever
the size of the store.

The order of minibatches depends only on the store's shape and the `StreamSpec`, never on timing,
so a seed reproduces a fit exactly, and `MemorySource` serves the same minibatches from RAM.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import dask
import numpy as np
import torch

from lenscache.errors import LensCacheError
from lenscache.reader import Store

IGNORE_INDEX = -100  # next_tokens value where the next token lies outside the sequence
SPLITS = ("train", "held_out", "all")


@dataclass(frozen=True)
class Split:
    """Sequence ranges of the train / held-out split. Every tool uses `split_sequences`."""

    train: range
    held_out: range

    def get(self, name: str) -> range:
        if name == "train":
            return self.train
        if name == "held_out":
            return self.held_out
        if name == "all":
            return range(self.train.start, self.held_out.stop)
        raise LensCacheError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")


def split_sequences(n_sequences: int, held_out_fraction: float = 0.1) -> Split:
    """The last ceil(fraction * n) sequences are held out (at least one when n >= 2).

    Held-out sequences come from the end of the store because packing keeps documents in order:
    the split then falls between documents, not inside many of them.
    """
    if not 0.0 <= held_out_fraction < 1.0:
        raise LensCacheError(f"held-out fraction must be in [0, 1), got {held_out_fraction}")
    n_held = math.ceil(n_sequences * held_out_fraction) if n_sequences >= 2 else 0
    if held_out_fraction > 0 and n_sequences >= 2:
        n_held = max(1, n_held)
    cut = n_sequences - n_held
    return Split(train=range(0, cut), held_out=range(cut, n_sequences))


def chunk_aligned_blocks(seqs: range, seqs_per_chunk: int) -> list[range]:
    """`seqs` cut at multiples of `seqs_per_chunk`, so that each block reads whole chunks only."""
    per, start, stop = seqs_per_chunk, seqs.start, seqs.stop
    edges = sorted({start, stop, *range((start // per + 1) * per, stop, per)})
    return [range(a, b) for a, b in zip(edges[:-1], edges[1:], strict=False) if b > a]


@dataclass
class StreamSpec:
    """What to stream and how. Defaults suit fitting a lens on every layer of a ~100M model."""

    layers: list[int] | None = None  # boundaries; None = every stored one except the last
    split: str = "train"  # train | held_out | all
    batch_tokens: int = 512
    buffer_tokens: int = 16384  # shuffle buffer; also the memory bound
    read_ahead: int = 2  # blocks read ahead in the background
    shuffle: bool = True
    seed: int = 0
    epochs: int = 1
    max_tokens: int | None = None  # stop after this many tokens in all
    dtype: str = "float32"  # resid as float32, or bfloat16 kept as read (bf16 stores only)
    with_final: bool = True  # also the exact last boundary (the target of lenses)
    workers: int = 2  # Dask threads per block read
    held_out_fraction: float = 0.1
    max_sequences: int | None = None  # use only the first n sequences of the split
    skip_batches: int = 0  # resume: minibatches already consumed (read, not yielded)

    def __post_init__(self) -> None:
        for name in ("batch_tokens", "buffer_tokens", "epochs", "workers"):
            if getattr(self, name) < 1:
                raise LensCacheError(f"{name} (--{name.replace('_', '-')}) must be at least 1, got {getattr(self, name)}")
        if self.read_ahead < 0:
            raise LensCacheError(f"read_ahead must be >= 0, got {self.read_ahead}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise LensCacheError(f"max_tokens (--max-tokens) must be at least 1, got {self.max_tokens}")
        if self.dtype not in ("float32", "bfloat16"):
            raise LensCacheError(f"stream dtype must be float32 or bfloat16, not {self.dtype!r}")
        if self.split not in SPLITS:
            raise LensCacheError(f"unknown split {self.split!r}; choose one of {', '.join(SPLITS)}")


@dataclass
class Minibatch:
    """Tokens drawn from the shuffle buffer; `resid` is layer-major for batched per-layer maps."""

    layers: list[int]
    resid: torch.Tensor  # (n_layers, B, d_model)
    final: torch.Tensor | None  # (B, d_model) float32: the exact last boundary
    tokens: torch.Tensor  # (B,) int64: the token at each position
    next_tokens: torch.Tensor  # (B,) int64: the next token, IGNORE_INDEX at a sequence's end
    seq: torch.Tensor  # (B,) int64
    pos: torch.Tensor  # (B,) int64
    index: int = 0  # minibatch number within the whole stream (epochs included)
    epoch: int = 0

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])


class BlockSource(Protocol):
    """Where blocks of sequences come from: the store (`ZarrSource`) or RAM (`MemorySource`)."""

    storage_dtype: str

    def read(self, seqs: range, layers: list[int], with_final: bool) -> dict[str, np.ndarray]:
        """{'resid': (L, n, P, d) carrier, 'tokens': (n, P), 'final': (n, P, d) float32 if asked}."""
        ...


class ZarrSource:
    """Reads blocks from a store with Dask: one task per layer chunk, decompressed in parallel."""

    def __init__(self, store: Store, workers: int = 2):
        self.store = store
        self.workers = workers
        self.storage_dtype = store.storage_dtype

    def read(self, seqs: range, layers: list[int], with_final: bool) -> dict[str, np.ndarray]:
        store = self.store
        tasks = [dask.delayed(store.resid_raw)(layer, seqs) for layer in layers]
        tasks.append(dask.delayed(store.tokens)(seqs))
        if with_final:
            tasks.append(dask.delayed(store.final_resid)(seqs))
        out = dask.compute(*tasks, scheduler="threads", num_workers=self.workers)
        block = {"resid": np.stack(out[: len(layers)]), "tokens": out[len(layers)]}
        if with_final:
            block["final"] = out[-1]
        return block


class MemorySource:
    """The same data preloaded in RAM: the reference the streaming reader is measured against."""

    def __init__(self, store: Store, layers: list[int], seqs: range, with_final: bool = True):
        self.storage_dtype = store.storage_dtype
        self.offset = seqs.start
        self.layers = list(layers)
        self.resid = np.stack([store.resid_raw(layer, seqs) for layer in layers])
        self.tokens = store.tokens(seqs)
        self.final = store.final_resid(seqs) if with_final else None

    def read(self, seqs: range, layers: list[int], with_final: bool) -> dict[str, np.ndarray]:
        if list(layers) != self.layers:
            raise LensCacheError(f"MemorySource holds layers {self.layers}, asked for {layers}")
        sel = slice(seqs.start - self.offset, seqs.stop - self.offset)
        block = {"resid": self.resid[:, sel], "tokens": self.tokens[sel]}
        if with_final:
            if self.final is None:
                raise LensCacheError("MemorySource was loaded without the final layer")
            block["final"] = self.final[sel]
        return block


def _to_torch(carrier: np.ndarray, storage_dtype: str, dtype: str) -> torch.Tensor:
    if storage_dtype == "bfloat16":
        t = torch.from_numpy(np.ascontiguousarray(carrier).view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(np.ascontiguousarray(carrier))
    if dtype == "bfloat16" and t.dtype != torch.bfloat16:
        raise LensCacheError("dtype='bfloat16' needs a bfloat16 store; use float32")
    return t.float() if dtype == "float32" else t


@dataclass
class _Buffer:
    """Token-major blocks waiting to be shuffled: resid (L, N, d), the rest (N, ...).

    Blocks are kept as they were read, never concatenated: a minibatch gathers its rows from the
    blocks directly, so the buffer's memory is the blocks themselves and nothing more.
    """

    parts: list[dict[str, np.ndarray]] = field(default_factory=list)
    n: int = 0

    def add(self, arrays: dict[str, np.ndarray]) -> None:
        self.parts.append(arrays)
        self.n += arrays["tokens"].shape[0]

    def gather(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Rows `idx` (indices into the concatenation of the parts), in that order."""
        sizes = [part["tokens"].shape[0] for part in self.parts]
        offsets = np.cumsum([0, *sizes])
        which = np.searchsorted(offsets, idx, side="right") - 1
        out: dict[str, np.ndarray] = {}
        for name, first in self.parts[0].items():
            axis = 1 if name == "resid" else 0
            shape = list(first.shape)
            shape[axis] = idx.size
            out[name] = np.empty(shape, dtype=first.dtype)
        for p in np.unique(which):
            sel = np.nonzero(which == p)[0]
            rows = idx[sel] - offsets[p]
            for name, value in self.parts[p].items():
                if name == "resid":
                    out[name][:, sel] = value[:, rows]
                else:
                    out[name][sel] = value[rows]
        return out


class ResidualStream:
    """Iterate over minibatches of a store (see the module docstring)."""

    def __init__(self, store: Store, spec: StreamSpec | None = None, source: BlockSource | None = None):
        self.store = store
        self.spec = spec = spec or StreamSpec()
        stored = store.layers
        self.layers = (
            [b for b in stored if b != store.meta.n_layers] if spec.layers is None else list(spec.layers)
        )
        for layer in self.layers:
            store.layer_index(layer)  # a clear error for a layer the store lacks
        if not self.layers:
            raise LensCacheError("no layers to stream: the store holds only the last boundary")
        self.split = split_sequences(store.n_sequences, spec.held_out_fraction)
        self.seqs = self.split.get(spec.split)
        if spec.max_sequences is not None:
            self.seqs = self.seqs[: spec.max_sequences]
        if len(self.seqs) == 0:
            raise LensCacheError(
                f"the {spec.split} split of {store.url} is empty ({store.n_sequences} committed sequences)"
            )
        self.source = source or ZarrSource(store, spec.workers)

    # ---- the schedule: pure function of the store's shape and the spec ---------------------------
    def blocks(self) -> list[range]:
        """The split's sequences cut at the store's chunk boundaries."""
        return chunk_aligned_blocks(self.seqs, self.store.meta.build.seqs_per_chunk)

    def tokens_per_epoch(self) -> int:
        return len(self.seqs) * self.store.seq_len

    def total_tokens(self) -> int:
        """Tokens this stream yields in all (before `skip_batches`)."""
        total = self.tokens_per_epoch() * self.spec.epochs
        if self.spec.max_tokens is not None:
            total = min(total, self.spec.max_tokens)
        return total

    def n_batches(self) -> int:
        """Minibatches this stream yields in all (before `skip_batches`); an epoch's last may be short."""
        per_epoch, batch = self.tokens_per_epoch(), self.spec.batch_tokens
        left, count = self.total_tokens(), 0
        while left > 0:
            this_epoch = min(left, per_epoch)
            count += math.ceil(this_epoch / batch)
            left -= this_epoch
        return count

    def _epoch_order(self, epoch: int) -> tuple[list[range], np.random.Generator]:
        rng = np.random.default_rng([self.spec.seed, epoch])
        blocks = self.blocks()
        if self.spec.shuffle:
            blocks = [blocks[i] for i in rng.permutation(len(blocks))]
        return blocks, rng

    # ---- reading -----------------------------------------------------------------------------
    def _read_block(self, seqs: range) -> dict[str, np.ndarray]:
        raw = self.source.read(seqs, self.layers, self.spec.with_final)
        n, p = raw["tokens"].shape
        tokens = raw["tokens"].astype(np.int64)
        nxt = np.full_like(tokens, IGNORE_INDEX)
        nxt[:, :-1] = tokens[:, 1:]
        block = {
            "resid": raw["resid"].reshape(len(self.layers), n * p, -1),
            "tokens": tokens.reshape(-1),
            "next_tokens": nxt.reshape(-1),
            "seq": np.repeat(np.arange(seqs.start, seqs.stop, dtype=np.int64), p),
            "pos": np.tile(np.arange(p, dtype=np.int64), n),
        }
        if self.spec.with_final:
            block["final"] = raw["final"].reshape(n * p, -1)
        return block

    def _prefetched(self) -> Iterator[tuple[int, dict[str, np.ndarray] | None]]:
        """(epoch, block) in schedule order, read by a background thread; None ends an epoch."""
        spec = self.spec
        q: queue.Queue = queue.Queue(maxsize=max(1, spec.read_ahead))
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                budget = self.total_tokens()
                for epoch in range(spec.epochs):
                    blocks, _ = self._epoch_order(epoch)
                    for seqs in blocks:
                        if budget <= 0:
                            break
                        if not put((epoch, self._read_block(seqs))):
                            return
                        budget -= len(seqs) * self.store.seq_len
                    if not put((epoch, None)):
                        return
                put(None)
            except BaseException as exc:  # handed to the consumer, raised there
                put(exc)

        worker = threading.Thread(target=produce, name="lenscache-read-ahead", daemon=True)
        worker.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            worker.join()

    def __iter__(self) -> Iterator[Minibatch]:
        spec = self.spec
        budget = self.total_tokens()
        emitted_tokens = 0
        index = 0
        buffer = _Buffer()
        rngs: dict[int, np.random.Generator] = {}
        for epoch, block in self._prefetched():
            if epoch not in rngs:
                rngs[epoch] = self._epoch_order(epoch)[1]
            if block is not None:
                buffer.add(block)
                if buffer.n < spec.buffer_tokens:
                    continue
            final_fill = block is None  # end of epoch: flush everything
            if buffer.n == 0:
                continue
            n = buffer.n
            order = rngs[epoch].permutation(n) if spec.shuffle else np.arange(n)
            n_full = n // spec.batch_tokens
            n_out = n if final_fill else n_full * spec.batch_tokens
            for start in range(0, n_out, spec.batch_tokens):
                if emitted_tokens >= budget:
                    return
                idx = order[start : min(start + spec.batch_tokens, n_out, start + budget - emitted_tokens)]
                emitted_tokens += idx.size
                if index >= spec.skip_batches:
                    yield self._minibatch(buffer.gather(idx), index, epoch)
                index += 1
            rest = buffer.gather(order[n_out:]) if n_out < n else None
            buffer = _Buffer()
            if rest is not None:
                buffer.add(rest)

    def _minibatch(self, rows: dict[str, np.ndarray], index: int, epoch: int) -> Minibatch:
        final = rows.get("final")
        return Minibatch(
            layers=self.layers,
            resid=_to_torch(rows["resid"], self.source.storage_dtype, self.spec.dtype),
            final=torch.from_numpy(final) if final is not None else None,
            tokens=torch.from_numpy(rows["tokens"]),
            next_tokens=torch.from_numpy(rows["next_tokens"]),
            seq=torch.from_numpy(rows["seq"]),
            pos=torch.from_numpy(rows["pos"]),
            index=index,
            epoch=epoch,
        )
