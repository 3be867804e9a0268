"""Forward passes with an edited residual stream: the model side of CBE's causal fidelity test.

`edited_logprobs` runs the model on token ids with a forward hook at one layer boundary that
replaces the state there by ``edit(h)``, and returns the final next-token log-probabilities. The
boundary is the one the builder records (`ResidualRecorder`): boundary 0 is the input of block 0
(a forward pre-hook), boundary l ≥ 1 the output of block l-1 (a forward hook), boundary n_layers
the last block's output before the final norm. So boundary l of a store is exactly the tensor an
edit at l receives. The edit is any callable: this module knows nothing of lenses or bases.

`logprobs_under_edits` runs several edits, stacking `edits_per_pass` of them into the batch
dimension of one pass (the ids repeated), and yields one (B, P, vocab) tensor per edit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from lenscache.errors import ModelError

from .arch import ResidualRecorder, Taps, find_taps
from .model import LoadedModel

Edit = Callable[[torch.Tensor], torch.Tensor]


def check_weights(loaded: LoadedModel, store_model: dict[str, Any]) -> None:
    """Refuse a model whose weights hash differs from the one recorded in a store's provenance
    (``store.meta.model``); the message names both hashes."""
    mine, theirs = loaded.provenance.get("weights_hash"), store_model.get("weights_hash")
    if not mine or mine != theirs:
        raise ModelError(
            f"the model {loaded.provenance.get('id')!r} (weights {mine}) is not the model the store was built "
            f"from, {store_model.get('id')!r} (weights {theirs}); pass that model with --model"
        )


class _EditHook:
    """Context manager: while active, boundary `boundary` of the model is replaced by edit(h)."""

    def __init__(self, taps: Taps, boundary: int, edit: Edit):
        if not 0 <= boundary <= taps.n_layers:
            raise ModelError(f"boundary {boundary} outside 0..{taps.n_layers} (the model has {taps.n_layers} blocks)")
        self.taps, self.boundary, self.edit = taps, boundary, edit
        self.handle: torch.utils.hooks.RemovableHandle | None = None

    def __enter__(self) -> _EditHook:
        if self.boundary == 0:
            block = self.taps.blocks[0]
            self.handle = block.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        else:
            self.handle = self.taps.blocks[self.boundary - 1].register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.remove()

    def _pre_hook(self, module, args, kwargs):
        if args:
            return (self.edit(args[0]), *args[1:]), kwargs
        if kwargs.get("hidden_states") is None:
            raise ModelError(f"cannot find the hidden states passed to {type(module).__name__}")
        return args, {**kwargs, "hidden_states": self.edit(kwargs["hidden_states"])}

    def _hook(self, module, args, output):
        if isinstance(output, tuple | list):
            return type(output)((self.edit(output[0]), *output[1:]))
        return self.edit(output)


def edited_logprobs(loaded: LoadedModel, ids: torch.Tensor, boundary: int | None = None,
                    edit: Edit | None = None) -> torch.Tensor:  # fmt: skip
    """float32 log-probabilities (B, P, vocab) of the model on `ids` (B, P), with boundary
    `boundary` replaced by edit(h) (h: (B, P, d_model) in the model's dtype); no edit: the clean pass."""
    ids = ids.to(device=loaded.device, dtype=torch.long)
    with torch.inference_mode():
        if edit is None:
            logits = loaded.model(input_ids=ids, use_cache=False).logits
        else:
            with _EditHook(find_taps(loaded.model), boundary, edit):
                logits = loaded.model(input_ids=ids, use_cache=False).logits
        return torch.log_softmax(logits.float(), dim=-1)


def recorded_logprobs(
    loaded: LoadedModel, ids: torch.Tensor, boundaries: list[int]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The clean pass: float32 log-probabilities (B, P, vocab) and the states (B, P, d_model) at
    `boundaries`, recorded exactly as the builder records them (`ResidualRecorder`)."""
    ids = ids.to(device=loaded.device, dtype=torch.long)
    with torch.inference_mode(), ResidualRecorder(find_taps(loaded.model), boundaries) as rec:
        logits = loaded.model(input_ids=ids, use_cache=False).logits
        return torch.log_softmax(logits.float(), dim=-1), rec.states


def _stacked(edits: Sequence[Edit], batch: int) -> Edit:
    """One edit for a pass of len(edits) copies of a batch: edits[e] applies to copy e."""

    def edit(h: torch.Tensor) -> torch.Tensor:
        return torch.cat([fn(part) for fn, part in zip(edits, h.split(batch), strict=True)])

    return edit


def logprobs_under_edits(loaded: LoadedModel, ids: torch.Tensor, boundary: int, edits: Sequence[Edit],
                         edits_per_pass: int = 1) -> Iterator[torch.Tensor]:  # fmt: skip
    """For each edit, the (B, P, vocab) log-probabilities of `ids` with boundary `boundary` edited;
    `edits_per_pass` edits share a forward pass (stacked along the batch), to use the cores better
    on small batches. Each edit sees only its own copy of the batch, (B, P, d_model)."""
    if edits_per_pass < 1:
        raise ModelError(f"edits_per_pass must be at least 1, got {edits_per_pass}")
    batch = ids.shape[0]
    for start in range(0, len(edits), edits_per_pass):
        group = list(edits[start : start + edits_per_pass])
        stacked = ids.repeat(len(group), 1)
        yield from edited_logprobs(loaded, stacked, boundary, _stacked(group, batch)).split(batch)


__all__ = ["Edit", "check_weights", "edited_logprobs", "logprobs_under_edits", "recorded_logprobs"]
