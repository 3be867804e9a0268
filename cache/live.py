"""The model on a user's own text: the residual stream at every boundary and the final log-probs,
exactly as a build records them, for analyses of text that is in no store (`lenscache trajectory`).

The forward pass is the builder's (`build._forward`: the same hooks, `ResidualRecorder`, and the same
inference mode); the text is tokenized as the builder tokenizes a document (no special tokens, BOS
first when the tokenizer adds one) and the final log-probs are the stored head's (`Unembed`) applied
to the last boundary, as `Store.final_logprobs` recomputes them. The residuals are kept at compute
precision: what a store built with ``--codec fp32-zstd`` holds.

A text longer than the model's context is refused, not windowed: a window would hide the text's
beginning from its later positions, so their predictions would not be the model's on that text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lenscache.errors import DataError
from lenscache.head import Unembed

from .arch import extract_head, find_taps
from .build import _forward
from .model import LoadedModel
from .text import _bos_id


@dataclass
class LiveStates:
    """One text through the model: (P, d) float32 residuals per boundary, (P, V) final log-probs."""

    tokens: np.ndarray  # (P,) int64, BOS included when the tokenizer adds one
    resid: dict[int, torch.Tensor]
    final_logprobs: torch.Tensor
    unembed: Unembed
    n_layers: int
    d_model: int
    provenance: dict[str, Any]  # the loaded model's (id, weights_hash, ...)
    tokenizer: Any


def text_tokens(loaded: LoadedModel, text: str, prepend_bos: bool | None = None) -> np.ndarray:
    """The token ids of `text` as a build tokenizes a document; refuses empty text and text beyond the context."""
    if not text or not text.strip():
        raise DataError("the text is empty (--text / --text-file): give some text to run the model on")
    tok = loaded.tokenizer
    ids = tok(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    bos = _bos_id(tok, prepend_bos)
    ids = ([bos] if bos is not None else []) + list(ids)
    if not ids:
        raise DataError("the text is empty after tokenization (--text / --text-file)")
    check_context(loaded, len(ids))
    return np.asarray(ids, dtype=np.int64)


def check_context(loaded: LoadedModel, n_tokens: int) -> None:
    max_ctx = loaded.provenance.get("max_context")
    if max_ctx and n_tokens > max_ctx:
        raise DataError(
            f"the text is {n_tokens:,} tokens long, more than the model's context ({max_ctx:,} tokens); "
            f"shorten it to at most {max_ctx:,} tokens (lenscache does not window a live text: later "
            "positions would lose the text's beginning)"
        )


def run_tokens(loaded: LoadedModel, tokens: np.ndarray, layers: list[int] | None = None) -> LiveStates:
    """Run the model on `tokens` (P,) and record `layers` (default: every boundary 0..n_layers)."""
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if tokens.size == 0:
        raise DataError("no tokens to run the model on")
    check_context(loaded, int(tokens.size))
    taps = find_taps(loaded.model)
    n_layers = taps.n_layers
    layers = list(range(n_layers + 1)) if layers is None else sorted(set(layers))
    bad = [b for b in layers if not 0 <= b <= n_layers]
    if bad:
        raise DataError(f"layers (--layers) {bad} outside 0..{n_layers} (this model has {n_layers} blocks)")
    spec, arrays = extract_head(taps)
    unembed = Unembed(spec, arrays).to(loaded.device)
    out = _forward(loaded, taps, tokens[None, :], layers, 1, keep_logits=False)
    out.wait()
    # clones: plain tensors, not inference-mode ones, for callers that compute with them freely
    final = out.final[0].float().clone()
    with torch.no_grad():
        final_lp = unembed.log_probs(final.to(loaded.device)).cpu()
    resid = {b: s[0].float().cpu().clone() for b, s in zip(layers, out.states, strict=True)}
    resid.setdefault(n_layers, final.cpu())
    return LiveStates(
        tokens=tokens,
        resid=resid,
        final_logprobs=final_lp,
        unembed=unembed.cpu(),
        n_layers=n_layers,
        d_model=int(loaded.provenance["d_model"]),
        provenance=loaded.provenance,
        tokenizer=loaded.tokenizer,
    )


def run_text(loaded: LoadedModel, text: str, layers: list[int] | None = None) -> LiveStates:
    """`run_tokens` on `text` tokenized as a build would (see `text_tokens`)."""
    return run_tokens(loaded, text_tokens(loaded, text), layers)
