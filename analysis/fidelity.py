"""Causal fidelity of a causal basis (Belrose et al. 2023, arXiv 2303.08112, §"Causal fidelity"): the
statistics and the report. Pure numpy/torch; the forward passes live in `lenscache.cache.ablation`.

For a direction v ablated at boundary l, per held-out token:

- model-side effect: KL(p ‖ p′), p the model's next-token distribution, p′ the same with v ablated at l;
- lens-side effect: KL(f(h) ‖ f(r(h, v))), f the lens at l, on the same states h;
- stimulus-response alignment: the Aitchison similarity of the change of the lens's output (the
  stimulus) and the change of the model's output (the response) under that ablation. The change of a
  distribution q → q′ is, in Aitchison geometry, the vector Δ = clr(q′) − clr(q) with
  clr(q) = log q − mean_vocab(log q); the similarity is the cosine ⟨Δ_lens, Δ_model⟩ / (‖Δ_lens‖ ‖Δ_model‖),
  1 for proportional changes, −1 for opposite ones. Tokens where either change is exactly zero are left
  out of its mean (the cosine is undefined there).

Each is averaged over tokens, per direction. Per layer the report gives Spearman's ρ between the
lens-side and the model-side effects of the basis's directions (ranks with ties averaged), the median
model-side effect of the basis's top-4 directions over the median of k seeded random orthonormal
directions, and the alignment averaged over all ablated directions, for the basis's lens and for the
logit lens.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lenscache.fit.cbe import kl

TOP = 4  # the "top-4" of the ratio
QUANTITIES = ("model_kl", "lens_kl", "logit_kl", "lens_align", "logit_align")
CHUNK_ROWS = 128  # tokens per float64 block (vocab-wide rows are large)


# ---- statistics ----------------------------------------------------------------------------------
def rankdata(x: np.ndarray | list[float]) -> np.ndarray:
    """Ranks 1..n of `x`, ties given the mean of the ranks they span."""
    values = np.asarray(x, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.arange(1, values.size + 1)
    _, inverse = np.unique(values, return_inverse=True)
    return (np.bincount(inverse, weights=ranks) / np.bincount(inverse))[inverse]


def spearman(x: np.ndarray | list[float], y: np.ndarray | list[float]) -> float:
    """Spearman's ρ: Pearson's correlation of the tie-averaged ranks; NaN when either side is constant."""
    rx, ry = rankdata(x), rankdata(y)
    if rx.size != ry.size:
        raise ValueError(f"spearman needs equal lengths, got {rx.size} and {ry.size}")
    if rx.size < 2:
        return math.nan
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / den if den > 0 else math.nan


def top_over_random(cbe_effects: np.ndarray | list[float], random_effects: np.ndarray | list[float],
                    top: int = TOP) -> float:  # fmt: skip
    """Median effect of the first `top` basis directions ÷ median effect of the random ones."""
    den = float(np.median(np.asarray(random_effects, dtype=np.float64)))
    num = float(np.median(np.asarray(cbe_effects, dtype=np.float64)[:top]))
    return num / den if den > 0 else math.nan


def clr_change(logq: torch.Tensor, logq_new: torch.Tensor) -> torch.Tensor:
    """clr(q′) − clr(q) in float64 from log-probabilities (…, vocab): the change q → q′ as a vector."""
    d = logq_new.double() - logq.double()
    return d - d.mean(-1, keepdim=True)


def aitchison_similarity(stim: torch.Tensor, stim_new: torch.Tensor, resp: torch.Tensor,
                         resp_new: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Per row, the cosine of clr_change(stim → stim_new) and clr_change(resp → resp_new) (float64);
    NaN where either change is zero."""
    a, b = clr_change(stim, stim_new), clr_change(resp, resp_new)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(den > 0, (a * b).sum(-1) / den, torch.full_like(den, math.nan))


def token_effects(model: tuple[torch.Tensor, torch.Tensor],
                  lenses: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:  # fmt: skip
    """Per-token effects of one ablation from (clean, ablated) log-probabilities (n, vocab): model_kl and,
    for each lens name, {name}_kl and {name}_align (float64, computed CHUNK_ROWS rows at a time)."""
    out: dict[str, list[torch.Tensor]] = {}
    n = model[0].shape[0]
    for a in range(0, n, CHUNK_ROWS):
        rows = slice(a, min(a + CHUNK_ROWS, n))
        mc, me = model[0][rows].double(), model[1][rows].double()
        out.setdefault("model_kl", []).append(kl(mc, me))
        for name, (clean, edited) in lenses.items():
            lc, le = clean[rows].double(), edited[rows].double()
            out.setdefault(f"{name}_kl", []).append(kl(lc, le))
            out.setdefault(f"{name}_align", []).append(aitchison_similarity(lc, le, mc, me))
    return {name: torch.cat(parts).cpu() for name, parts in out.items()}


@dataclass
class EffectSums:
    """Per-direction sums over tokens of each quantity (NaN tokens left out, counted apart)."""

    n_directions: int
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, j: int, effects: dict[str, torch.Tensor]) -> None:
        for name, values in effects.items():
            ok = ~torch.isnan(values)
            self.sums.setdefault(name, np.zeros(self.n_directions))[j] += float(values[ok].sum())
            self.counts.setdefault(name, np.zeros(self.n_directions))[j] += int(ok.sum())

    def means(self) -> dict[str, np.ndarray]:
        """Per-direction means; NaN for a direction none of whose tokens had a value."""
        return {
            name: np.where(self.counts[name] > 0, self.sums[name] / np.maximum(self.counts[name], 1), math.nan)
            for name in self.sums
        }


# ---- the report ----------------------------------------------------------------------------------
@dataclass
class LayerFidelity:
    layer: int
    cbe: dict[str, list[float]]  # quantity -> one value per basis direction (basis order)
    random: dict[str, list[float]]  # quantity -> one value per random direction
    basis_energies: list[float]  # the held-out energies the basis records (lens side, its own tokens)
    spearman: float  # ρ(lens_kl, model_kl) over the basis's directions
    spearman_with_random: float  # the same over basis and random directions together
    top4_over_random: float  # median model_kl of the top-4 basis directions / median of the random ones
    alignment: dict[str, float]  # lens | logit -> mean Aitchison similarity over every ablated direction


def summarise_layer(layer: int, means: dict[str, np.ndarray], n_cbe: int,
                    basis_energies: list[float]) -> LayerFidelity:  # fmt: skip
    """The layer's statistics from per-direction means (basis directions first, then random ones)."""
    cbe = {q: means[q][:n_cbe].tolist() for q in QUANTITIES}
    rnd = {q: means[q][n_cbe:].tolist() for q in QUANTITIES}
    return LayerFidelity(
        layer=layer, cbe=cbe, random=rnd, basis_energies=list(basis_energies),
        spearman=spearman(cbe["lens_kl"], cbe["model_kl"]),
        spearman_with_random=spearman(means["lens_kl"], means["model_kl"]),
        top4_over_random=top_over_random(cbe["model_kl"], rnd["model_kl"]),
        alignment={"lens": _nanmean(means["lens_align"]), "logit": _nanmean(means["logit_align"])},
    )  # fmt: skip


def _nanmean(values: np.ndarray) -> float:
    ok = values[~np.isnan(values)]
    return float(ok.mean()) if ok.size else math.nan


@dataclass
class FidelityReport:
    store: str
    basis: str
    model: dict[str, Any]  # id, weights_hash
    lens: str  # the basis's lens kind
    mode: str  # the ablation, the basis's
    sequences: list[int]  # the held-out sequences used
    positions: int  # positions per sequence used
    tokens: int
    n_random: int
    seed: int
    seconds: float
    clean_check: float  # max |log p| difference between the model's clean pass and the store's output
    layers: list[LayerFidelity]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN and inf become null)."""
        return _finite(dataclasses.asdict(self))


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _fmt(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.3f}"


def markdown(report: FidelityReport) -> str:
    """A readable summary: one row per layer, then the per-direction effects."""
    lines = [
        f"# Causal fidelity: {report.basis}",
        "",
        f"Store {report.store}, model {report.model.get('id')} ({report.model.get('weights_hash')}); "
        f"{report.mode} ablation, {report.lens} lens; {report.tokens:,} held-out tokens "
        f"({len(report.sequences)} sequences × {report.positions} positions), {report.n_random} random "
        f"directions (seed {report.seed}); {report.seconds:.1f} s. Clean pass vs the store's output: "
        f"max |Δ log p| {report.clean_check:.2e}.",
        "",
        f"| layer | ρ (basis) | ρ (basis + random) | top-{TOP} ÷ random | alignment {report.lens} lens "
        "| alignment logit lens |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for lf in report.layers:
        lines.append(f"| {lf.layer} | {_fmt(lf.spearman)} | {_fmt(lf.spearman_with_random)} | "
                     f"{_fmt(lf.top4_over_random)} | {_fmt(lf.alignment['lens'])} | {_fmt(lf.alignment['logit'])} |")  # fmt: skip
    for lf in report.layers:
        lines += ["", f"## Layer {lf.layer}: KL per direction (nats)", "",
                  "| direction | lens side | model side | logit lens side |", "|---|---:|---:|---:|"]  # fmt: skip
        for group, rows in (("basis", lf.cbe), ("random", lf.random)):
            for j, (a, b, c) in enumerate(zip(rows["lens_kl"], rows["model_kl"], rows["logit_kl"], strict=True)):
                lines.append(f"| {group} {j + 1} | {a:.4g} | {b:.4g} | {c:.4g} |")
    return "\n".join(lines + [""] + [f"_{n}_" for n in report.notes]) + "\n"


def plot(report: FidelityReport, path: str | os.PathLike) -> Path:
    """Per layer: effect by rank (lens side and model side; random medians dashed), and a scatter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(report.layers)
    fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 7.5), squeeze=False, constrained_layout=True)
    floor = 1e-9  # log axes: an effect of exactly 0 is drawn at the floor
    for col, lf in enumerate(report.layers):
        top, bottom = axes[0, col], axes[1, col]
        ranks = np.arange(1, len(lf.cbe["model_kl"]) + 1)
        for q, label, color in (("lens_kl", f"{report.lens} lens", "C0"), ("model_kl", "model", "C1")):
            top.plot(ranks, np.maximum(lf.cbe[q], floor), marker="o", color=color, label=label)
            top.axhline(max(float(np.median(lf.random[q])), floor), color=color, linestyle="--", linewidth=1)
        top.set(yscale="log", xlabel="basis direction (rank)", ylabel="KL [nats]",
                title=f"layer {lf.layer} (dashed: random median)")  # fmt: skip
        bottom.scatter(np.maximum(lf.cbe["lens_kl"], floor), np.maximum(lf.cbe["model_kl"], floor), label="basis")
        bottom.scatter(np.maximum(lf.random["lens_kl"], floor), np.maximum(lf.random["model_kl"], floor),
                       facecolors="none", edgecolors="C3", label="random")  # fmt: skip
        bottom.set(xscale="log", yscale="log", xlabel="lens-side KL [nats]", ylabel="model-side KL [nats]",
                   title=f"ρ = {_fmt(lf.spearman)}")  # fmt: skip
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"causal fidelity: {Path(report.basis).name}, {report.tokens:,} tokens")
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_report(report: FidelityReport, out_dir: str | os.PathLike) -> Path:
    """``fidelity.json``, ``fidelity.md`` and ``fidelity.png`` in `out_dir` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.json").write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False))
    (out / "fidelity.md").write_text(markdown(report))
    plot(report, out / "fidelity.png")
    return out


__all__ = [
    "EffectSums", "FidelityReport", "LayerFidelity", "aitchison_similarity", "clr_change", "markdown", "plot",
    "rankdata", "spearman", "summarise_layer", "token_effects", "top_over_random", "write_report",
]  # fmt: skip
