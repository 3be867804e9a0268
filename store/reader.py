"""The one reader of lenscache stores. Fitting, analysis and the tools all go through `open_store`.

Opening a store someone else wrote is safe: before any chunk is read, the checks of
`lenscache.guard` run (codec and dtype allowlists, declared shapes against the metadata, chunk
sizes), every chunk is read through `GuardedStore` (its declared decompressed size is checked
before zarr decompresses it), and a local store may hold no symbolic link or special file
(`lenscache.location`). Readers see only committed sequences, so a store that is still being built
can be read while it grows.
"""

from __future__ import annotations

import itertools
import os
from functools import cached_property
from typing import Any

import numpy as np
import torch
import zarr
from zarr.core.sync import sync

from . import location
from .encoding import decode, join_lo16, logical_dtype
from .errors import LensCacheError, SelectionError, StoreError
from .guard import (
    GuardedStore,
    check_array_safe,
    check_declared_sizes,
    safe_reason,
)
from .head import Unembed
from .quant import block_dequantize
from .schema import (
    FINAL_EXACT,
    FINAL_LO,
    HEAD,
    LOGITS,
    LOGSUMEXP,
    META_KEY,
    RESID,
    RESID_SCALE,
    TOKENS,
    TOPK_IDS,
    TOPK_LOGPROBS,
    StoreMeta,
)

Seqs = slice | range | np.ndarray | list[int]


class Store:
    """A read-only view of a lenscache store (local path or fsspec URL)."""

    def __init__(self, url: str | os.PathLike):
        self.url = str(url)
        kind = location.classify(url)
        if kind == "absent":
            raise StoreError(f"no store at {url}: nothing exists there")
        if kind != "store":
            raise StoreError(
                f"{url} is not a lenscache store (no readable zarr.json with lenscache metadata)"
            )
        # Members are found by listing the store, never taken from consolidated metadata, whose
        # hand-edited names could point outside the store; such names are refused outright.
        consolidated = (location.root_document(url).get("consolidated_metadata") or {}).get("metadata") or {}
        bad = sorted(name for name in consolidated if location.unsafe_member(name))
        if bad:
            raise StoreError(
                f"store {url} lists members outside the store ({', '.join(bad)}); refusing to open it"
            )
        root = location.local_root(url)
        if root is not None:
            location.check_local_tree(root)  # no link or special file anywhere in the store
        guard = GuardedStore(location.zarr_store(url, read_only=True))
        try:
            self.group = zarr.open_group(store=guard, mode="r", use_consolidated=False)
        except LensCacheError:
            raise
        except Exception as exc:  # zarr raises many types for malformed metadata
            raise StoreError(f"cannot open {url} as a Zarr v3 group: {exc}") from exc
        self.meta = StoreMeta.from_dict(self.group.attrs.get(META_KEY))
        self.arrays: dict[str, zarr.Array] = {}
        try:
            members = list(self.group.members(max_depth=None))
        except LensCacheError:
            raise
        except Exception as exc:
            raise StoreError(f"cannot read the array metadata of {url}: {exc}") from exc
        for path, node in members:
            if isinstance(node, zarr.Array):
                check_array_safe(path, node)
                self.arrays[path] = node
        # only now may chunks be read: each through the rule of its checked array
        guard.rules.update(check_declared_sizes(self.meta, self.arrays))
        for required in (TOKENS, RESID, LOGSUMEXP):
            if required not in self.arrays:
                raise StoreError(f"store {url} has no {required!r} array")
        quant = self.meta.storage.get("quant") or {}
        self._block = int(quant["block"]) if quant.get("scheme") == "block" else None
        if self._block is not None and RESID_SCALE not in self.arrays:
            raise StoreError(f"store {url} uses block-scaled {RESID!r} but has no {RESID_SCALE!r} array")

    # ---- shape of what is readable -------------------------------------------------------------
    @property
    def n_sequences(self) -> int:
        """Committed sequences: the only ones a reader sees."""
        return self.meta.committed

    @property
    def seq_len(self) -> int:
        return self.meta.seq_len

    @property
    def layers(self) -> list[int]:
        return list(self.meta.layers)

    @property
    def d_model(self) -> int:
        return self.meta.d_model

    @property
    def padded(self) -> bool:
        """Built with padded packing: one document per sequence (see `lengths`)."""
        return self.meta.data.get("packing") == "padded"

    def lengths(self, seqs: Seqs | None = None) -> np.ndarray:
        """int64 real length of each sequence: its document (plus BOS) in a padded store, else seq_len.

        Position ``lengths - 1`` is a prompt's last token, whose next-token prediction it studies.
        """
        n = self.n_sequences
        full = np.asarray(self.meta.data["lengths"], dtype=np.int64) if self.padded else np.full(n, self.seq_len)
        return full[: n][self._seqs(seqs)]

    def layer_index(self, boundary: int) -> int:
        try:
            return self.meta.layers.index(boundary)
        except ValueError:
            raise StoreError(f"layer {boundary} is not in this store (it has {self.meta.layers})") from None

    # ---- reading ---------------------------------------------------------------------------------
    def _seqs(self, seqs: Seqs | None) -> slice | np.ndarray:
        n = self.n_sequences
        if seqs is None:
            return slice(0, n)
        if isinstance(seqs, range):
            seqs = slice(seqs.start, seqs.stop, seqs.step)
        if isinstance(seqs, slice):
            start, stop, step = seqs.indices(n)
            if (seqs.stop or 0) > n:
                raise SelectionError(f"sequences up to {seqs.stop} requested but only {n} are committed")
            return slice(start, stop, step)
        idx = np.asarray(seqs, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise SelectionError(f"sequence index outside the {n} committed sequences")
        return idx

    def _read(self, name: str, selection: tuple) -> np.ndarray:
        """Read a selection; a failed chunk is reported by array and chunk index, never returned."""
        arr = self.arrays[name]
        try:
            if any(isinstance(s, np.ndarray) for s in selection):
                return arr.get_orthogonal_selection(selection)
            return arr[selection]
        except Exception as exc:
            bad = self._find_bad_chunk(name, selection)
            where = f"chunk {bad}" if bad else "a chunk"
            raise StoreError(
                f"array {name!r}: {where} is corrupt or unreadable ({safe_reason(exc)})"
            ) from exc

    def _find_bad_chunk(self, name: str, selection: tuple) -> tuple[int, ...] | None:
        arr = self.arrays[name]
        full = tuple(slice(None) if s is Ellipsis else s for s in selection)
        full = (full + (slice(None),) * arr.ndim)[: arr.ndim]
        ranges = []
        for sel, chunk, size in zip(full, arr.chunks, arr.shape, strict=True):
            if isinstance(sel, slice):
                start, stop, _ = sel.indices(size)
                ranges.append(range(start // chunk, max(start, stop - 1) // chunk + 1))
            elif isinstance(sel, np.ndarray):
                ranges.append(sorted({int(i) // chunk for i in sel}))
            else:
                ranges.append([int(sel) // chunk])
        for coords in itertools.product(*ranges):
            try:
                arr.get_block_selection(coords)
            except Exception:
                return coords
        return None

    def _decoded(self, name: str, selection: tuple) -> np.ndarray:
        arr = self.arrays[name]
        return decode(self._read(name, selection), logical_dtype(dict(arr.attrs), arr.dtype))

    def tokens(self, seqs: Seqs | None = None) -> np.ndarray:
        """int32 token ids (n, seq_len)."""
        return self._read(TOKENS, (self._seqs(seqs),))

    def resid(self, layer: int, seqs: Seqs | None = None) -> np.ndarray:
        """float32 residual stream at boundary `layer`, (n, seq_len, d_model).

        The last boundary is returned at full precision when the store keeps it (see schema).
        """
        if layer == self.meta.n_layers:
            return self.final_resid(seqs)
        return self._resid_stored(layer, seqs)

    def _resid_stored(self, layer: int, seqs: Seqs | None) -> np.ndarray:
        """float32 of what `resid` stores for `layer` (lossy presets: within the declared bound)."""
        sel = (self.layer_index(layer), self._seqs(seqs))
        if self._block is not None:
            return block_dequantize(self._read(RESID, sel), self._read(RESID_SCALE, sel), self._block)
        return self._decoded(RESID, sel)

    @property
    def codec(self) -> str:
        """The codec preset `resid` was written with (see `lenscache.encoding.PRESETS`)."""
        return str(self.meta.storage.get("codec", ""))

    @property
    def error_bound(self) -> dict[str, Any] | None:
        """The declared per-value error bound of `resid` (None in stores that predate it)."""
        return self.meta.storage.get("error_bound")

    @property
    def storage_dtype(self) -> str:
        """The dtype `resid_raw` returns, as `decode` names it (bfloat16 | float16 | float32).

        Block-scaled stores return float32 here: their int8 values mean nothing without the scales,
        so `resid_raw` decodes them."""
        if self._block is not None:
            return "float32"
        arr = self.arrays[RESID]
        return logical_dtype(dict(arr.attrs), arr.dtype)

    def resid_raw(self, layer: int, seqs: Seqs | None = None) -> np.ndarray:
        """The stored carrier of boundary `layer` (see `storage_dtype`), undecoded: half the bytes of
        `resid` for bfloat16, for readers that buffer data and decode only what they use
        (`decode_raw` turns it into float32). Block-scaled stores return float32 (decoded)."""
        if self._block is not None:
            return self._resid_stored(layer, seqs)
        return self._read(RESID, (self.layer_index(layer), self._seqs(seqs)))

    def decode_raw(self, raw: np.ndarray) -> np.ndarray:
        """float32 of what `resid_raw` returned."""
        return decode(raw, self.storage_dtype)

    def final_resid(self, seqs: Seqs | None = None) -> np.ndarray:
        """The last block's output before the final norm, exactly as the model computed it."""
        sel = self._seqs(seqs)
        encoding = self.meta.final["encoding"]
        if encoding == "float32":
            return self._read(FINAL_EXACT, (sel,))
        if encoding == "lo16":
            hi = self._read(RESID, (self.layer_index(self.meta.n_layers), sel))
            return join_lo16(hi, self._read(FINAL_LO, (sel,)))
        return self._resid_stored(self.meta.n_layers, sel)

    @cached_property
    def unembed(self) -> Unembed:
        """The model's output head, rebuilt from the store."""
        arrays: dict[str, Any] = {}
        prefix = f"{HEAD}/"
        for path in self.arrays:
            if path.startswith(prefix):
                arrays[path[len(prefix) :]] = self._read(path, (Ellipsis,))
        if "unembed" not in arrays:
            raise StoreError(f"store {self.url} has no head/unembed array")
        return Unembed(self.meta.head, arrays)

    def tokenizer(self) -> Any:
        """The store's own tokenizer, rebuilt offline and hash-checked (`lenscache.tokenizer`); loaded once."""
        return self._own_tokenizer

    @cached_property
    def _own_tokenizer(self) -> Any:
        from .tokenizer import stored_tokenizer

        return stored_tokenizer(self)

    def final_logprobs(self, seqs: Seqs | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """Exact final next-token log-probabilities (n, seq_len, vocab), recomputed from the head."""
        h = torch.from_numpy(self.final_resid(seqs)).to(device)
        return self.unembed.to(device).log_probs(h)

    def topk(self, seqs: Seqs | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, log-probs) of the k most likely next tokens, (n, seq_len, k) each."""
        if TOPK_IDS not in self.arrays:
            raise StoreError("this store was built without top-k (--topk 0)")
        sel = self._seqs(seqs)
        return self._read(TOPK_IDS, (sel,)), self._read(TOPK_LOGPROBS, (sel,))

    def logsumexp(self, seqs: Seqs | None = None) -> np.ndarray:
        return self._read(LOGSUMEXP, (self._seqs(seqs),))

    def logits(self, seqs: Seqs | None = None) -> np.ndarray:
        """Stored full logits (only in stores built with --full-logits)."""
        if LOGITS not in self.arrays:
            raise StoreError("this store has no full logits; use final_logprobs() to recompute them exactly")
        return self._decoded(LOGITS, (self._seqs(seqs),))

    # ---- sizes -----------------------------------------------------------------------------------
    def stored_bytes(self) -> dict[str, int]:
        """Bytes on storage per array (compressed), from a listing of the store."""

        async def total(prefix: str) -> int:
            store = self.group.store
            size = 0
            async for key in store.list_prefix(prefix):
                size += await store.getsize(key)
            return size

        return {name: sync(total(f"{name}/")) for name in self.arrays}

    def chunk_keys(self, name: str) -> set[str]:
        async def collect() -> set[str]:
            return {k async for k in self.group.store.list_prefix(f"{name}/c/")}

        return sync(collect())


def open_store(url: str | os.PathLike) -> Store:
    """Open a store for reading (local path or fsspec URL)."""
    return Store(url)
