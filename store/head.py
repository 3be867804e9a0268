"""The model's output head as a standalone module: final norm, optional projection, unembedding.

This is the "unembed" half of the lens/unembed split: a lens maps a residual state to another
residual state, and `Unembed` turns any residual state into logits exactly as the model does for
its last layer. It is built from plain float32 arrays (stored in every store), so fitting and
analysis never need the model.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .schema import HeadSpec


class Unembed(torch.nn.Module):
    """Final norm + (projection) + unembedding (+ bias) + (logit soft-capping), computed in float32."""

    def __init__(self, spec: HeadSpec, arrays: dict[str, np.ndarray | torch.Tensor]):
        super().__init__()
        self.spec = spec

        def param(name: str) -> torch.Tensor | None:
            value = arrays.get(name)
            if value is None:
                return None
            return torch.as_tensor(np.asarray(value, dtype=np.float32))

        self.register_buffer("norm_weight", param("norm_weight"))
        self.register_buffer("norm_bias", param("norm_bias"))
        self.register_buffer("proj_out", param("proj_out"))
        self.register_buffer("unembed", param("unembed"))
        self.register_buffer("unembed_bias", param("unembed_bias"))
        if self.unembed is None:
            raise ValueError("Unembed needs an 'unembed' matrix")

    @property
    def vocab_size(self) -> int:
        return self.unembed.shape[0]

    @property
    def d_model(self) -> int:
        return self.proj_out.shape[1] if self.proj_out is not None else self.unembed.shape[1]

    def normalize(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm alone (float32)."""
        h = h.float()
        spec = self.spec
        if spec.norm == "rms":
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + spec.eps)
            if self.norm_weight is not None:
                h = h * (self.norm_weight + spec.weight_offset)
            return h
        if spec.norm == "layer":
            return F.layer_norm(h, (h.shape[-1],), self.norm_weight, self.norm_bias, spec.eps)
        return h

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Logits for residual states `h` (..., d_model)."""
        x = self.normalize(h)
        if self.proj_out is not None:
            x = x @ self.proj_out.T
        logits = F.linear(x, self.unembed, self.unembed_bias)
        if self.spec.softcap:
            logits = torch.tanh(logits / self.spec.softcap) * self.spec.softcap
        return logits

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.forward(h), dim=-1)
