"""Causal basis extraction (CBE, Belrose et al. 2023, arXiv 2303.08112) fitted out of core from a store.

For a lens f at boundary l (the logit lens: the store's head; a fitted lens: head(translate(h)))
and states h of the store, the ablation of a unit direction v is r(h, v) = h + v vᵀ(a − h), with
a = μ (mean ablation, μ the mean state at l), a = 0 (zero ablation) or a = the state of another
token of the same minibatch (resample ablation, a seeded pairing). The energy of v is
σ(v) = E_h[KL(f(h) ‖ f(r(h, v)))]. The basis: v₁ maximises σ, vⱼ maximises σ among unit vectors
orthogonal to v₁…vⱼ₋₁.

How it is fitted here (`fit_cbe`): μ comes from one streamed pass in float64; then, direction by
direction (deflation), Riemannian Adam on the sphere maximises the minibatch estimate of σ, every
layer from one read of each minibatch of `ResidualStream`. The Euclidean gradient is projected onto
the tangent space of the sphere and out of span(v₁…vⱼ₋₁); Adam's second moment is one scalar per
layer (the squared gradient norm), so a step is a rotation of at most about `lr` radians whatever
the scale of σ at that layer, and the update stays in the tangent space (an elementwise second
moment would tilt it out); after each step v is renormalised and re-orthogonalised and the first
moment is transported by projection. The step decays linearly to zero over each direction's
`steps`. Directions start from the reference's initialisation, the leading right singular vector
of the lens's effective unembedding (W_U · diag(norm weight) · lens linear map) deflated against
the directions found so far, or from a seeded random vector. Final energies are re-estimated on
the held-out split, with standard errors over held-out sequences (tokens of a sequence are
correlated), and the directions of each layer are ranked by them. Memory is the minibatch and the
stream's buffer, never the store. The fit checkpoints into ``OUT/checkpoint`` (safetensors + JSON,
swapped in atomically); `resume=True` continues to the same basis, bit for bit.

`fit_cbe_full_batch` is the reference's algorithm, for comparison: every training state in memory,
full-batch L-BFGS per direction with deflation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lenscache.device import resolve_device
from lenscache.errors import LensCacheError, LensError
from lenscache.head import Unembed
from lenscache.reader import Store

from .basis import MODES, Basis, BasisConfig, BasisError, lens_identity, store_identity
from .checkpoint import load_checkpoint, remove_checkpoint, save_checkpoint
from .lens import Lens, model_identity
from .stream import BlockSource, ResidualStream, StreamSpec, _to_torch, split_sequences

INITS = ("unembed", "random")
BETAS = (0.9, 0.99)
METHODS = ("deflation", "subspace")


# ---- the lens, the ablation and the energy -----------------------------------------------------
class LensFn:
    """f at one layer: log-probabilities of head(translate(h)) (the logit lens when lens is None)."""

    def __init__(self, unembed: Unembed, lens: Lens | None, layer: int):
        self.unembed, self.layer = unembed, layer
        self.weight = self.bias = None
        if lens is not None:
            i = lens.index(layer)
            self.weight = lens.weight[i].detach()
            self.bias = lens.bias[i].detach()

    def to(self, device: torch.device) -> LensFn:
        self.unembed = self.unembed.to(device)
        if self.weight is not None:
            self.weight, self.bias = self.weight.to(device), self.bias.to(device)
        return self

    def linear_map(self) -> torch.Tensor:
        """The lens's linear part A (h ↦ A h + b), float64."""
        d = self.unembed.d_model
        eye = torch.eye(d, dtype=torch.float64, device=self.unembed.unembed.device)
        return eye if self.weight is None else eye + self.weight.double()

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            h = h + torch.nn.functional.linear(h, self.weight, self.bias)
        return torch.log_softmax(self.unembed(h).float(), dim=-1)


def partners(n: int, seed: int, index: int, salt: int) -> torch.Tensor:
    """For resample ablation: for each of n tokens another token of the batch (a seeded random cycle)."""
    if n < 2:
        return torch.zeros(n, dtype=torch.long)
    perm = torch.from_numpy(np.random.default_rng([seed, index, salt]).permutation(n))
    out = torch.empty(n, dtype=torch.long)
    out[perm] = torch.roll(perm, -1)
    return out


def ablate(h: torch.Tensor, v: torch.Tensor, mode: str, mu: torch.Tensor | None = None,
           partner: torch.Tensor | None = None, source: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """r(h, v) = h + v vᵀ(a − h) for states h (B, d) and a unit v (d,): a = μ, 0, or source[partner]
    (resample: another token's state; `source` defaults to h itself)."""
    if mode == "mean":
        a = mu.to(h.dtype)
    elif mode == "zero":
        a = torch.zeros((), dtype=h.dtype, device=h.device)
    elif mode == "resample":
        a = (h if source is None else source)[partner]
    else:
        raise LensCacheError(f"unknown ablation mode {mode!r}; choose one of {', '.join(MODES)}")
    return h + ((a - h) @ v).unsqueeze(-1) * v


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row, summed as p (log p − log q): no cancellation of the entropy for small KLs."""
    return (logp.exp() * (logp - logq)).sum(-1)


# ---- pieces shared by both fitters ---------------------------------------------------------------
def _check_inputs(store: Store, lens: Lens | None, layers: list[int] | None, k: int, mode: str,
                  init: str) -> list[int]:  # fmt: skip
    """Every refusal that needs no data, before anything is read or written. Returns the layers."""
    if mode not in MODES:
        raise BasisError(f"ablation mode (--mode) must be one of {', '.join(MODES)}, not {mode!r}")
    if init not in INITS:
        raise BasisError(f"init must be one of {', '.join(INITS)}, not {init!r}")
    if lens is not None:
        lens.check_compatible(store)
    if layers is None:
        layers = lens.layers if lens is not None else [b for b in store.layers if b != store.meta.n_layers]
    layers = list(layers)
    if not layers or len(set(layers)) != len(layers):
        raise BasisError(f"layers must be distinct and at least one, got {layers}")
    for layer in layers:
        store.layer_index(layer)  # a StoreError naming the store's layers
        if lens is not None:
            lens.index(layer)  # a LensError naming the lens's layers
    d = store.d_model
    if not isinstance(k, int) or not 1 <= k <= d:
        raise BasisError(f"k (--k) must be between 1 and d_model = {d}, got {k}")
    store.unembed  # noqa: B018 - a StoreError now for a store without its head, not after the mean pass
    return layers


def _max_sequences(store: Store, max_tokens: int | None) -> int | None:
    """`max_tokens` as whole sequences of the train split: the fixed token set every epoch revisits."""
    if max_tokens is None:
        return None
    if max_tokens < 1:
        raise LensCacheError(f"max_tokens (--max-tokens) must be at least 1, got {max_tokens}")
    return math.ceil(max_tokens / store.seq_len)


def stream_mean(store: Store, layers: list[int], max_sequences: int | None, spec: StreamSpec | None = None,
                progress: bool = False, source: BlockSource | None = None) -> torch.Tensor:  # fmt: skip
    """The mean state (L, d) of the train split's first `max_sequences` sequences, summed in float64."""
    base = spec or StreamSpec()
    spec = dataclasses.replace(
        base, layers=layers, split="train", shuffle=False, epochs=1, max_tokens=None, with_final=False,
        max_sequences=max_sequences, skip_batches=0, batch_tokens=max(base.batch_tokens, 4096),
    )  # fmt: skip
    stream = ResidualStream(store, spec, source)
    total = torch.zeros(len(layers), store.d_model, dtype=torch.float64)
    n = 0
    for batch in tqdm(stream, total=stream.n_batches(), desc="cbe: mean", unit="batch", disable=not progress,
                      leave=False):  # fmt: skip
        total += batch.resid.double().sum(1)
        n += batch.n_tokens
    return total / n


def initial_direction(fn: LensFn, found: torch.Tensor, init: str, seed: int, layer: int, j: int,
                      gram_unembed: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """The start of direction j: the leading right singular vector of the effective unembedding M =
    W_U·diag(g)·A deflated against `found` (j, d), or a seeded random unit vector orthogonal to them."""
    d = fn.unembed.d_model
    q = found.double()
    proj = torch.eye(d, dtype=torch.float64) - q.T @ q
    if init == "random":
        gen = torch.Generator().manual_seed(int(np.random.default_rng([seed, layer, j]).integers(2**62)))
        v = proj @ torch.randn(d, generator=gen, dtype=torch.float64)
    else:
        a = fn.linear_map().cpu()
        gram = a.T @ gram_unembed @ a  # MᵀM, (d, d)
        _, vecs = torch.linalg.eigh(proj @ gram @ proj)
        v = proj @ vecs[:, -1]
        v = v * torch.sign(v[v.abs().argmax()])  # a fixed sign, so that the result is deterministic
    return (v / v.norm()).float()


def gram_of_unembed(unembed: Unembed) -> torch.Tensor:
    """(W_U D)ᵀ(W_U D) in float64, D = diag(final norm weight) (the norm's scale; its centring and the
    RMS division are ignored, as in the reference's linear initialisation)."""
    w = unembed.unembed.double().cpu()
    if unembed.proj_out is not None:
        w = w @ unembed.proj_out.double().cpu()
    if unembed.norm_weight is not None:
        w = w * (unembed.norm_weight.double().cpu() + unembed.spec.weight_offset)
    return w.T @ w


def _orthonormalise(v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """v with span(q) removed (twice, for round-off), unit length."""
    for _ in range(2):
        v = v - q.T @ (q @ v)
    return v / v.norm()


@torch.no_grad()
def riemannian_adam_step(v: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, s: torch.Tensor, q: torch.Tensor,
                         t: int, lr: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ascent step of Adam on the unit sphere within the complement of span(q): the gradient is
    projected onto the tangent space at `v`, the first moment is transported to the new point by
    projection, and the second moment is one scalar (the squared tangent norm) so the step is a
    rotation of about `lr` radians. Returns the new direction and both moments."""

    def tangent(x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        x = x - (x @ at) * at
        return x - q.T @ (q @ x)

    g = tangent(grad, v)
    m = BETAS[0] * m + (1 - BETAS[0]) * g
    s = BETAS[1] * s + (1 - BETAS[1]) * (g @ g)
    m_hat, s_hat = m / (1 - BETAS[0] ** (t + 1)), s / (1 - BETAS[1] ** (t + 1))
    new = _orthonormalise(v + lr * tangent(m_hat, v) / (s_hat.sqrt() + 1e-30), q)
    return new, tangent(m, new), s


def qr_retract(x: torch.Tensor) -> torch.Tensor:
    """The nearest-by-QR matrix with orthonormal rows to `x` (k, d), signs fixed so R's diagonal is > 0."""
    q, r = torch.linalg.qr(x.T)
    sign = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
    return (q * sign).T


@torch.no_grad()
def stiefel_adam_step(v: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, s: torch.Tensor, t: int,
                      lr: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """One ascent step of Adam for all k directions at once (rows of `v`, orthonormal): the gradient
    projected onto the Stiefel manifold's tangent space, one second moment per direction (so each
    row turns about `lr` radians, as in `riemannian_adam_step`), a QR retraction, and the first moment
    transported by projection."""

    def tangent(x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        return x - 0.5 * (x @ at.T + at @ x.T) @ at

    g = tangent(grad, v)
    m = BETAS[0] * m + (1 - BETAS[0]) * g
    s = BETAS[1] * s + (1 - BETAS[1]) * g.pow(2).sum(1)
    m_hat, s_hat = m / (1 - BETAS[0] ** (t + 1)), s / (1 - BETAS[1] ** (t + 1))
    new = qr_retract(v + lr * tangent(m_hat, v) / (s_hat.sqrt() + 1e-30).unsqueeze(1))
    return new, tangent(m, new), s


def estimate_energies(
    store: Store,
    lens: Lens | None,
    layers: list[int],
    directions: torch.Tensor,
    mu: torch.Tensor,
    mode: str,
    split: str = "held_out",
    batch_tokens: int = 512,
    max_tokens: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
    source: BlockSource | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """σ of each direction (L, k) over `split`, its standard error over sequences, and the tokens used.

    The standard error treats sequences as the independent units (a ratio estimator over per-sequence
    sums); with a single sequence it falls back to tokens."""
    dev = resolve_device(device)
    spec = StreamSpec(layers=layers, split=split, batch_tokens=batch_tokens, shuffle=False, with_final=False,
                      max_tokens=max_tokens, seed=seed)  # fmt: skip
    stream = ResidualStream(store, spec, source)
    n_l, k = directions.shape[:2]
    first = stream.seqs.start
    seq_sum = torch.zeros(len(stream.seqs), n_l, k, dtype=torch.float64)
    seq_sq = torch.zeros(n_l, k, dtype=torch.float64)  # Σ per-token KL² (token-level fallback)
    seq_n = torch.zeros(len(stream.seqs), dtype=torch.float64)
    fns = [LensFn(store.unembed, lens, layer).to(dev) for layer in layers]
    dirs, mus = directions.to(dev), mu.float().to(dev)
    bar = tqdm(stream, total=stream.n_batches(), desc=f"cbe: {split} energies", unit="batch",
               disable=not progress, leave=False)  # fmt: skip
    with torch.no_grad():
        for batch in bar:
            rows = batch.seq - first
            seq_n.index_add_(0, rows, torch.ones(batch.n_tokens, dtype=torch.float64))
            partner = partners(batch.n_tokens, seed, batch.index, salt=1) if mode == "resample" else None
            for i, fn in enumerate(fns):
                h = batch.resid[i].to(dev)
                logp = fn(h)
                for j in range(k):
                    per_token = kl(logp, fn(ablate(h, dirs[i, j], mode, mus[i], partner))).double().cpu()
                    seq_sum[:, i, j].index_add_(0, rows, per_token)
                    seq_sq[i, j] += (per_token**2).sum()
    keep = seq_n > 0
    sums, counts = seq_sum[keep], seq_n[keep]
    n = counts.sum()
    energy = sums.sum(0) / n
    c = int(keep.sum())
    if c >= 2:
        resid = sums - energy * counts[:, None, None]
        stderr = (resid.pow(2).sum(0) * c / (c - 1)).sqrt() / n
    else:
        var = (seq_sq / n - energy**2).clamp(min=0) * n / max(1.0, float(n) - 1)
        stderr = (var / n).sqrt()
    return energy, stderr, int(n)


def _ranked(directions: torch.Tensor, energy: torch.Tensor, stderr: torch.Tensor, train: torch.Tensor):
    """Directions of each layer reordered by held-out energy, highest first (stable for ties)."""
    order = torch.argsort(-energy, dim=1, stable=True)
    take = lambda t: torch.gather(t, 1, order)  # noqa: E731
    dirs = torch.gather(directions, 1, order.unsqueeze(-1).expand_as(directions))
    return dirs, take(energy), take(stderr), take(train)


def _make_basis(store, lens, layers, k, mode, directions, mu, train_energy, eval_split_tokens, tokens,
                settings, seed, device, progress, source) -> Basis:  # fmt: skip
    energy, stderr, n_eval = estimate_energies(
        store, lens, layers, directions, mu, mode, "held_out", settings["batch_tokens"], eval_split_tokens,
        seed, device, progress, source,
    )  # fmt: skip
    dirs, energy, stderr, train_energy = _ranked(directions, energy, stderr, train_energy)
    config = BasisConfig(
        layers=layers, k=k, d_model=store.d_model, mode=mode, lens=lens_identity(lens),
        model=model_identity(store), store=store_identity(store),
        tokens={**tokens, "held_out_tokens": n_eval}, settings=settings,
    )  # fmt: skip
    mu_saved = mu if mode == "mean" else torch.zeros_like(mu)
    return Basis(config, dirs, energy, stderr, mu_saved, train_energy)


# ---- the streamed fitter ----------------------------------------------------------------------
def _settings(spec: StreamSpec, layers, k, mode, steps, lr, init, seed, eval_tokens, lens,
              method: str) -> dict[str, Any]:  # fmt: skip
    """What a resumed fit must share with the one it continues (and what the basis records)."""
    return {
        "method": f"streamed riemannian adam, {method}",
        "layers": layers, "k": k, "mode": mode, "steps_per_direction": steps, "lr": lr, "betas": list(BETAS),
        "init": init, "seed": seed, "batch_tokens": spec.batch_tokens, "buffer_tokens": spec.buffer_tokens,
        "max_tokens": spec.max_tokens, "held_out_fraction": spec.held_out_fraction, "eval_tokens": eval_tokens,
        "lens": lens_identity(lens),
    }  # fmt: skip


def fit_cbe(
    store: Store,
    lens: Lens | None,
    layers: list[int] | None = None,
    k: int = 16,
    mode: str = "mean",
    spec: StreamSpec | None = None,
    steps: int = 100,
    lr: float = 0.1,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    init: str = "unembed",
    eval_tokens: int | None = None,
    checkpoint_every: int = 50,
    device: str = "cpu",
    on_step: Callable[[int], None] | None = None,
    source: BlockSource | None = None,
    method: str = "deflation",
) -> Basis:
    """Fit a causal basis of `k` directions per layer for `lens` (None: the logit lens) from streamed
    minibatches of the train split; energies re-estimated on the held-out split. Saved to `out` if given.

    `method`: "deflation" finds the directions one after another, each maximising its energy orthogonal
    to those before (`steps` steps each); "subspace" moves all k at once to maximise the sum of their
    energies on the Stiefel manifold (`steps` steps in all, each ablating every direction: the same
    compute), then ranks them. Deflation is CBE as defined (each direction the best given those before);
    the subspace fit optimises the sum instead, which greedy deflation can leave lower (a first
    direction that mixes two near-equal ones leaves less for the rest). When k exceeds the dimension of
    what the lens reads, the sum can gain by spreading k directions over it: use deflation to find
    that dimension.

    `spec` sets batch_tokens, buffer_tokens, max_tokens (whole train sequences, revisited every epoch),
    read_ahead and workers; its seed and layers are replaced by `seed` and `layers`. `steps`: optimiser
    steps per direction (each one minibatch, all layers at once); `lr`: the first step's rotation in
    radians. `eval_tokens`: held-out tokens for the final energies (None: all). `on_step(step)` runs
    after every step (tests use it to interrupt a fit). `source` replaces the store as the supplier of
    blocks (e.g. `MemorySource`, or synthetic states in tests); the store still gives head and shape."""
    layers = _check_inputs(store, lens, layers, k, mode, init)
    if method not in METHODS:
        raise BasisError(f"unknown CBE method {method!r}; choose one of {', '.join(METHODS)}")
    if steps < 1 or not lr > 0 or checkpoint_every < 0:
        raise BasisError(f"need steps >= 1, lr > 0 and checkpoint_every >= 0 (got {steps}, {lr}, {checkpoint_every})")
    if resume and out is None:
        raise BasisError("resume needs the output directory (out) holding the checkpoint")
    base = spec or StreamSpec()
    max_seqs = _max_sequences(store, base.max_tokens)
    train = split_sequences(store.n_sequences, base.held_out_fraction).train
    n_train_seqs = len(train) if max_seqs is None else min(len(train), max_seqs)
    settings = _settings(base, layers, k, mode, steps, lr, init, seed, eval_tokens, lens, method)
    out_dir = Path(out) if out is not None else None
    joint = method == "subspace"
    total_steps = steps if joint else k * steps
    dev = resolve_device(device)
    n_l, d = len(layers), store.d_model

    found = torch.zeros(n_l, k, d)
    train_energy = torch.full((n_l, k), math.nan, dtype=torch.float64)
    # the optimiser's state: the current direction of each layer (deflation) or all k (subspace)
    v = torch.zeros(n_l, k, d) if joint else torch.zeros(n_l, d)
    m = torch.zeros_like(v)
    s = torch.zeros(n_l, k) if joint else torch.zeros(n_l)
    ema = torch.zeros(s.shape, dtype=torch.float64)  # running σ estimate of each direction being fitted
    step, mu = 0, None
    if resume:
        loaded = load_checkpoint(out_dir)
        if loaded is None:
            raise BasisError(f"resume (--resume): no checkpoint in {out_dir}")
        tensors, state = loaded
        if state.get("settings") != json.loads(json.dumps(settings)):
            theirs = state.get("settings") or {}
            changed = sorted(key for key in settings if json.loads(json.dumps(settings[key])) != theirs.get(key))
            raise BasisError(f"resume (--resume): the checkpoint in {out_dir} was made with other settings ({', '.join(changed)})")
        step = int(state["step"])
        found, train_energy, v, m, s, ema, mu = (
            tensors[name] for name in ("found", "train_energy", "v", "m", "s", "ema", "mu")
        )
    if mu is None:
        mu = stream_mean(store, layers, max_seqs, base, progress, source)
    mu_abl = mu if mode == "mean" else torch.zeros_like(mu)

    # enough epochs of the fixed token set for every step; the stream skips what a resumed fit has done
    per_epoch = math.ceil(n_train_seqs * store.seq_len / base.batch_tokens)
    opt_spec = dataclasses.replace(
        base, layers=layers, split="train", shuffle=True, seed=seed, epochs=math.ceil(total_steps / per_epoch),
        max_tokens=None, max_sequences=max_seqs, with_final=False, skip_batches=step,
    )  # fmt: skip
    stream = ResidualStream(store, opt_spec, source)
    fns = [LensFn(store.unembed, lens, layer).to(dev) for layer in layers]
    gram_u = gram_of_unembed(store.unembed) if init == "unembed" else None
    mus = mu_abl.float().to(dev)
    bar = tqdm(total=total_steps, initial=step, desc="lenscache cbe", unit="step", disable=not progress)
    started = time.perf_counter()
    for batch in stream:
        if step >= total_steps:
            break
        j, t = (0, step) if joint else divmod(step, steps)
        if t == 0:  # a new direction (deflation) or the start (subspace): fresh optimiser state
            for i, layer in enumerate(layers):
                if joint:
                    for jj in range(k):
                        v[i, jj] = initial_direction(fns[i], v[i, :jj], init, seed, layer, jj, gram_u)
                else:
                    v[i] = initial_direction(fns[i], found[i, :j], init, seed, layer, j, gram_u)
            m.zero_()
            s.zero_()
            ema.zero_()
        partner = partners(batch.n_tokens, seed, batch.index, salt=0) if mode == "resample" else None
        lr_t = lr * (1 - t / steps)
        for i, fn in enumerate(fns):
            h = batch.resid[i].to(dev)
            with torch.no_grad():
                logp = fn(h)
            if joint:
                energy, grad = _energies_and_grad(fn, h, logp, v[i].to(dev), mode, mus[i], partner)
                new, mi, si = stiefel_adam_step(v[i].to(dev), grad, m[i].to(dev), s[i].to(dev), t, lr_t)
            else:
                vi = v[i].to(dev).requires_grad_(True)
                e = kl(logp, fn(ablate(h, vi, mode, mus[i], partner))).mean()
                (grad,) = torch.autograd.grad(e, vi)
                energy = e.detach().double()
                q = found[i, :j].to(dev)
                new, mi, si = riemannian_adam_step(vi.detach(), grad, m[i].to(dev), s[i].to(dev), q, t, lr_t)
            v[i], m[i], s[i] = new.cpu(), mi.cpu(), si.cpu()
            ema[i] = energy.cpu() if t == 0 else 0.9 * ema[i] + 0.1 * energy.cpu()
        step += 1
        if joint and step == total_steps:
            found, train_energy = v.clone(), ema.clone()
        elif not joint and t == steps - 1:
            found[:, j] = v
            train_energy[:, j] = ema
        bar.update()
        bar.set_postfix({"direction": "all" if joint else f"{j + 1}/{k}", "σ": f"{float(ema.mean()):.4f}"})
        if on_step is not None:
            on_step(step)
        if out_dir is not None and checkpoint_every and step % checkpoint_every == 0 and step < total_steps:
            tensors = {"found": found, "train_energy": train_energy, "v": v, "m": m, "s": s, "ema": ema, "mu": mu}
            save_checkpoint(out_dir, tensors, {"step": step, "settings": settings})
    bar.close()
    if step < total_steps:
        raise LensCacheError(f"the stream ended after {step} of {total_steps} steps")
    seconds = time.perf_counter() - started
    tokens = {
        "train_tokens": n_train_seqs * store.seq_len,
        "optimisation_tokens_seen": total_steps * base.batch_tokens,
    }
    basis = _make_basis(store, lens, layers, k, mode, found, mu, train_energy, eval_tokens, tokens,
                        {**settings, "fit_seconds_this_run": round(seconds, 2)}, seed, device, progress, source)  # fmt: skip
    if out_dir is not None:
        basis.save(out_dir)
        remove_checkpoint(out_dir)
    return basis


def _energies_and_grad(fn: LensFn, h: torch.Tensor, logp: torch.Tensor, v: torch.Tensor, mode: str,
                       mu: torch.Tensor, partner: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Each direction's minibatch energy (k,) and the gradient of their sum; one direction's ablated
    batch at a time, so memory stays that of one ablation."""
    v = v.detach().requires_grad_(True)
    energies = torch.empty(v.shape[0], dtype=torch.float64)
    for j in range(v.shape[0]):
        e = kl(logp, fn(ablate(h, v[j], mode, mu, partner))).mean()
        e.backward()
        energies[j] = float(e.detach())
    return energies, v.grad


# ---- the reference's algorithm, in memory ---------------------------------------------------------
def fit_cbe_full_batch(
    store: Store,
    lens: Lens | None,
    layers: list[int] | None = None,
    k: int = 16,
    mode: str = "mean",
    max_tokens: int | None = None,
    seed: int = 0,
    max_iter: int = 20,
    init: str = "unembed",
    eval_tokens: int | None = None,
    chunk_tokens: int = 512,
    held_out_fraction: float = 0.1,
    device: str = "cpu",
    progress: bool = False,
    source: BlockSource | None = None,
) -> Basis:
    """The reference's CBE (tuned-lens `causal/subspaces.py`), our own implementation: every train
    state of the first `max_tokens` (whole sequences) and the lens's log-probs of them held in memory,
    full-batch L-BFGS (strong Wolfe) per direction on v = normalise(θ with span(v₁…vⱼ₋₁) removed).
    Energies re-estimated on the held-out split exactly as `fit_cbe` does."""
    layers = _check_inputs(store, lens, layers, k, mode, init)
    dev = resolve_device(device)
    max_seqs = _max_sequences(store, max_tokens)
    train = split_sequences(store.n_sequences, held_out_fraction).train
    seqs = train if max_seqs is None else train[:max_seqs]
    d = store.d_model
    gram_u = gram_of_unembed(store.unembed) if init == "unembed" else None
    found = torch.zeros(len(layers), k, d)
    train_energy = torch.zeros(len(layers), k, dtype=torch.float64)
    mus = []
    started = time.perf_counter()
    bar = tqdm(total=len(layers) * k, desc="cbe full batch", unit="direction", disable=not progress)
    for i, layer in enumerate(layers):
        if source is None:
            h_all = torch.from_numpy(store.resid(layer, seqs).reshape(-1, d))
        else:
            h_all = _to_torch(source.read(seqs, [layer], False)["resid"][0], source.storage_dtype, "float32")
        h_all = h_all.reshape(-1, d).to(dev)
        n = h_all.shape[0]
        mu = h_all.double().mean(0)
        mus.append(mu.cpu())
        mu_abl = (mu if mode == "mean" else torch.zeros_like(mu)).float()
        partner = partners(n, seed, 0, salt=2) if mode == "resample" else None
        fn = LensFn(store.unembed, lens, layer).to(dev)
        chunks = [slice(a, min(a + chunk_tokens, n)) for a in range(0, n, chunk_tokens)]
        with torch.no_grad():
            targets = [fn(h_all[c]) for c in chunks]  # the reference keeps f(h) of every token
        for j in range(k):
            q = found[i, :j].to(dev)
            theta = initial_direction(fn, found[i, :j], init, seed, layer, j, gram_u).to(dev).requires_grad_(True)
            opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, history_size=10,
                                    line_search_fn="strong_wolfe", tolerance_grad=1e-10, tolerance_change=1e-12)  # fmt: skip

            def unit(th: torch.Tensor, q: torch.Tensor = q) -> torch.Tensor:
                th = th - q.T @ (q @ th)
                return th / th.norm()

            def objective(backward: bool, fn=fn, h_all=h_all, chunks=chunks, targets=targets, unit=unit,
                          theta=theta, mu_abl=mu_abl, partner=partner, n=n) -> torch.Tensor:  # fmt: skip
                """−σ over every train token, in chunks (gradients accumulated into θ when asked)."""
                total = torch.zeros((), dtype=torch.float64)
                for c, logp in zip(chunks, targets, strict=True):
                    part = partner[c] if partner is not None else None
                    with torch.set_grad_enabled(backward):
                        ablated = ablate(h_all[c], unit(theta), mode, mu_abl, part, source=h_all)
                        loss = -kl(logp, fn(ablated)).sum() / n
                    if backward:
                        loss.backward()
                    total += float(loss.detach())
                return total.float()

            def closure(opt=opt, objective=objective) -> torch.Tensor:
                opt.zero_grad()
                return objective(True)

            opt.step(closure)
            with torch.no_grad():
                found[i, j] = _orthonormalise(theta.detach(), q).cpu()
                train_energy[i, j] = -float(objective(False))
            bar.update()
        del h_all, targets
    bar.close()
    seconds = time.perf_counter() - started
    settings = {
        "method": "full-batch L-BFGS per direction, deflation (reference algorithm)", "layers": layers, "k": k,
        "mode": mode, "max_iter": max_iter, "init": init, "seed": seed, "max_tokens": max_tokens,
        "batch_tokens": chunk_tokens, "eval_tokens": eval_tokens, "lens": lens_identity(lens),
        "fit_seconds_this_run": round(seconds, 2),
    }  # fmt: skip
    tokens = {"train_tokens": len(seqs) * store.seq_len}
    return _make_basis(store, lens, layers, k, mode, found, torch.stack(mus), train_energy, eval_tokens, tokens,
                       settings, seed, device, progress, source)  # fmt: skip


__all__ = [
    "Basis", "BasisError", "LensError", "ablate", "estimate_energies", "fit_cbe", "fit_cbe_full_batch", "kl",
    "partners", "stream_mean",
]  # fmt: skip
