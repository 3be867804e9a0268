"""The tuned lens (Belrose et al. 2023) fitted out of core from a store.

Recipe, after the reference implementation's defaults: one affine translator per layer, applied as
``h + (W h + b)`` and zero-initialised; loss KL(final || lens) against the store's exact final
log-probabilities (or next-token cross-entropy); SGD with Nesterov momentum 0.9 and an effective
learning rate of 1.0 (the step size is lr * (1 - momentum)), weight decay 1e-3 towards the
identity, a linear decay of the learning rate to zero, gradient clipping at norm 1. Every layer is
trained from one read of each minibatch.

The fit checkpoints every `checkpoint_every` steps (lens, momentum, step) into ``OUT/checkpoint``;
`resume=True` continues from there with the same minibatches it would have seen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lenscache.device import resolve_device
from lenscache.errors import LensCacheError
from lenscache.reader import Store

from .checkpoint import load_checkpoint, remove_checkpoint, save_checkpoint
from .lens import Lens
from .losses import FinalDist, layer_groups, log_probs, next_token_ce
from .stream import IGNORE_INDEX, BlockSource, ResidualStream, StreamSpec


@dataclass
class TunedConfig:
    lr: float = 1.0  # effective learning rate; SGD's step is lr * (1 - momentum)
    momentum: float = 0.9
    weight_decay: float = 1e-3
    clip: float = 1.0
    loss: str = "kl"  # kl | ce
    checkpoint_every: int = 50  # steps between checkpoints; 0: none
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.loss not in ("kl", "ce"):
            raise LensCacheError(f"loss must be 'kl' or 'ce', not {self.loss!r}")
        checks = {
            "lr (--lr) must be > 0": self.lr > 0,
            "momentum must be in [0, 1)": 0 <= self.momentum < 1,
            "weight_decay (--weight-decay) must be >= 0": self.weight_decay >= 0,
            "clip must be > 0": self.clip > 0,
            "checkpoint_every (--checkpoint-every) must be >= 0 (0: no checkpoints)": self.checkpoint_every >= 0,
        }
        failed = [what for what, ok in checks.items() if not ok]
        if failed:
            raise LensCacheError(f"tuned-lens settings out of range: {'; '.join(failed)}")


def _settings(spec: StreamSpec, cfg: TunedConfig, layers: list[int], init: str) -> dict[str, Any]:
    """What a resumed fit must share with the one it continues."""
    stream = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("skip_batches", "read_ahead", "workers")}
    tuned = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("checkpoint_every", "device")}
    return {"stream": stream, "tuned": tuned, "layers": layers, "init": init}


def _checkpoint_tensors(lens: Lens, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The lens and SGD's momentum buffers, as a checkpoint keeps them."""
    tensors = {"weight": lens.weight, "bias": lens.bias}
    for name, p in (("weight", lens.weight), ("bias", lens.bias)):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"momentum.{name}"] = buf
    return tensors


def fit_tuned(
    store: Store,
    out: str | os.PathLike,
    spec: StreamSpec | None = None,
    cfg: TunedConfig | None = None,
    init: Lens | None = None,
    resume: bool = False,
    progress: bool = True,
    source: BlockSource | None = None,
    on_step: Callable[[int, Lens], None] | None = None,
) -> Lens:
    """Fit a tuned lens on the store's train split, save it to `out` and return it.

    `source` replaces the store as the supplier of blocks (e.g. `MemorySource` for a RAM baseline);
    `on_step(step, lens)` is called after every optimiser step (e.g. to track held-out loss).
    """
    spec = spec or StreamSpec()
    cfg = cfg or TunedConfig()
    out = Path(out)
    stream = ResidualStream(store, spec, source)
    layers = stream.layers
    if init is not None:
        init.check_compatible(store)
        missing = [layer for layer in layers if layer not in init.layers]
        if missing:
            raise LensCacheError(f"the initial lens has no translator for layers {missing}")
    total_steps = stream.n_batches()
    settings = _settings(spec, cfg, layers, init.config.kind if init is not None else "identity")

    device = resolve_device(cfg.device)
    lens = _initial_lens(store, layers, init).to(device)
    unembed = store.unembed.to(device)
    step_size = cfg.lr * (1 - cfg.momentum)
    opt = torch.optim.SGD(
        lens.parameters(), lr=step_size, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay
    )

    step, history = 0, []
    if resume:
        step, history = _restore(out, settings, lens, opt, device)
        stream = ResidualStream(store, dataclasses.replace(spec, skip_batches=step), source)

    groups = layer_groups(len(layers), spec.batch_tokens, store.meta.vocab_size)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    bar = tqdm(total=total_steps, initial=step, desc="lenscache fit (tuned)", unit="step", disable=not progress)
    started, tokens_seen = time.perf_counter(), 0
    per_layer = torch.zeros(len(layers))
    for batch in stream:
        lr = step_size * (1 - step / total_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        _backward(batch, lens, unembed, layers, groups, cfg.loss, autocast, per_layer, device)
        torch.nn.utils.clip_grad_norm_(lens.parameters(), cfg.clip)
        opt.step()
        step += 1
        tokens_seen += batch.n_tokens
        history.append(round(float(per_layer.mean()), 5))
        bar.set_postfix(_group_postfix(per_layer, layers, tokens_seen / (time.perf_counter() - started)))
        bar.update()
        if on_step is not None:
            on_step(step, lens)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
            save_checkpoint(out, _checkpoint_tensors(lens, opt), {"step": step, "settings": settings, "history": history})
    bar.close()
    if step < total_steps:
        raise LensCacheError(f"the stream ended after {step} of {total_steps} steps")

    lens.cpu()
    lens.config.fit = {
        "method": "tuned",
        "init": settings["init"],
        "steps": step,
        "tokens": stream.total_tokens(),
        "seconds_this_run": round(time.perf_counter() - started, 2),
        "final_train_loss_per_layer": {str(k): round(float(v), 5) for k, v in zip(layers, per_layer, strict=True)},
        "loss_history": history,
        **settings,
    }
    lens.save(out)
    remove_checkpoint(out)
    return lens


def _initial_lens(store: Store, layers: list[int], init: Lens | None) -> Lens:
    """The identity (the logit lens), or `init`'s translators for `layers`."""
    lens = Lens.identity(store, layers, kind="tuned")
    if init is not None:
        with torch.no_grad():
            idx = [init.index(layer) for layer in layers]
            lens.weight.copy_(init.weight[idx])
            lens.bias.copy_(init.bias[idx])
    return lens


def _restore(
    out: Path, settings: dict[str, Any], lens: Lens, opt: torch.optim.Optimizer, device: torch.device
) -> tuple[int, list[float]]:
    """Load the checkpoint in `out` into `lens` and `opt`; (step, loss history) to continue from."""
    found = load_checkpoint(out)
    if found is None:
        raise LensCacheError(f"resume (--resume): no checkpoint in {out}")
    tensors, state = found
    if state["settings"] != settings:
        changed = sorted(k for k in settings if settings[k] != state["settings"].get(k))
        raise LensCacheError(f"resume (--resume): the checkpoint in {out} was made with other settings ({', '.join(changed)})")
    with torch.no_grad():
        lens.weight.copy_(tensors["weight"])
        lens.bias.copy_(tensors["bias"])
    for name, p in (("weight", lens.weight), ("bias", lens.bias)):
        if f"momentum.{name}" in tensors:
            opt.state[p]["momentum_buffer"] = tensors[f"momentum.{name}"].to(device)
    return state["step"], state["history"]


def _backward(batch, lens: Lens, unembed, layers, groups, loss_kind: str, autocast, per_layer, device) -> None:
    """Accumulate one minibatch's gradients, layer group by layer group; record each layer's loss."""
    resid = batch.resid.to(device)
    with torch.no_grad():
        target = FinalDist.from_logp(unembed.log_probs(batch.final.to(device))) if loss_kind == "kl" else None
    nxt = batch.next_tokens.to(device)
    for g in groups:
        with autocast:
            logits = unembed(lens.translate_all(resid[g], layers[g]))
        logp = log_probs(logits)
        if loss_kind == "ce":
            loss = next_token_ce(logp, nxt).sum(-1) / (nxt != IGNORE_INDEX).sum().clamp(min=1)
        else:
            loss = target.kl(logp).mean(-1)
        loss.sum().backward()
        per_layer[g] = loss.detach().cpu()


def _group_postfix(per_layer: torch.Tensor, layers: list[int], tok_s: float) -> dict[str, str]:
    """Mean loss of the early, middle and late thirds of the layers, and throughput."""
    n = len(layers)
    cuts = [0, math.ceil(n / 3), math.ceil(2 * n / 3), n]
    out = {"tok/s": f"{tok_s:.0f}"}
    for a, b in zip(cuts[:-1], cuts[1:], strict=False):
        if b > a:
            out[f"L{layers[a]}-{layers[b - 1]}"] = f"{float(per_layer[a:b].mean()):.3f}"
    return out
