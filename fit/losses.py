"""Per-token divergences between a lens's logits and the model's final distribution (nats).

Over a 49k vocabulary the elementwise passes cost nearly as much as the unembedding matmul, so
each lens logit tensor gets one log-softmax and everything else is a batched dot product with
quantities of the final distribution computed once per minibatch (`FinalDist`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .stream import IGNORE_INDEX


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product over the last axis without a (..., V) temporary."""
    shape = a.shape[:-1]
    v = a.shape[-1]
    return torch.bmm(a.reshape(-1, 1, v), b.reshape(-1, v, 1)).reshape(shape)


@dataclass
class FinalDist:
    """The model's final next-token distribution for a minibatch: (B, V) log-probs and derived terms."""

    logp: torch.Tensor
    p: torch.Tensor
    neg_entropy: torch.Tensor  # Σ p log p, (B,)
    argmax: torch.Tensor

    @classmethod
    def from_logp(cls, logp: torch.Tensor) -> FinalDist:
        logp = logp.float()
        p = logp.exp()
        return cls(logp=logp, p=p, neg_entropy=_dot(p, logp), argmax=logp.argmax(-1))

    def kl(self, lens_logp: torch.Tensor) -> torch.Tensor:
        """KL(final || lens) per token for (..., B, V) lens log-probs."""
        p = self.p.expand_as(lens_logp)
        return self.neg_entropy - _dot(p, lens_logp)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def next_token_ce(lens_logp: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the next token per token, 0 where the next token is unknown."""
    target = next_tokens.clamp(min=0).expand(lens_logp.shape[:-1]).unsqueeze(-1)
    ce = -lens_logp.gather(-1, target).squeeze(-1)
    return ce * (next_tokens != IGNORE_INDEX)


def entropy(lens_logp: torch.Tensor) -> torch.Tensor:
    return -_dot(lens_logp.exp(), lens_logp)


def layer_groups(n_layers: int, batch_tokens: int, vocab: int, budget_elems: int = 1 << 25) -> list[slice]:
    """Split layers so one group's (layers, tokens, vocab) logits stay near `budget_elems` floats."""
    per = max(1, budget_elems // max(1, batch_tokens * vocab))
    return [slice(i, min(i + per, n_layers)) for i in range(0, n_layers, per)]
