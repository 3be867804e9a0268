"""Per-token divergences between a lens's logits and the model's final distribution (nats)."""

from __future__ import annotations

import torch

from .stream import IGNORE_INDEX


def kl_to_final(final_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(final || lens) per token: (..., V) log-probs and logits -> (...)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return (final_logp.exp() * (final_logp - logp)).sum(-1)


def next_token_ce(logits: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the next token, per token (0 where the next token is unknown)."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    target = next_tokens.expand(logits.shape[:-1]).reshape(-1)
    ce = torch.nn.functional.cross_entropy(flat, target, ignore_index=IGNORE_INDEX, reduction="none")
    return ce.reshape(logits.shape[:-1])


def layer_groups(n_layers: int, batch_tokens: int, vocab: int, budget_elems: int = 1 << 25) -> list[slice]:
    """Split layers so one group's (layers, tokens, vocab) logits stay near `budget_elems` floats."""
    per = max(1, budget_elems // max(1, batch_tokens * vocab))
    return [slice(i, min(i + per, n_layers)) for i in range(0, n_layers, per)]
