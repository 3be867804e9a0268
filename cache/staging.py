"""Between the forward pass and the writer: host copies of a batch's outputs, and their encoding
into the arrays of one row of sequences (storage dtype, overflow and finiteness checks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lenscache import quant
from lenscache.encoding import CARRIER, CodecPreset, encode, encode_into, split_lo16
from lenscache.errors import DataError
from lenscache.schema import (
    FINAL_EXACT,
    FINAL_LO,
    LOGITS,
    LOGSUMEXP,
    RESID,
    RESID_SCALE,
    TOPK_IDS,
    TOPK_LOGPROBS,
    StoreMeta,
)

_copy_stream: torch.cuda.Stream | None = None
# the smallest magnitude that rounds to inf in float16 (65504 is the largest finite value)
FLOAT16_OVERFLOW = 65520.0


@dataclass
class BatchOutput:
    """One forward pass's outputs on the host (pinned, possibly still copying from the GPU)."""

    states: list[torch.Tensor]  # (b, pos, d) per stored boundary
    final: torch.Tensor  # (b, pos, d) last boundary at compute precision
    lse: torch.Tensor  # (b, pos)
    top_ids: torch.Tensor | None
    top_logprobs: torch.Tensor | None
    logits: torch.Tensor | None
    ready: torch.cuda.Event | None = None

    @property
    def n(self) -> int:
        return self.final.shape[0]

    def wait(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()


def to_host(
    states: list[torch.Tensor],
    final: torch.Tensor,
    lse: torch.Tensor,
    top: tuple[torch.Tensor, torch.Tensor] | None,
    logits: torch.Tensor | None,
) -> BatchOutput:
    """Start copying a batch's outputs to the host; on CUDA this returns before the copies finish."""
    top_ids, top_lp = top if top is not None else (None, None)
    if final.device.type != "cuda":
        return BatchOutput(states, final, lse, top_ids, top_lp, logits)
    global _copy_stream
    if _copy_stream is None:
        _copy_stream = torch.cuda.Stream(device=final.device)
    stream = _copy_stream
    stream.wait_stream(torch.cuda.current_stream(final.device))

    def copy(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        t.record_stream(stream)  # keep the device memory alive until the copy has run
        return host

    with torch.cuda.stream(stream):
        out = BatchOutput(
            [copy(s) for s in states], copy(final), copy(lse), copy(top_ids), copy(top_lp), copy(logits)
        )
        out.ready = torch.cuda.Event()
        out.ready.record(stream)
    return out


def _first_bad(mask: torch.Tensor) -> tuple[int, int]:
    seq, pos = (int(i) for i in mask.nonzero()[0][:2])
    return seq, pos


class RowEncoder:
    """Turns the batches of one row of sequences into the arrays the writer stores."""

    def __init__(self, meta: StoreMeta, preset: CodecPreset):
        self.meta = meta
        self.preset = preset
        self.dtype = preset.dtype
        self.final_index = meta.layers.index(meta.n_layers) if meta.n_layers in meta.layers else None
        self._buffer: np.ndarray | None = None

    def _encode_resid(
        self, out: np.ndarray, x: torch.Tensor, boundary: int, row_start: int
    ) -> np.ndarray | None:
        """One boundary's block into `out` (its resid carrier); returns its block scales or None.

        Refuses what cannot be stored (non-finite values, overflow), naming layer and position.
        """
        p = self.preset
        if p.quant is None:
            self._check_range(x, boundary, row_start)
            encode_into(out, x, self.dtype)
            return None
        self._check_finite(x, boundary, row_start)
        if p.quant == "bitround":
            # rounding up past the largest float32 would give inf; refuse like float16 overflow
            limit = (2.0 - 2.0 ** -(p.keepbits + 1)) * 2.0**127
            if x.abs().max().item() >= limit:
                seq, pos = _first_bad(x.abs() >= limit)
                raise DataError(
                    f"overflow at layer {boundary}, sequence {row_start + seq}, position {pos}: rounding "
                    f"to {p.keepbits} mantissa bits exceeds float32's range; use --codec fp32-zstd"
                )
            out[...] = quant.bitround(x, p.keepbits)
            return None
        q, scale = quant.block_quantize(x, p.bits, p.block, p.rms_step_for(boundary, self.meta.n_layers))
        out[...] = q
        return scale

    def _check_finite(self, x: torch.Tensor, boundary: int | str, row_start: int) -> None:
        # One reduction finds any NaN/inf (they propagate through a sum); locate only on failure
        # (a float32 sum of large finite values may overflow: the locate step then finds nothing).
        if not torch.isfinite(x.sum()):
            bad = ~torch.isfinite(x)
            if bool(bad.any()):
                seq, pos = _first_bad(bad)
                raise DataError(
                    f"the model produced a non-finite activation at layer {boundary}, sequence {row_start + seq}, "
                    f"position {pos}; the store is left with the rows committed before it"
                )

    def _check_range(self, x: torch.Tensor, boundary: int | str, row_start: int) -> None:
        self._check_finite(x, boundary, row_start)
        if self.dtype == "float16" and x.abs().max().item() >= FLOAT16_OVERFLOW:
            seq, pos = _first_bad(x.abs() >= FLOAT16_OVERFLOW)
            raise DataError(
                f"float16 overflow at layer {boundary}, sequence {row_start + seq}, position {pos} "
                f"(|value| > 65504); use --codec bf16-zstd, which has float32's range"
            )

    def stages_in_hooks(self, device: torch.device) -> bool:
        """Whether boundaries can be encoded by `sink` during the forward pass (lossless, on CPU)."""
        return self.preset.quant is None and device.type == "cpu"

    def new_row(self, n_seqs: int, shape: tuple[int, ...]) -> np.ndarray:
        """An empty resid carrier for a row of `n_seqs` sequences of `shape` (pos, d_model)."""
        return np.empty((len(self.meta.layers), n_seqs, *shape), dtype=np.dtype(CARRIER[self.dtype]))

    def sink(self, resid: np.ndarray, offset: int, row_start: int):
        """A `ResidualRecorder` sink encoding one batch into sequences [offset, offset + b) of `resid`.

        Checks and encodes each boundary as its block finishes, while the values are in cache and
        before the model frees them; a refused value stops the forward pass with the same error.
        """

        def encode_boundary(index: int, x: torch.Tensor) -> None:
            self._encode_resid(
                resid[index, offset : offset + x.shape[0]], x, self.meta.layers[index], row_start + offset
            )

        return encode_boundary

    def _row_buffer(self, n_seqs: int, shape: tuple[int, ...]) -> np.ndarray:
        # One resid row is ~150 MB on SmolLM2; a fresh one each row costs page faults on every
        # page (about 0.2 s), so rows reuse one buffer. Safe because the writer has finished
        # encoding a row's chunks (into new buffers) before the next row is encoded.
        if self._buffer is None or self._buffer.shape[1:] != (n_seqs, *shape):
            self._buffer = self.new_row(n_seqs, shape)
        return self._buffer

    def encode_row(
        self, row_start: int, batches: list[BatchOutput], staged: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """The arrays of one row; `staged` is its resid carrier when a `sink` already filled it."""
        for b in batches:
            b.wait()
        meta = self.meta
        out: dict[str, np.ndarray] = {}
        n = sum(b.n for b in batches)
        first = batches[0].states[0] if batches[0].states else batches[0].final
        resid, scales = staged, None
        if resid is None:
            resid = self._row_buffer(n, tuple(first.shape[1:]))
            for li, boundary in enumerate(meta.layers):
                x = torch.cat([b.states[li] for b in batches]) if len(batches) > 1 else batches[0].states[li]
                scale = self._encode_resid(resid[li], x, boundary, row_start)
                if scale is not None:
                    if scales is None:
                        scales = np.empty((len(meta.layers), *scale.shape), dtype=scale.dtype)
                    scales[li] = scale
        final = torch.cat([b.final for b in batches]) if len(batches) > 1 else batches[0].final
        encoding = meta.final["encoding"]
        if encoding == "lo16":
            hi, lo = split_lo16(final)
            resid[self.final_index] = hi
            out[FINAL_LO] = lo
        elif encoding == "float32":
            self._check_finite(final, meta.n_layers, row_start)
            out[FINAL_EXACT] = final.float().numpy()
        out[RESID] = resid
        if scales is not None:
            out[RESID_SCALE] = scales
        out[LOGSUMEXP] = torch.cat([b.lse for b in batches]).numpy()
        if meta.final["topk"]:
            out[TOPK_IDS] = torch.cat([b.top_ids for b in batches]).numpy()
            out[TOPK_LOGPROBS] = torch.cat([b.top_logprobs for b in batches]).numpy()
        if meta.final["full_logits"]:
            out[LOGITS] = encode(torch.cat([b.logits for b in batches]), self.preset.float_dtype)
        return out
