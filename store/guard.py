"""What the reader checks before it trusts a store someone else wrote (`lenscache.reader` applies it).

Every array's metadata is checked against an allowlist of codecs (no pickle or unknown codecs,
which could run code) and numeric dtypes. Declared sizes are not trusted: every array's shape must
be the one the store metadata implies (`expected_shapes`), every dimension plausible and every
chunk at most `MAX_CHUNK_BYTES`; `GuardedStore` checks the decompressed size each chunk's
compressed header declares (`check_chunk`) before zarr decompresses it. Error messages go through
`safe_reason`, so they never echo a chunk's bytes.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import numcodecs.zstd
import numpy as np
import zarr
from zarr.storage import WrapperStore

from . import location
from .errors import LensCacheError, StoreError
from .quant import n_blocks
from .schema import (
    DIMS,
    FINAL_EXACT,
    FINAL_LO,
    HEAD,
    HEAD_ARRAYS,
    LOGITS,
    LOGSUMEXP,
    RESID,
    RESID_SCALE,
    TOKENIZER,
    TOKENIZER_ARRAYS,
    TOKENIZER_DIMS,
    TOKENS,
    TOPK_IDS,
    TOPK_LOGPROBS,
    StoreMeta,
)

SAFE_CODECS = frozenset({"bytes", "blosc", "zstd", "gzip", "crc32c", "transpose"})
COMPRESSORS = frozenset({"blosc", "zstd", "gzip"})
SAFE_DTYPE_KINDS = frozenset("iuf")  # integers and floats; never object, string or void

# Plausibility bounds on what a store may declare, far above any real model or cache: past them a
# declared size is refused at open instead of becoming an allocation or a loop later.
MAX_WIDTH = 1 << 20  # d_model, and the head's input width
MAX_VOCAB = 1 << 24
MAX_SEQ_LEN = 1 << 24
MAX_BLOCKS = 1 << 16  # n_layers
MAX_TOKENS = 1 << 40  # n_sequences * seq_len
MAX_TOKENIZER_BYTES = 1 << 30
# Decoded bytes of one chunk. Builds write 4-16 MiB; this is what one chunk read may allocate.
MAX_CHUNK_BYTES = 256 << 20


def check_array_safe(path: str, array: zarr.Array) -> None:
    """Refuse arrays whose decoding could execute code or that are not plain numbers."""
    md = array.metadata
    if getattr(md, "zarr_format", None) != 3:
        raise StoreError(f"array {path!r} is not a Zarr v3 array; lenscache stores are Zarr v3 only")
    kind = np.dtype(array.dtype).kind if isinstance(array.dtype, np.dtype) else "O"
    if kind not in SAFE_DTYPE_KINDS:
        raise StoreError(f"array {path!r} has non-numeric dtype {array.dtype}; refusing to open it")
    for codec in md.codecs:
        name = codec.to_dict()["name"]
        if name not in SAFE_CODECS:
            raise StoreError(
                f"array {path!r} uses codec {name!r}, which lenscache does not open (allowed: "
                f"{', '.join(sorted(SAFE_CODECS))}); refusing before reading any data"
            )


def safe_reason(exc: BaseException) -> str:
    """Why a read failed, never echoing chunk bytes: lenscache's own messages in full, a checksum
    mismatch by name (zarr's message quotes the stored checksum bytes), anything else by its type,
    with its message only when that is short plain text without quotes (no bytes literal)."""
    if isinstance(exc, LensCacheError):
        return str(exc)
    text = str(exc)
    if "checksum" in text.lower():
        return "crc32c checksum mismatch"
    plain = text.isascii() and text.isprintable() and not any(c in text for c in "'\"\\")
    return f"{type(exc).__name__}: {text}" if plain and 0 < len(text) <= 160 else type(exc).__name__


# ---- declared sizes ------------------------------------------------------------------------------
def _whole(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def check_meta_sizes(meta: StoreMeta) -> None:
    """Refuse metadata whose sizes are not plausible (see the MAX_* bounds)."""
    checks = [
        ("seq_len", meta.seq_len, 1, MAX_SEQ_LEN),
        ("n_sequences", meta.n_sequences, 0, MAX_TOKENS),
        ("n_layers", meta.n_layers, 0, MAX_BLOCKS),
        ("d_model", meta.d_model, 1, MAX_WIDTH),
        ("vocab_size", meta.vocab_size, 1, MAX_VOCAB),
        ("final.topk", meta.final.get("topk"), 0, MAX_VOCAB),
    ]
    for name, value, lo, hi in checks:
        if not _whole(value, lo, hi):
            raise StoreError(
                f"store metadata declares {name} {value!r}; lenscache accepts integers in [{lo}, {hi}]"
            )
    if meta.n_sequences * meta.seq_len > MAX_TOKENS:
        raise StoreError(
            f"store metadata declares {meta.n_sequences} sequences of {meta.seq_len} tokens, more than "
            f"lenscache accepts ({MAX_TOKENS} tokens)"
        )
    if meta.final["topk"] > meta.vocab_size:
        raise StoreError(
            f"store metadata declares top-{meta.final['topk']} of a {meta.vocab_size}-token vocabulary"
        )
    if not meta.layers:
        raise StoreError("store metadata declares no layers")
    quant = meta.storage.get("quant") or {}
    if quant.get("scheme") == "block" and not _whole(quant.get("block"), 1, MAX_WIDTH):
        raise StoreError(f"store metadata declares quantization block {quant.get('block')!r}")
    tok = meta.tokenizer
    if tok is not None and not _whole(tok.get("bytes"), 0, MAX_TOKENIZER_BYTES):
        raise StoreError(f"store metadata declares a tokenizer of {tok.get('bytes')!r} bytes")


def expected_shapes(meta: StoreMeta, d_head_in: int | None = None) -> dict[str, tuple[int, ...]]:
    """The shape of every array a store with this metadata holds (head arrays as ``head/<name>``).

    `d_head_in` is the width the head's projection maps to (its proj_out rows); d_model without one.
    The tokenizer arrays have free lengths and are not listed (see `check_declared_sizes`)."""
    m = meta
    n, t, d = m.n_sequences, m.seq_len, m.d_model
    shapes = {TOKENS: (n, t), RESID: (len(m.layers), n, t, d), LOGSUMEXP: (n, t)}
    quant = m.storage.get("quant") or {}
    if quant.get("scheme") == "block":
        shapes[RESID_SCALE] = (len(m.layers), n, t, n_blocks(d, int(quant["block"])))
    if m.final["encoding"] == "lo16":
        shapes[FINAL_LO] = (n, t, d)
    elif m.final["encoding"] == "float32":
        shapes[FINAL_EXACT] = (n, t, d)
    if m.final["topk"]:
        shapes[TOPK_IDS] = shapes[TOPK_LOGPROBS] = (n, t, m.final["topk"])
    if m.final["full_logits"]:
        shapes[LOGITS] = (n, t, m.vocab_size)
    h, v = d if d_head_in is None else d_head_in, m.vocab_size
    shapes[f"{HEAD}/unembed"] = (v, h)
    if m.head.norm != "none":
        shapes[f"{HEAD}/norm_weight"] = (d,)
    if m.head.has_norm_bias:
        shapes[f"{HEAD}/norm_bias"] = (d,)
    if m.head.has_proj_out:
        shapes[f"{HEAD}/proj_out"] = (h, d)
    if m.head.has_unembed_bias:
        shapes[f"{HEAD}/unembed_bias"] = (v,)
    return shapes


def _head_width(meta: StoreMeta, arrays: dict[str, zarr.Array]) -> int:
    """The head's input width as its arrays declare it (d_model unless the head projects)."""
    if not meta.head.has_proj_out:
        return meta.d_model
    for path, axis in ((f"{HEAD}/proj_out", 0), (f"{HEAD}/unembed", 1)):
        arr = arrays.get(path)
        if arr is not None and arr.ndim == 2:
            width = int(arr.shape[axis])
            if not 1 <= width <= MAX_WIDTH:
                raise StoreError(
                    f"array {path!r} declares a head width of {width}; lenscache accepts [1, {MAX_WIDTH}]"
                )
            return width
    return meta.d_model


def _dims(path: str) -> tuple[str, ...] | None:
    if path in DIMS:
        return DIMS[path]
    group, _, name = path.rpartition("/")
    if group == HEAD:
        return HEAD_ARRAYS.get(name)
    if group == TOKENIZER and name in TOKENIZER_ARRAYS:
        return TOKENIZER_DIMS
    return None


def check_declared_sizes(meta: StoreMeta, arrays: dict[str, zarr.Array]) -> dict[str, ChunkRule]:
    """Refuse shapes the metadata does not imply and implausible chunks; the chunk rule of each array.

    Arrays the schema does not name are refused too: nothing bounds what they declare."""
    check_meta_sizes(meta)
    expected = expected_shapes(meta, _head_width(meta, arrays))
    rules = {}
    for path, arr in arrays.items():
        shape, dims = tuple(int(s) for s in arr.shape), _dims(path)
        if dims is None or (path not in expected and not path.startswith(f"{TOKENIZER}/")):
            raise StoreError(
                f"array {path!r} is not part of a lenscache store with this metadata; refusing to open it"
            )
        if path in expected:
            if shape != expected[path]:
                raise StoreError(
                    f"array {path!r} declares shape {shape}, but the store metadata implies {expected[path]}"
                )
        elif len(shape) != 1 or shape[0] > (meta.tokenizer or {}).get("bytes", MAX_TOKENIZER_BYTES):
            raise StoreError(
                f"array {path!r} declares shape {shape}; a tokenizer array holds at most the "
                f"{(meta.tokenizer or {}).get('bytes', MAX_TOKENIZER_BYTES)} bytes the metadata records"
            )
        if tuple(arr.metadata.dimension_names or ()) != dims:
            raise StoreError(
                f"array {path!r} has dimension names {arr.metadata.dimension_names}, expected {dims}"
            )
        rules[path] = chunk_rule(path, arr)
    return rules


# ---- chunks: declared decompressed sizes are checked before decompressing -------------------------
@dataclass(frozen=True)
class ChunkRule:
    """What one chunk of an array must decode to, and how its bytes are framed."""

    decoded: int  # bytes the serializer turns one chunk into: prod(chunk shape) * itemsize
    compressor: str | None  # blosc | zstd | gzip | None
    crc32c: bool  # a 4-byte crc32c trailer follows the compressed bytes


def chunk_rule(path: str, arr: zarr.Array) -> ChunkRule:
    """Refuse chunk layouts the guard cannot bound: a grid other than zarr's regular one, keys other
    than ``c/i/j``, a chunk over MAX_CHUNK_BYTES, or a codec chain other than
    ``[transpose…] bytes [blosc|zstd|gzip] [crc32c]`` (one compressor, its header the first bytes)."""
    md = arr.metadata
    if md.chunk_grid.to_dict().get("name") != "regular" or md.chunk_key_encoding.to_dict() != {
        "name": "default",
        "configuration": {"separator": "/"},
    }:
        raise StoreError(f"array {path!r} has a chunk grid or key encoding lenscache does not read")
    chunks = tuple(int(c) for c in arr.chunks)
    decoded = math.prod(chunks) * np.dtype(arr.dtype).itemsize
    if min(chunks, default=1) < 1 or decoded > MAX_CHUNK_BYTES:
        raise StoreError(
            f"array {path!r} declares chunks of shape {chunks} ({decoded:,} bytes); lenscache reads chunks "
            f"of at most {MAX_CHUNK_BYTES >> 20} MiB"
        )
    names = [codec.to_dict()["name"] for codec in md.codecs]
    while names and names[0] == "transpose":
        names.pop(0)
    crc = bool(names) and names[-1] == "crc32c"
    middle = names[1:-1] if crc else names[1:]
    if not names or names[0] != "bytes" or len(middle) > 1 or (middle and middle[0] not in COMPRESSORS):
        raise StoreError(
            f"array {path!r} has codecs {[c.to_dict()['name'] for c in md.codecs]}; lenscache reads "
            "[transpose...] bytes, at most one of blosc/zstd/gzip, then an optional crc32c"
        )
    return ChunkRule(decoded, middle[0] if middle else None, crc)


def _blosc_size(payload: np.ndarray, key: str) -> int:
    # blosc 1 header: version, versionlz, flags, typesize, then uint32 LE nbytes, blocksize, cbytes
    if payload.size < 16:
        raise StoreError(f"chunk {key!r} is too short for a blosc header")
    nbytes, blocksize, cbytes = np.frombuffer(payload[4:16].tobytes(), dtype="<u4").tolist()
    if cbytes != payload.size or blocksize > nbytes or (nbytes and not blocksize):
        raise StoreError(f"chunk {key!r} has an inconsistent blosc header")
    return nbytes


def _zstd_declared(payload: np.ndarray, key: str) -> int | None:
    """The content size a zstd frame header declares (RFC 8878, 3.1.1.1), or None when it has none."""
    head = payload[:18].tobytes()
    if len(head) < 5 or head[:4] != b"\x28\xb5\x2f\xfd":
        raise StoreError(f"chunk {key!r} is not a zstd frame")
    descriptor = head[4]
    fcs_flag, single_segment, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    width = (single_segment, 2, 4, 8)[fcs_flag]  # flag 0: one byte only in single-segment frames
    if not width:
        return None
    at = 5 + (not single_segment) + (0, 1, 2, 4)[dict_flag]
    if len(head) < at + width:
        raise StoreError(f"chunk {key!r} has a truncated zstd frame header")
    return int.from_bytes(head[at : at + width], "little") + (256 if width == 2 else 0)


def _gzip_size(payload: np.ndarray, limit: int, key: str) -> int:
    """What the gzip members decompress to, never producing more than limit + 1 bytes (gzip declares
    no reliable size, so this decompresses, bounded; zarr then decodes the same bytes again)."""
    total, rest = 0, payload.tobytes()
    while rest:
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            total += len(inflate.decompress(rest, limit - total + 1))
        except zlib.error:
            raise StoreError(f"chunk {key!r} is not valid gzip data") from None
        if total > limit or not inflate.eof:
            break
        rest = inflate.unused_data.lstrip(b"\0")  # members may follow, as may zero padding
    return total


def check_chunk(rule: ChunkRule, data: np.ndarray, key: str) -> None:
    """Refuse a chunk whose compressed header declares another decoded size than its chunk holds."""
    if rule.crc32c:
        if data.size < 4:
            raise StoreError(f"chunk {key!r} is too short for its crc32c checksum")
        data = data[:-4]
    if rule.compressor == "blosc":
        size = _blosc_size(data, key)
    elif rule.compressor == "zstd":
        declared = _zstd_declared(data, key)
        if declared is None:
            # no declared size: decompress into exactly the chunk's bytes, which fails on any other size
            try:
                numcodecs.zstd.decompress(data.tobytes(), bytearray(rule.decoded))
            except Exception:
                raise StoreError(
                    f"chunk {key!r}: its zstd frame declares no size and does not decompress to the "
                    f"{rule.decoded:,} bytes its chunk holds"
                ) from None
            declared = rule.decoded
        size = declared
    elif rule.compressor == "gzip":
        size = _gzip_size(data, rule.decoded, key)
    else:
        size = data.size
    if size != rule.decoded:
        # gzip declares nothing: its size is what the bounded decompression produced
        gzip = rule.compressor == "gzip"
        amount = f"more than {rule.decoded:,}" if gzip and size > rule.decoded else f"{size:,}"
        raise StoreError(
            f"chunk {key!r} {'decompresses to' if gzip else 'declares'} {amount} decompressed bytes where its "
            f"chunk holds {rule.decoded:,}; "
            + ("refused, decompression stopped there" if gzip else "refused before decompressing")
        )


METADATA_KEYS = frozenset({"zarr.json", ".zgroup", ".zattrs", ".zarray", ".zmetadata"})


class GuardedStore(WrapperStore):
    """The read path of every store: a chunk reaches zarr's codecs only after `check_chunk` passed.

    Until `rules` are set (after the metadata checks at open) only metadata documents are read."""

    def __init__(self, store: Any, rules: dict[str, ChunkRule] | None = None):
        super().__init__(store)
        self.rules: dict[str, ChunkRule] = dict(rules or {})

    def _with_store(self, store: Any) -> GuardedStore:
        return type(self)(store, self.rules)

    def _check(self, key: str, value: Any, byte_range: Any) -> None:
        if value is None or key.rpartition("/")[2] in METADATA_KEYS:
            return
        path, sep, _ = key.rpartition("/c/")
        rule = self.rules.get(path) if sep else None
        if rule is None or byte_range is not None:
            raise StoreError(f"refusing to read {key!r}: not a whole chunk of a checked array")
        check_chunk(rule, value.as_numpy_array(), key)

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        value = await self._store.get(key, prototype, byte_range)
        self._check(key, value, byte_range)
        return value

    async def get_partial_values(self, prototype: Any, key_ranges: Iterable[tuple[str, Any]]) -> list[Any]:
        key_ranges = list(key_ranges)
        values = await self._store.get_partial_values(prototype, key_ranges)
        for (key, byte_range), value in zip(key_ranges, values, strict=True):
            self._check(key, value, byte_range)
        return values

    async def _get_many(self, requests: Iterable[tuple[str, Any, Any]]) -> AsyncIterator[tuple[str, Any]]:
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:  # type: ignore[override]
        # the writer lock at the root is no member of the store (zarr would warn about it)
        async for key in self._store.list_dir(prefix):
            if prefix.strip("/") or not location.is_lock_member(key):
                yield key

    async def getsize(self, key: str) -> int:
        return await self._store.getsize(key)

    async def getsize_prefix(self, prefix: str) -> int:
        return await self._store.getsize_prefix(prefix)
