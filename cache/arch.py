"""Where each model family keeps its blocks, final norm and output head, and hooks that record
the residual stream at every layer boundary during one forward pass.

Hooks on the blocks themselves (rather than ``output_hidden_states``) give the same boundaries for
every family: Hugging Face's last hidden state is already normed for most models, and we need the
last block's output *before* the final norm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lenscache.errors import ModelError
from lenscache.schema import HeadSpec

# Attribute paths, tried in order. Covers Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi, Phi-3
# (model.layers / model.norm), GPT-2 (transformer.h / ln_f), GPT-NeoX (gpt_neox.*), OPT
# (model.decoder.*) and multimodal wrappers that nest a language model.
BLOCK_PATHS = (
    "model.layers",
    "model.decoder.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.language_model.layers",
    "language_model.model.layers",
)
NORM_PATHS = (
    "model.norm",
    "model.final_layernorm",
    "model.decoder.final_layer_norm",
    "transformer.ln_f",
    "gpt_neox.final_layer_norm",
    "model.language_model.norm",
    "language_model.model.norm",
)
PROJ_OUT_PATHS = ("model.decoder.project_out",)


def _get(module: torch.nn.Module, path: str) -> torch.nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _find_final_norm(model: torch.nn.Module) -> tuple[bool, torch.nn.Module | None]:
    """(found, norm). Found with None means the family has no final norm (OPT with post-LN)."""
    for path in NORM_PATHS:
        parent_path, attr = path.rsplit(".", 1)
        parent = _get(model, parent_path)
        if parent is not None and hasattr(parent, attr):
            return True, getattr(parent, attr)
    return False, None


@dataclass
class Taps:
    """The modules of a causal LM that lenscache hooks into or copies."""

    blocks: torch.nn.ModuleList
    final_norm: torch.nn.Module | None
    proj_out: torch.nn.Module | None
    lm_head: torch.nn.Module
    softcap: float | None

    @property
    def n_layers(self) -> int:
        return len(self.blocks)


def find_taps(model: torch.nn.Module) -> Taps:
    """Locate blocks, final norm and head; an unsupported layout gets an error naming what is missing."""
    arch = type(model).__name__
    blocks = next((m for p in BLOCK_PATHS if isinstance(m := _get(model, p), torch.nn.ModuleList)), None)
    if blocks is None or len(blocks) == 0:
        raise ModelError(
            f"unsupported architecture {arch}: no list of transformer blocks at any of {', '.join(BLOCK_PATHS)}"
        )
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(lm_head, torch.nn.Linear):
        raise ModelError(f"unsupported architecture {arch}: no linear output head (get_output_embeddings())")
    found, final_norm = _find_final_norm(model)
    if not found:
        raise ModelError(f"unsupported architecture {arch}: no final norm at any of {', '.join(NORM_PATHS)}")
    proj_out = next((m for p in PROJ_OUT_PATHS if (m := _get(model, p)) is not None), None)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    return Taps(blocks=blocks, final_norm=final_norm, proj_out=proj_out, lm_head=lm_head, softcap=softcap)


def _f32(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float32).numpy().copy()


def extract_head(taps: Taps) -> tuple[HeadSpec, dict[str, np.ndarray]]:
    """The head as a `HeadSpec` plus float32 arrays, to be stored and rebuilt as `Unembed`."""
    norm = taps.final_norm
    arrays: dict[str, np.ndarray] = {}
    if norm is None:
        kind, eps, offset = "none", 0.0, 0.0
    elif isinstance(norm, torch.nn.LayerNorm):
        kind, eps, offset = "layer", float(norm.eps), 0.0
    elif "RMSNorm" in type(norm).__name__:
        kind = "rms"
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        # Gemma-family RMSNorms scale by (1 + weight); their weights are stored as offsets from 1.
        offset = 1.0 if type(norm).__name__.startswith("Gemma") else 0.0
    else:
        raise ModelError(f"unsupported final norm {type(norm).__name__}: expected LayerNorm or an RMSNorm")
    if norm is not None:
        arrays["norm_weight"] = _f32(getattr(norm, "weight", None))
        bias = getattr(norm, "bias", None)
        if bias is not None:
            arrays["norm_bias"] = _f32(bias)
    if taps.proj_out is not None:
        arrays["proj_out"] = _f32(taps.proj_out.weight)
    arrays["unembed"] = _f32(taps.lm_head.weight)
    if taps.lm_head.bias is not None:
        arrays["unembed_bias"] = _f32(taps.lm_head.bias)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    spec = HeadSpec(
        norm=kind,
        eps=eps,
        weight_offset=offset,
        softcap=float(taps.softcap) if taps.softcap else None,
        has_norm_bias="norm_bias" in arrays,
        has_proj_out="proj_out" in arrays,
        has_unembed_bias="unembed_bias" in arrays,
    )
    return spec, arrays


class ResidualRecorder:
    """Context manager: during a forward pass, records the requested layer boundaries.

    ``recorder.states[i]`` is the (batch, pos, d_model) tensor at boundary ``layers[i]``; the last
    boundary (the input of the final norm) is always recorded as ``recorder.final``. With a `sink`,
    each requested boundary is handed to ``sink(i, tensor)`` as soon as its block has run instead
    of being kept: the caller can copy it out while it is still in cache, and the model's
    allocator reuses the memory as it would without hooks.
    """

    def __init__(
        self, taps: Taps, layers: list[int], sink: Callable[[int, torch.Tensor], None] | None = None
    ):
        self.taps = taps
        self.layers = list(layers)
        self.n_layers = taps.n_layers
        self.sink = sink
        self._index = {b: i for i, b in enumerate(self.layers)}
        self._captured: dict[int, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> ResidualRecorder:
        wanted = set(self.layers) | {self.n_layers}
        if 0 in wanted:
            self._handles.append(
                self.taps.blocks[0].register_forward_pre_hook(self._pre_hook, with_kwargs=True)
            )
        for i, block in enumerate(self.taps.blocks):
            if i + 1 in wanted:
                self._handles.append(block.register_forward_hook(self._make_hook(i + 1)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _record(self, boundary: int, hidden: torch.Tensor) -> None:
        hidden = hidden.detach()
        if self.sink is not None and boundary in self._index:
            self.sink(self._index[boundary], hidden)
            if boundary != self.n_layers:
                return
        self._captured[boundary] = hidden

    def _pre_hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if hidden is None:
            raise ModelError(f"cannot find the hidden states passed to {type(module).__name__}")
        self._record(0, hidden)

    def _make_hook(self, boundary: int):
        def hook(module, args, output):
            self._record(boundary, output[0] if isinstance(output, tuple | list) else output)

        return hook

    @property
    def states(self) -> list[torch.Tensor]:
        """The recorded boundaries, in `layers` order (empty with a sink)."""
        return [] if self.sink is not None else [self._captured[i] for i in self.layers]

    @property
    def final(self) -> torch.Tensor:
        return self._captured[self.n_layers]
