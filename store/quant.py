"""Lossy residual encodings with a declared error bound: mantissa rounding and block-scaled integers.

Both run in the build's encode step (vectorised torch on the host) and in the reader's decode step;
no zarr codec of ours is involved, so a store needs nothing beyond zarr's own codecs to be opened.

- **Mantissa rounding** (`bitround`): float32 rounded to nearest (ties to even) at `keepbits`
  mantissa bits, the same arithmetic as numcodecs' BitRound. With ``keepbits <= 7`` the result is
  a bfloat16 whose low mantissa bits are zero, so it is stored in the bfloat16 carrier and read
  back by the ordinary bfloat16 decode; the zero bits cost almost nothing after compression.
  Bound: ``|x - y| <= 2^-(keepbits+1) * max(|x|, 2^-126)`` (relative for normal numbers).
- **Block-scaled integers** (`block_quantize`): every run of `block` values along d_model gets one
  scale ``s = absmax / qmax`` (qmax = 127 for 8 bits, 7 for 4 bits), rounded *up* to bfloat16 so the
  bound holds for the stored scale; values are stored as ``round(x / s)`` in int8. Bound:
  ``|x - y| <= s / 2`` per value (plus float32 rounding of the product ``q * s``), where
  ``s <= absmax * (1 + 2^-7) / qmax`` (bfloat16's subnormal step 2^-133 for absmax below ~1e-38).
  One value per byte even for 4 bits: zstd's entropy coder then stores each 4-bit value in about
  3.5 bits, less than nibble packing would (4 bits). A block of 32 values with one 25,600 outlier
  is stored as coarsely as that outlier demands; the bound is stated per block for that reason.
- **Token-RMS floor** (`block_quantize(..., rms_step=c)`): the same format (int8 + bfloat16 block
  scales, same decode), but each scale is ``max(absmax / 127, c * rms)`` with ``rms`` the token's
  RMS over d_model. Blocks of small values then share one step relative to the token, which is
  what every RMS-normalised consumer sees; entropy coding turns the small integers into few bits.
  Outlier blocks (SmolLM2's ~25,600 dimensions) keep ``absmax / 127`` and are never clipped.
  Bound: ``|x - y| <= scale / 2 <= max(absmax / 254, c * rms / 2) * (1 + 2^-7)``.
"""

from __future__ import annotations

import numpy as np
import torch

# the smallest positive float32 (subnormal): a floor for scales, so all-zero blocks divide cleanly
_TINY = float(np.finfo(np.float32).smallest_subnormal)


def bitround(x: torch.Tensor, keepbits: int) -> np.ndarray:
    """float -> bfloat16 bits (uint16) rounded to nearest-even at `keepbits` mantissa bits (0..7)."""
    if not 0 <= keepbits <= 7:
        raise ValueError(f"keepbits must be in 0..7 for a bfloat16 carrier, got {keepbits}")
    bits = x.to(torch.float32).contiguous().view(torch.int32)
    drop = 23 - keepbits
    half = (1 << (drop - 1)) - 1
    lsb = (bits >> drop) & 1
    rounded = (bits + half + lsb) >> drop << drop  # arithmetic shift keeps the sign bit
    return (rounded >> 16).to(torch.int16).numpy().view(np.uint16)


def bitround_float(x: torch.Tensor, keepbits: int) -> torch.Tensor:
    """`bitround`, returned as float32 (for checks and benchmarks)."""
    hi = torch.from_numpy(bitround(x, keepbits).view(np.int16)).to(torch.int32)
    return (hi << 16).view(torch.float32)


def qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def n_blocks(d: int, block: int) -> int:
    return -(-d // block)


def _bf16_ceil(s: torch.Tensor) -> torch.Tensor:
    """Non-negative finite float32 -> bfloat16 bits (int16), rounded up."""
    return ((s.view(torch.int32) + 0xFFFF) >> 16).to(torch.int16)


def _bf16_to_float(bits: torch.Tensor) -> torch.Tensor:
    return (bits.to(torch.int32) << 16).view(torch.float32)


def block_quantize(
    x: torch.Tensor, bits: int, block: int, rms_step: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(..., d) float -> (int8 values (..., d), bfloat16-bit scales as uint16 (..., ceil(d / block))).

    Each block's scale is ``absmax / qmax``; with `rms_step` it is at least ``rms_step * rms`` of
    the value's row (one token's d_model values), so blocks of small values get the row's step
    rather than a finer one: the same error relative to the row, in fewer bits after entropy coding.
    `x` must be finite (the caller checks, to name the layer and position of a bad value).
    """
    x = x.to(torch.float32)
    *lead, d = x.shape
    nb = n_blocks(d, block)
    flat = x.reshape(-1, d)
    if nb * block != d:
        flat = torch.nn.functional.pad(flat, (0, nb * block - d))
    xb = flat.reshape(-1, nb, block)
    scale_f = xb.abs().amax(-1) / qmax(bits)
    if rms_step is not None:
        rms = torch.linalg.vector_norm(flat, dim=-1).div_(d**0.5)
        over = ~torch.isfinite(rms)  # squares beyond float32's range: redo those rows in float64
        if bool(over.any()):
            rms[over] = (torch.linalg.vector_norm(flat[over].double(), dim=-1) / d**0.5).float()
        scale_f = torch.maximum(scale_f, (rms * rms_step).unsqueeze(-1))
    scale_bits = _bf16_ceil(scale_f)
    scale = _bf16_to_float(scale_bits).clamp_min_(_TINY)
    q = torch.round(xb / scale.unsqueeze(-1)).clamp_(-qmax(bits), qmax(bits)).to(torch.int8)
    q = q.reshape(-1, nb * block)[:, :d].reshape(*lead, d)
    return q.numpy(), scale_bits.reshape(*lead, nb).numpy().view(np.uint16)


def block_dequantize(q: np.ndarray, scale_bits: np.ndarray, block: int) -> np.ndarray:
    """Inverse of `block_quantize` (up to the declared error): float32 (..., d)."""
    *lead, d = q.shape
    nb = scale_bits.shape[-1]
    # torch wants writable arrays (read-only ones, e.g. a reader's cached block, are copied)
    scale = _bf16_to_float(torch.from_numpy(np.require(scale_bits, requirements=("C", "W")).view(np.int16)))
    qt = torch.from_numpy(np.require(q, requirements=("C", "W")))
    if nb * block == d:
        out = qt.reshape(*lead, nb, block).to(torch.float32)
        out.mul_(scale.unsqueeze(-1))
        return out.reshape(*lead, d).numpy()
    per_value = scale.repeat_interleave(block, dim=-1)[..., :d]
    return (qt.to(torch.float32) * per_value).numpy()


def block_scale_float(scale_bits: np.ndarray) -> np.ndarray:
    """Stored scales as float32."""
    return (np.ascontiguousarray(scale_bits).astype(np.uint32) << 16).view(np.float32)
