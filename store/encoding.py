"""Storage dtypes and codec presets: how float activations become chunk bytes, and back.

Zarr has no bfloat16, so bfloat16 values are stored as their raw 16 bits in a uint16 array that
carries the attribute ``lenscache_dtype: bfloat16``; `decode` turns any stored block back into
float32. Every preset ends with zarr's crc32c codec, so a flipped bit fails loudly on read.

Lossy presets (``quant`` set) round or quantize in the build's encode step (`lenscache.quant`) and
declare their per-value error bound (`CodecPreset.error_bound`, recorded in the store metadata);
docs/codecs.md compares them all on SmolLM2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from zarr.codecs import BloscCodec, BloscShuffle, BytesCodec, Crc32cCodec

from . import quant
from .errors import StoreError
from .schema import LOGICAL_DTYPE_ATTR, RESID_SCALE

# zarr dtype that carries each logical storage dtype
CARRIER = {"bfloat16": "uint16", "float16": "float16", "float32": "float32", "int8": "int8"}
_TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class CodecPreset:
    """A named way to store the residual stream: storage dtype plus compressor settings."""

    name: str
    dtype: str  # logical dtype of the `resid` array
    description: str
    clevel: int = 1
    quant: str | None = None  # None (exact for `dtype`) | "bitround" | "block" (see lenscache.quant)
    keepbits: int | None = None  # bitround: mantissa bits kept
    bits: int | None = None  # block: integer bits per value (8 or 4)
    block: int = 32  # block: values per scale along d_model
    rms_step: float | None = None  # block: scales at least this fraction of the token's RMS
    late_layers: int = 0  # block: boundaries >= n_layers - late_layers use `late_rms_step`
    late_rms_step: float | None = None

    def rms_step_for(self, boundary: int, n_layers: int) -> float | None:
        """The RMS step used at `boundary` (finer near the output, where lens KLs are small)."""
        if self.late_layers and boundary >= n_layers - self.late_layers:
            return self.late_rms_step
        return self.rms_step

    shuffle: str = field(default="byte")  # blosc shuffle for resid: byte | bit

    def compressors(self, itemsize: int) -> list[Any]:
        return compressors(itemsize, self.clevel, bitshuffle=self.shuffle == "bit")

    @property
    def lossy(self) -> bool:
        """True when stored values differ from the input beyond rounding to the storage dtype."""
        return self.quant is not None

    @property
    def float_dtype(self) -> str:
        """Storage dtype for the store's other float arrays (full logits)."""
        return "bfloat16" if self.dtype == "int8" else self.dtype

    def error_bound(self) -> dict[str, Any]:
        """The declared per-value error bound, as recorded in the store metadata."""
        if self.quant == "bitround":
            return {
                "kind": "relative",
                "value": 2.0 ** -(self.keepbits + 1),
                "floor": 2.0**-126,
                "text": f"|x - y| <= 2^-{self.keepbits + 1} * max(|x|, 2^-126)",
            }
        if self.quant == "block":
            q = quant.qmax(self.bits)
            limit = f"absmax_of_block / {q}"
            if self.rms_step is not None:
                limit = f"max({limit}, rms_of_token * {self.rms_step:g})"
            if self.late_layers:
                limit += (
                    f" (rms_of_token * {self.late_rms_step:g} at boundaries >= n_layers - {self.late_layers})"
                )
            return {
                "kind": "block_scale",
                "block": self.block,
                "qmax": q,
                "rms_step": self.rms_step,
                "late_layers": self.late_layers,
                "late_rms_step": self.late_rms_step,
                "text": (
                    f"|x - y| <= scale/2 per value, scale (stored per block of {self.block} along d_model, "
                    f"bfloat16 rounded up) <= {limit} * (1 + 2^-7)"
                ),
            }
        rel = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 0.0}[self.dtype]
        floor = {"bfloat16": 2.0**-126, "float16": 2.0**-14, "float32": 2.0**-126}[self.dtype]
        return {
            "kind": "relative",
            "value": rel,
            "floor": floor,
            "text": f"round to nearest {self.dtype}: |x - y| <= {rel:g} * max(|x|, {floor:g})",
        }

    def storage_meta(self) -> dict[str, Any]:
        """The store metadata's ``storage`` object for this preset."""
        meta: dict[str, Any] = {
            "dtype": self.dtype,
            "codec": self.name,
            "description": self.description,
            "error_bound": self.error_bound(),
        }
        if self.quant == "bitround":
            meta["quant"] = {"scheme": "bitround", "keepbits": self.keepbits}
        elif self.quant == "block":
            meta["quant"] = {
                "scheme": "block",
                "bits": self.bits,
                "block": self.block,
                "scale_array": RESID_SCALE,
                "scale_dtype": "bfloat16",
                "rms_step": self.rms_step,
                "late_layers": self.late_layers,
                "late_rms_step": self.late_rms_step,
            }
        return meta


PRESETS: dict[str, CodecPreset] = {
    p.name: p
    for p in (
        CodecPreset("bf16-zstd", "bfloat16", "bfloat16 bits, byte shuffle, zstd (lossless for bfloat16)"),
        CodecPreset(
            "fp16-zstd",
            "float16",
            "float16, byte shuffle, zstd; values beyond +-65504 are refused as overflow",
        ),
        CodecPreset("fp32-zstd", "float32", "float32, byte shuffle, zstd (lossless)"),
        CodecPreset(
            "bf16r4-zstd",
            "bfloat16",
            "mantissa rounded to 4 bits (relative error <= 2^-5), bfloat16 bits, byte shuffle, zstd",
            quant="bitround",
            keepbits=4,
        ),
        CodecPreset(
            "bf16r3-zstd",
            "bfloat16",
            "mantissa rounded to 3 bits (relative error <= 2^-4), bfloat16 bits, byte shuffle, zstd",
            quant="bitround",
            keepbits=3,
        ),
        CodecPreset(
            "int8b32-zstd",
            "int8",
            "int8 with one bfloat16 scale per 32 values (|error| <= absmax/254 per block), zstd",
            quant="block",
            bits=8,
        ),
        CodecPreset(
            "int8rms16-zstd",
            "int8",
            "int8 with one bfloat16 scale per 32 values, scale = max(absmax/127, token RMS/16) "
            "(|error| <= max(absmax/254, RMS/32) per block), zstd",
            quant="block",
            bits=8,
            rms_step=1 / 16,
        ),
        CodecPreset(
            "int8rms12-zstd",
            "int8",
            "int8 with one bfloat16 scale per 32 values, scale = max(absmax/127, token RMS/12) "
            "(|error| <= max(absmax/254, RMS/24) per block), zstd",
            quant="block",
            bits=8,
            rms_step=1 / 12,
        ),
        CodecPreset(
            "int8rms10l16-zstd",
            "int8",
            "int8 with one bfloat16 scale per 32 values, scale = max(absmax/127, token RMS/10), "
            "RMS/16 at boundaries >= n_layers - 4 (where lens KLs are smallest), zstd",
            quant="block",
            bits=8,
            rms_step=1 / 10,
            late_layers=4,
            late_rms_step=1 / 16,
        ),
        CodecPreset(
            "int8rms8-zstd",
            "int8",
            "int8 with one bfloat16 scale per 32 values, scale = max(absmax/127, token RMS/8) "
            "(|error| <= max(absmax/254, RMS/16) per block), zstd",
            quant="block",
            bits=8,
            rms_step=1 / 8,
        ),
        CodecPreset(
            "int4b32-zstd",
            "int8",
            "4-bit integers with one bfloat16 scale per 32 values (|error| <= absmax/14 per block), zstd",
            quant="block",
            bits=4,
        ),
    )
}
DEFAULT_PRESET = "bf16-zstd"


def get_preset(name: str) -> CodecPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise StoreError(f"unknown codec preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


# Measured on SmolLM2 bf16 residuals, one core: blosc's default blocks (tens of KiB) give 1.26x;
# 1 MiB blocks give 1.44x at ~370 MB/s encode and ~860 MB/s decode. Level 3 gains nothing on the
# random low mantissa byte and encodes ~4x slower.
BLOSC_BLOCKSIZE = 1 << 20


def compressors(itemsize: int, clevel: int = 1, bitshuffle: bool = False) -> list[Any]:
    """Byte-shuffled zstd through blosc (multi-threaded, releases the GIL), then a crc32c checksum."""
    shuffle = BloscShuffle.shuffle if itemsize > 1 else BloscShuffle.noshuffle
    if bitshuffle:
        shuffle = BloscShuffle.bitshuffle
    blosc = BloscCodec(
        cname="zstd", clevel=clevel, shuffle=shuffle, typesize=itemsize, blocksize=BLOSC_BLOCKSIZE
    )
    return [blosc, Crc32cCodec()]


SERIALIZER = BytesCodec(endian="little")


def encode(x: torch.Tensor, dtype: str) -> np.ndarray:
    """A float tensor (any float dtype, CPU) as the carrier array of storage `dtype`."""
    if dtype == "bfloat16":
        # torch rounds to nearest even, as every bf16 producer does
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return x.to(_TORCH[dtype]).numpy()


def encode_into(out: np.ndarray, x: torch.Tensor, dtype: str) -> None:
    """`out[...] = encode(x, dtype)` without the intermediate array (same rounding)."""
    dst = torch.from_numpy(out.view(np.int16) if dtype == "bfloat16" else out)
    (dst.view(torch.bfloat16) if dtype == "bfloat16" else dst).copy_(x)


def decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    """A stored block as float32."""
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


def split_lo16(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """float32 -> (high 16 bits, low 16 bits); the high half is bfloat16 by truncation."""
    bits = x.to(torch.float32).contiguous().numpy().view(np.uint32)
    return (bits >> 16).astype(np.uint16), (bits & 0xFFFF).astype(np.uint16)


def join_lo16(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Inverse of `split_lo16`: the exact float32."""
    return ((hi.astype(np.uint32) << 16) | lo.astype(np.uint32)).view(np.float32)


def logical_dtype(array_attrs: dict[str, Any], zarr_dtype: np.dtype) -> str:
    """The logical dtype of a stored array: its carrier attribute, or its zarr dtype."""
    return str(array_attrs.get(LOGICAL_DTYPE_ATTR, np.dtype(zarr_dtype).name))
