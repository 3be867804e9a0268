"""`lenscache cbe fidelity`: is a causal basis the model's own? (Belrose et al. 2023, §"Causal fidelity").

It loads the model the store was built from (refused unless its weights hash is the store's), runs
it on held-out sequences of the store's own token ids (the held-out split the basis's energies were
estimated on: `lenscache.fit.stream.split_sequences` with the basis's held-out fraction), and ablates
each basis direction, then k seeded random orthonormal directions (QR of a Gaussian), at its
boundary with a forward hook (`lenscache.cache.ablation`). The ablation is the basis's own: mean (the
basis's stored mean state), zero, or resample (another token of the same batch, seeded). On the same
states it applies the basis's lens and the logit lens, and reports per layer what
`lenscache.analysis.fidelity` computes.

Which lens: the basis records only the identity of its lens (kind and tensor hash), not its path.
A basis of the logit lens needs nothing; for a fitted lens pass its directory with ``--lens DIR``
(checked against the recorded hash). ``--max-tokens N``: the first ceil(N / seq_len) held-out
sequences, each cut to its first min(N, seq_len) positions (the model is causal, so a prefix is exact).

The report is written into ``OUT.partial`` and renamed to OUT once whole; a non-empty OUT is refused
unless ``--overwrite``. Every check that needs no model runs before the model is loaded.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch
from tqdm.auto import tqdm

from lenscache.analysis.fidelity import (
    EffectSums,
    FidelityReport,
    summarise_layer,
    token_effects,
    write_report,
)
from lenscache.cache.ablation import check_weights, logprobs_under_edits, recorded_logprobs
from lenscache.cache.model import LoadedModel, ModelSpec, load_model
from lenscache.errors import BasisError, LensCacheError
from lenscache.fit.basis import Basis
from lenscache.fit.cbe import LensFn, ablate, partners
from lenscache.fit.lens import Lens
from lenscache.fit.stream import split_sequences
from lenscache.reader import Store, open_store


@dataclass(frozen=True)
class FidelitySpec:
    """How much to measure: held-out tokens, random directions, seed, tokens per forward pass."""

    max_tokens: int | None = None  # None: every held-out token
    n_random: int | None = None  # None: as many as the basis has directions per layer
    seed: int = 0
    batch_tokens: int = 1024  # tokens per forward pass (several ablations stacked when sequences are short)
    device: str = "cpu"
    progress: bool = True


# ---- inputs ----------------------------------------------------------------------------------------
def resolve_lens(basis: Basis, store: Store, lens: str | Lens | None) -> Lens | None:
    """The basis's lens: None (the logit lens) for a logit basis; a fitted lens must be given (a
    directory or a Lens) and is checked against the basis's record and the store's model."""
    kind = basis.config.lens.get("kind")
    if isinstance(lens, str) and lens != "logit":
        lens = Lens.load(lens)
    elif lens == "logit":
        lens = None
    if lens is None and kind != "logit":
        raise BasisError(f"this basis belongs to a {kind} lens; pass that lens's directory with --lens")
    if lens is not None:
        lens.check_compatible(store)
    basis.check_compatible(store, lens)
    return lens


def held_out_ids(store: Store, basis: Basis, max_tokens: int | None) -> tuple[list[int], np.ndarray]:
    """The held-out sequences used and their token ids (n, positions), read from the store."""
    fraction = float(basis.config.settings.get("held_out_fraction", 0.1))
    held = split_sequences(store.n_sequences, fraction).held_out
    if len(held) == 0:
        raise LensCacheError(f"the held-out split of {store.url} is empty ({store.n_sequences} sequences)")
    if max_tokens is not None and max_tokens < 1:
        raise LensCacheError(f"max_tokens (--max-tokens) must be at least 1, got {max_tokens}")
    budget = max_tokens or len(held) * store.seq_len
    seqs = list(held[: math.ceil(budget / store.seq_len)])
    positions = min(store.seq_len, budget)
    return seqs, store.tokens(seqs)[:, :positions]


def random_directions(d: int, k: int, seed: int, layer: int) -> torch.Tensor:
    """k orthonormal directions (k, d) float32: QR of a seeded Gaussian (seed and layer)."""
    gen = torch.Generator().manual_seed(int(np.random.default_rng([seed, layer]).integers(2**62)))
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))
    return q.T.float().contiguous()


def _check_spec(spec: FidelitySpec, d: int) -> int:
    """The number of random directions; a LensCacheError for a spec out of range."""
    if spec.batch_tokens < 1:
        raise LensCacheError(f"batch_tokens (--batch-tokens) must be at least 1, got {spec.batch_tokens}")
    k = spec.n_random
    if k is not None and not 1 <= k <= d:
        raise LensCacheError(f"n_random (--random) must be between 1 and d_model = {d}, got {k}")
    return k


# ---- measuring -------------------------------------------------------------------------------------
def ablation_edit(v: torch.Tensor, mode: str, mu: torch.Tensor, partner: torch.Tensor | None) -> Callable:
    """edit(h) for the model: the basis's ablation of unit `v` on states (B, P, d), token by token."""

    def edit(h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(-1, h.shape[-1])
        return ablate(flat, v.to(h.dtype), mode, mu.to(h.dtype), partner).reshape(h.shape)

    return edit


def _layer_batch(loaded, ids, layer, h, model_clean, dirs, mode, mu, partner, fns, sums, per_pass) -> None:
    """Every direction of one layer on one batch: the model's pass with the hook, the lenses on h."""
    flat = h.reshape(-1, h.shape[-1]).float()
    once: dict[int, torch.Tensor] = {}  # a logit basis's lens is the logit lens: computed once
    clean = {name: once.setdefault(id(fn), fn(flat)) for name, fn in fns.items()}
    edits = [ablation_edit(v, mode, mu, partner) for v in dirs]
    runs = logprobs_under_edits(loaded, ids, layer, edits, per_pass)
    for j, (v, model_edit) in enumerate(zip(dirs, runs, strict=True)):
        ablated = ablate(flat, v, mode, mu.float(), partner)
        once.clear()
        lenses = {name: (clean[name], once.setdefault(id(fn), fn(ablated))) for name, fn in fns.items()}
        effects = token_effects((model_clean, model_edit.reshape(flat.shape[0], -1)), lenses)
        sums.add(j, effects)


def _lens_fns(store: Store, lens: Lens | None, layer: int, dev: torch.device) -> dict[str, LensFn]:
    logit = LensFn(store.unembed, None, layer).to(dev)
    return {"lens": logit if lens is None else LensFn(store.unembed, lens, layer).to(dev), "logit": logit}


def measure_fidelity(store: Store, basis: Basis, loaded: LoadedModel, lens: Lens | None,
                     spec: FidelitySpec = FidelitySpec(), basis_url: str = "") -> FidelityReport:  # fmt: skip
    """The causal fidelity report of `basis` (checked inputs: see `cbe_fidelity`)."""
    started = time.perf_counter()
    n_random = _check_spec(spec, store.d_model) or basis.config.k
    seqs, ids_np = held_out_ids(store, basis, spec.max_tokens)
    layers, mode, dev = basis.layers, basis.config.mode, loaded.device
    n_cbe = basis.config.k
    dirs = [torch.cat([basis.for_layer(layer), random_directions(store.d_model, n_random, spec.seed, layer)]).to(dev)
            for layer in layers]  # fmt: skip
    mus = [basis.mu[i].float().to(dev) for i in range(len(layers))]
    fns = [_lens_fns(store, lens, layer, dev) for layer in layers]
    sums = [EffectSums(n_cbe + n_random) for _ in layers]
    positions = ids_np.shape[1]
    per_batch = max(1, spec.batch_tokens // positions)
    per_pass = max(1, spec.batch_tokens // (per_batch * positions))
    clean_check = 0.0
    batches = range(0, len(seqs), per_batch)
    bar = tqdm(total=len(batches) * len(layers), desc="cbe fidelity", unit="layer-batch", disable=not spec.progress)
    with torch.inference_mode():
        for b, start in enumerate(batches):
            ids = torch.from_numpy(ids_np[start : start + per_batch].astype(np.int64))
            model_clean, states = recorded_logprobs(loaded, ids, layers)
            stored = store.final_logprobs(seqs[start : start + per_batch], dev)[:, :positions]
            clean_check = max(clean_check, float((model_clean - stored).abs().max()))
            model_clean = model_clean.reshape(-1, model_clean.shape[-1])
            for i, layer in enumerate(layers):
                partner = partners(model_clean.shape[0], spec.seed, b, salt=layer).to(dev) if mode == "resample" else None
                _layer_batch(loaded, ids, layer, states[i], model_clean, dirs[i], mode, mus[i], partner, fns[i], sums[i],
                             per_pass)  # fmt: skip
                bar.update()
    bar.close()
    results = [summarise_layer(layer, s.means(), n_cbe, basis.energies[i].tolist())
               for i, (layer, s) in enumerate(zip(layers, sums, strict=True))]  # fmt: skip
    return FidelityReport(
        store=store.url, basis=basis_url, model={k: loaded.provenance.get(k) for k in ("id", "weights_hash")},
        lens=basis.config.lens.get("kind") or "logit", mode=mode, sequences=seqs, positions=positions,
        tokens=len(seqs) * positions, n_random=n_random, seed=spec.seed, seconds=round(time.perf_counter() - started, 2),
        clean_check=clean_check, layers=results,
        notes=["KL in nats per token, averaged over the held-out tokens; lens-side effects on the same states.",
               "Alignment: mean over all ablated directions (basis and random) of the per-token Aitchison similarity."],
    )  # fmt: skip


# ---- the API and the command -------------------------------------------------------------------------
def check_report_out(out: str | Path, overwrite: bool) -> Path:
    """Refuse an OUT that is a file, or a non-empty directory without `overwrite`."""
    where = Path(out)
    if where.exists() and not where.is_dir():
        raise LensCacheError(f"--out {where} exists and is not a directory; nothing was written")
    if where.is_dir() and any(where.iterdir()) and not overwrite:
        raise LensCacheError(f"--out {where} exists and is not empty; pass --overwrite to replace it")
    return where


def publish_report(report: FidelityReport, out: Path) -> Path:
    """Write the report into OUT.partial, then rename it to OUT (replacing an old one only when whole)."""
    from lenscache.publish import replace_dir
    from lenscache.tools.cbe_cli import partial_dir

    work = partial_dir(out)
    shutil.rmtree(work, ignore_errors=True)  # a report torn by a kill: ours, never a result
    try:
        write_report(report, work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    replace_dir(work, out)
    return out


def cbe_fidelity(store: str, basis: str, model: str, out: str | Path, lens: str | Lens | None = None,
                 spec: FidelitySpec = FidelitySpec(), overwrite: bool = False) -> FidelityReport:  # fmt: skip
    """`lenscache cbe fidelity`: check every input, load and check the model, measure, write OUT."""
    where = check_report_out(out, overwrite)
    st = open_store(store)
    b = Basis.load(basis)
    the_lens = resolve_lens(b, st, lens)
    _check_spec(spec, st.d_model)
    st.unembed  # noqa: B018 - a StoreError for a store without its head, before the model loads
    held_out_ids(st, b, spec.max_tokens)  # the token ids: a corrupt chunk is refused now
    dtype = st.meta.model.get("dtype") or "auto"
    loaded = load_model(ModelSpec(model, device=spec.device, dtype=dtype))
    check_weights(loaded, st.meta.model)
    report = measure_fidelity(st, b, loaded, the_lens, spec, basis_url=str(basis))
    publish_report(report, where)
    return report


@click.command(name="fidelity")
@click.argument("store")
@click.option("--basis", "basis_dir", required=True, help="Basis directory (basis.json + basis.safetensors).")
@click.option("--model", required=True, help="The store's model: hub id, local directory, .gguf file or 'default'.")
@click.option("--out", required=True, help="Report directory to write (fidelity.json, .md, .png).")
@click.option("--lens", "lens_dir", default=None, help="The basis's lens directory (not needed for a logit basis).")
@click.option("--max-tokens", default=None, type=int, help="Held-out tokens to use (default all).")
@click.option("--random", "n_random", default=None, type=int, help="Random directions per layer (default: k).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--batch-tokens", default=1024, show_default=True, type=int, help="Tokens per forward pass.")
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda | cuda:N")
@click.option("--overwrite", is_flag=True, help="Replace an existing report in --out.")
@click.option("--no-progress", is_flag=True)
def fidelity(store: str, basis_dir: str, model: str, out: str, lens_dir: str | None, **kw) -> None:
    """Causal fidelity: ablate each basis direction in the model itself and compare with the lens."""
    spec = FidelitySpec(max_tokens=kw["max_tokens"], n_random=kw["n_random"], seed=kw["seed"],
                        batch_tokens=kw["batch_tokens"], device=kw["device"], progress=not kw["no_progress"])  # fmt: skip
    report = cbe_fidelity(store, basis_dir, model, out, lens_dir, spec, kw["overwrite"])
    click.echo(f"wrote {out}: {report.tokens:,} held-out tokens, {report.seconds:.1f} s")
    for lf in report.layers:
        click.echo(f"  layer {lf.layer}: rho {lf.spearman:.3f}, top-4/random {lf.top4_over_random:.2f}, "
                   f"alignment {report.lens} {lf.alignment['lens']:.3f} vs logit {lf.alignment['logit']:.3f}")  # fmt: skip
