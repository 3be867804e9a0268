"""The store schema: every array, dimension and metadata key of a lenscache store, described once.

A store is a Zarr v3 group. Its root attributes hold one JSON object under the key ``lenscache``
(see `StoreMeta`). Arrays (all with named dimensions and a crc32c checksum on every chunk):

============== ================================ ========================================================
array          dimensions                        content
============== ================================ ========================================================
tokens         (seq, pos)                        int32 token ids of the packed sequences
resid          (layer, seq, pos, d_model)        residual stream at the layer boundaries in ``layers``
resid_scale    (layer, seq, pos, block)          block-scaled presets only: bfloat16 scale per block
final_lo       (seq, pos, d_model)               low 16 bits of the float32 last boundary (``lo16``)
final_exact    (seq, pos, d_model)               the last boundary at compute precision (``float32``)
topk_ids       (seq, pos, k)                     int32 ids of the k most likely next tokens
topk_logprobs  (seq, pos, k)                     float32 log-probabilities of those tokens
logsumexp      (seq, pos)                        float32 log-sum-exp of the final logits
logits         (seq, pos, vocab)                 optional full final logits (storage dtype)
head/*         see `HEAD_ARRAYS`                 the output head: final norm, projection, unembedding
tokenizer/*    (byte)                            uint8 UTF-8 text (`TOKENIZER_ARRAYS`): ``json``, the fast
                                                 tokenizer's JSON; ``config``, its special tokens and flags
============== ================================ ========================================================

Layer boundaries: boundary 0 is the input of block 0 (the embedding output, including any
scaling or position embeddings), boundary i is the output of block i-1, and boundary n_layers is
the last block's output *before* the final norm. The final distribution is recovered exactly as
``log_softmax(head(boundary n_layers))``; `final.encoding` says where that boundary's full
precision lives:

- ``lo16``: the ``resid`` entry for the last boundary holds the high 16 bits of each float32
  (bfloat16 by truncation) and ``final_lo`` the low 16 bits; together they are bit-exact.
- ``float32``: ``final_exact`` holds it (used when the storage dtype cannot be split that way).
- ``resid``: the ``resid`` array already holds it exactly (storage precision >= compute precision).

Lossy presets (``storage.quant`` present; see `lenscache.quant`) always use ``float32``.
``storage.error_bound`` declares their per-value error. ``bitround``: ``resid`` is bfloat16 whose
low mantissa bits were rounded away. ``block``: ``resid`` is int8 (logical dtype ``int8``) and
``resid_scale`` (uint16 carrying bfloat16, chunked like ``resid``) holds one scale per block of
``storage.quant.block`` values along d_model; the value is ``resid * resid_scale``. Stores with a
``block`` preset are written with schema version 2 (older readers would misread the int8 values);
all others with version 1.

The tokenizer travels with the store (`lenscache.tokenizer`): the ``tokenizer`` group holds it
as bytes in uint8 arrays, so it is chunked, crc32c-checked and read through the one reader over
any fsspec store like every other array, and the metadata's ``tokenizer`` object records
``{"format", "hash", "bytes"}``, ``hash`` being the sha256 of those bytes that a reader checks
before use (the build's identity keeps `tokenizer_hash`, of the tokenizer's definition, in
``model.tokenizer.hash``). Stores built before it have neither the group nor the key and still
open: ``tokenizer`` is the one optional metadata key. Adding it kept the schema version, as older
readers ignore unknown metadata keys and open the extra uint8 arrays as plain numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import StoreError

SCHEMA_VERSION = 2  # the newest this lenscache reads and writes (2: block-scaled resid)
QUANT_SCHEMA_VERSION = 2  # written only by block-scaled presets; other stores stay version 1
META_KEY = "lenscache"

TOKENS = "tokens"
RESID = "resid"
RESID_SCALE = "resid_scale"
FINAL_LO = "final_lo"
FINAL_EXACT = "final_exact"
TOPK_IDS = "topk_ids"
TOPK_LOGPROBS = "topk_logprobs"
LOGSUMEXP = "logsumexp"
LOGITS = "logits"
HEAD = "head"
TOKENIZER = "tokenizer"
TOKENIZER_ARRAYS = ("json", "config")  # each 1-D uint8 with dimensions TOKENIZER_DIMS
TOKENIZER_DIMS = ("byte",)
TOKENIZER_FORMAT = 1  # the layout of the tokenizer arrays and of the config JSON
# name -> dimension names; every head array is float32
HEAD_ARRAYS = {
    "norm_weight": ("d_model",),
    "norm_bias": ("d_model",),
    "proj_out": ("d_head_in", "d_model"),
    "unembed": ("vocab", "d_head_in"),
    "unembed_bias": ("vocab",),
}

DIMS = {
    TOKENS: ("seq", "pos"),
    RESID: ("layer", "seq", "pos", "d_model"),
    RESID_SCALE: ("layer", "seq", "pos", "block"),
    FINAL_LO: ("seq", "pos", "d_model"),
    FINAL_EXACT: ("seq", "pos", "d_model"),
    TOPK_IDS: ("seq", "pos", "k"),
    TOPK_LOGPROBS: ("seq", "pos", "k"),
    LOGSUMEXP: ("seq", "pos"),
    LOGITS: ("seq", "pos", "vocab"),
}

# Attribute on an array whose zarr dtype is a carrier for a dtype zarr lacks (bfloat16 as uint16).
LOGICAL_DTYPE_ATTR = "lenscache_dtype"

BUILD_STATUSES = ("initializing", "building", "complete")
FINAL_ENCODINGS = ("lo16", "float32", "resid")
QUANT_SCHEMES = ("bitround", "block")

MiB = 1 << 20
CHUNK_TARGET_BYTES = 4 * MiB
CHUNK_MAX_BYTES = 16 * MiB


@dataclass
class HeadSpec:
    """How the stored head arrays turn the last boundary into logits (see `lenscache.head`)."""

    norm: str  # "rms" | "layer" | "none"
    eps: float
    weight_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + weight)
    softcap: float | None = None  # Gemma 2: logits = softcap * tanh(logits / softcap)
    has_norm_bias: bool = False
    has_proj_out: bool = False
    has_unembed_bias: bool = False
    check_max_abs_error: float | None = None  # head vs the model's own logits, first batch


@dataclass
class BuildState:
    status: str = "initializing"
    committed: int = 0  # sequences [0, committed) are complete in every array
    seqs_per_chunk: int = 1
    batch_size: int = 1
    identity: dict[str, Any] = field(default_factory=dict)  # what a resume must match
    started: str = ""
    finished: str | None = None


@dataclass
class StoreMeta:
    """The root group's ``lenscache`` attribute."""

    schema_version: int
    package_version: str
    created: str
    model: dict[str, Any]
    data: dict[str, Any]
    seq_len: int
    n_sequences: int
    n_layers: int  # blocks in the model; boundaries run 0..n_layers
    layers: list[int]  # boundaries stored in `resid`, in order
    d_model: int
    vocab_size: int
    storage: dict[str, Any]  # {"dtype", "codec", ...} for resid
    final: dict[str, Any]  # {"encoding", "topk", "full_logits"}
    head: HeadSpec
    build: BuildState
    # {"format", "hash", "bytes"} of the stored tokenizer; None in stores built before it was stored
    tokenizer: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> StoreMeta:
        """Parse and validate; a store written by a newer lenscache is refused, not misread."""
        if not isinstance(raw, dict):
            raise StoreError(f"store metadata '{META_KEY}' is not an object")
        version = raw.get("schema_version")
        if not isinstance(version, int):
            raise StoreError("store metadata has no integer schema_version")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"store has schema version {version}, newer than this lenscache understands "
                f"({SCHEMA_VERSION}); upgrade lenscache to read it"
            )
        fields = dataclasses.fields(cls)
        # keys added later have defaults, so that stores written before them still open
        required = {
            f.name
            for f in fields
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - raw.keys())
        if missing:
            raise StoreError(f"store metadata is missing keys: {', '.join(missing)}")
        try:
            values = {f.name: raw[f.name] for f in fields if f.name in raw}
            values["head"] = HeadSpec(**raw["head"])
            values["build"] = BuildState(**raw["build"])
            meta = cls(**values)
        except TypeError as exc:
            raise StoreError(f"store metadata is malformed: {exc}") from exc
        meta.validate()
        return meta

    def validate(self) -> None:
        def need(cond: bool, what: str) -> None:
            if not cond:
                raise StoreError(f"store metadata is inconsistent: {what}")

        need(self.seq_len >= 1 and self.n_sequences >= 0, "seq_len/n_sequences out of range")
        need(self.build.status in BUILD_STATUSES, f"unknown build status {self.build.status!r}")
        need(0 <= self.build.committed <= self.n_sequences, "committed count outside [0, n_sequences]")
        need(
            self.final.get("encoding") in FINAL_ENCODINGS,
            f"unknown final encoding {self.final.get('encoding')!r}",
        )
        quant = self.storage.get("quant")
        if quant is not None:
            need(
                isinstance(quant, dict) and quant.get("scheme") in QUANT_SCHEMES,
                f"unknown storage quantization {quant!r}",
            )
            need(self.final.get("encoding") == "float32", "a lossy preset needs the float32 final encoding")
        need(len(self.layers) == len(set(self.layers)), "duplicate layers")
        need(
            all(isinstance(i, int) and 0 <= i <= self.n_layers for i in self.layers),
            "layer outside 0..n_layers",
        )
        need(self.head.norm in ("rms", "layer", "none"), f"unknown head norm {self.head.norm!r}")
        if self.data.get("packing") == "padded":
            lengths = self.data.get("lengths")
            need(
                isinstance(lengths, list)
                and len(lengths) == self.n_sequences
                and all(isinstance(n, int) and 1 <= n <= self.seq_len for n in lengths),
                "a padded store needs one length in 1..seq_len per sequence",
            )
        tok = self.tokenizer
        need(tok is None or (isinstance(tok, dict) and isinstance(tok.get("hash"), str)), "no tokenizer hash")

    @property
    def committed(self) -> int:
        return self.build.committed

    @property
    def complete(self) -> bool:
        return self.build.status == "complete"


def plan_seq_chunks(bytes_per_seq: int, n_sequences: int, multiple_of: int = 1) -> int:
    """Sequences per chunk: aim for CHUNK_TARGET_BYTES, a multiple of `multiple_of`, at most n_sequences."""
    target = max(1, round(CHUNK_TARGET_BYTES / max(1, bytes_per_seq)))
    target = max(multiple_of, (target // multiple_of) * multiple_of)
    return max(1, min(target, n_sequences))


def plan_pos_chunk(seqs_per_chunk: int, seq_len: int, bytes_per_pos: int) -> int:
    """Positions per chunk: the whole sequence unless a chunk would pass CHUNK_MAX_BYTES."""
    if seqs_per_chunk * seq_len * bytes_per_pos <= CHUNK_MAX_BYTES:
        return seq_len
    return max(1, CHUNK_TARGET_BYTES // (seqs_per_chunk * bytes_per_pos))
