"""Linear representations in a model's unembedding (Park et al. 2023; Jiang et al. 2024), from a store's head.

γ(y) is row y of the unembedding matrix ``head/unembed`` (vocab, d): the unembedding vectors as
Park et al. use them, before the final norm's weight. (The norm weight multiplies the residual
side, ``logit(y) = γ(y)ᵀ (w ⊙ ĥ)``; `linrep_residual` maps residual states through the final norm
so both sides meet in the space γ acts on.)

The causal inner product is ``⟨x, y⟩_C = xᵀ Cov(γ)⁻¹ y`` with Cov(γ) the covariance of γ over the
whole vocabulary, in float64. It is computed by whitening, ``A = Cov^{-1/2}`` from `numpy.linalg.eigh`
(symmetric), so ``⟨x, y⟩_C = (Ax)ᵀ(Ay)``; when the smallest eigenvalue is below ``RCOND`` times the
largest, a ridge of ``RCOND × largest`` is added to every eigenvalue (recorded as `ridge`).
An embedding-side vector λ (a residual direction, acting as ``γᵀλ``) is mapped by ``A⁻¹ = Cov^{1/2}``
(Park et al.'s ``l = A^{-T} λ``), so that ``(A⁻¹λ)ᵀ(Aγ) = λᵀγ``.

For each concept the pair differences ``δ_i = γ(y₁ᵢ) − γ(y₀ᵢ)`` give:

- linearity: the leave-one-out cosine of each δ_i with the mean of the other δ_j, against the
  cosine with the concept's mean direction of δ for random token pairs from the whole vocabulary;
  AUROC (rank based) and Cohen's d of the two sets, under either inner product;
- orthogonality: the cosines between concepts' mean directions, and their mean |off-diagonal|.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lenscache.errors import StoreError

from .concepts import ConceptPairs

RCOND = 1e-9
INNER_PRODUCTS = ("euclidean", "causal")
N_RANDOM = 1000


def unembedding(store: Any) -> np.ndarray:
    """γ as float64 (vocab, d) from the store's head; a clear error for a store without one."""
    try:
        head = store.unembed
    except StoreError as exc:
        raise StoreError(f"{exc}: the linear-representation analysis needs the stored head") from None
    return head.unembed.detach().cpu().numpy().astype(np.float64)


class CausalInnerProduct:
    """⟨x, y⟩_C = xᵀ Cov(γ)⁻¹ y through the whitening A = Cov(γ)^{-1/2} (see the module docstring)."""

    def __init__(self, gamma: np.ndarray, rcond: float = RCOND):
        g = np.asarray(gamma, dtype=np.float64)
        self.mean = g.mean(0)
        centered = g - self.mean
        cov = centered.T @ centered / max(1, g.shape[0] - 1)
        evals, evecs = np.linalg.eigh(cov)
        top = float(evals[-1]) if evals.size else 0.0
        self.ridge = rcond * top if evals[0] <= rcond * top else 0.0
        evals = np.maximum(evals, 0.0) + self.ridge
        if not np.all(evals > 0):
            raise StoreError("the unembedding matrix is zero: no causal inner product exists")
        self.cov = cov
        self.whitener = (evecs / np.sqrt(evals)) @ evecs.T  # A = Cov^{-1/2}
        self.colorer = (evecs * np.sqrt(evals)) @ evecs.T  # A⁻¹ = Cov^{1/2}

    def whiten(self, x: np.ndarray) -> np.ndarray:
        """Unembedding-side vectors (..., d) -> A x, where the causal inner product is Euclidean."""
        return np.asarray(x, dtype=np.float64) @ self.whitener  # A is symmetric

    def embed(self, lam: np.ndarray) -> np.ndarray:
        """Embedding-side vectors (..., d) -> A⁻¹ λ, paired with `whiten`ed unembedding vectors."""
        return np.asarray(lam, dtype=np.float64) @ self.colorer

    def inner(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (self.whiten(x) * self.whiten(y)).sum(-1)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine along the last axis (0 where a vector is zero)."""
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting one half (Mann-Whitney U by ranks)."""
    pos, neg = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if pos.size == 0 or neg.size == 0:
        return math.nan
    scores = np.concatenate([pos, neg])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(scores.size, dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    starts = np.r_[0, np.nonzero(np.diff(sorted_scores))[0] + 1]
    ends = np.r_[starts[1:], scores.size]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0  # 1-based ranks s+1..e averaged
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def cohens_d(a: np.ndarray, b: np.ndarray) -> float:
    """(mean a − mean b) / pooled standard deviation."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < 2 or b.size < 2:
        return math.nan
    pooled = ((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1)) / (a.size + b.size - 2)
    if pooled <= 0:
        return math.inf if a.mean() > b.mean() else (0.0 if a.mean() == b.mean() else -math.inf)
    return float((a.mean() - b.mean()) / math.sqrt(pooled))


def differences(gamma: np.ndarray, concept: ConceptPairs) -> np.ndarray:
    """δ_i = γ(y₁ᵢ) − γ(y₀ᵢ) for the usable pairs, float64 (n, d)."""
    base, cf = concept.id_arrays()
    if max(base.max(), cf.max()) >= gamma.shape[0]:
        raise StoreError(f"concept {concept.name!r} has token ids beyond the head's vocabulary ({gamma.shape[0]})")
    return gamma[cf] - gamma[base]


def concept_direction(gamma: np.ndarray, concept: ConceptPairs) -> np.ndarray:
    """The concept's unembedding direction γ̄_W: the mean pair difference (float64, d)."""
    return differences(gamma, concept).mean(0)


def loo_cosines(deltas: np.ndarray) -> np.ndarray:
    """Cosine of each row with the mean of the other rows."""
    n = deltas.shape[0]
    others = (deltas.sum(0, keepdims=True) - deltas) / max(1, n - 1)
    return cosine(deltas, others)


@dataclass
class Linearity:
    mean_loo: float  # mean leave-one-out cosine of the concept's pairs
    mean_random: float  # mean cosine of random token pairs with the concept's mean direction
    auroc: float
    cohens_d: float
    loo: list[float] = field(repr=False, default_factory=list)
    random: list[float] = field(repr=False, default_factory=list)


def linearity(deltas: np.ndarray, random_deltas: np.ndarray) -> Linearity:
    """Leave-one-out cosines of the concept's pairs vs random pairs' cosines with the concept's mean."""
    loo = loo_cosines(deltas)
    rand = cosine(random_deltas, deltas.mean(0, keepdims=True))
    return Linearity(
        float(loo.mean()), float(rand.mean()), auroc(loo, rand), cohens_d(loo, rand), loo.tolist(), rand.tolist()
    )


def random_pairs(vocab: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n random token pairs (a ≠ b) from the whole vocabulary."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, vocab, size=n)
    b = (a + rng.integers(1, vocab, size=n)) % vocab  # never a itself
    return a, b


def off_diagonal_mean(matrix: np.ndarray) -> float:
    n = matrix.shape[0]
    if n < 2:
        return math.nan
    return float(np.abs(matrix[~np.eye(n, dtype=bool)]).mean())


@dataclass
class GeometryResult:
    """Item 1 of the analysis: linearity per concept and orthogonality between concepts."""

    model: dict[str, Any]
    vocab_size: int
    d: int
    ridge: float
    n_random: int
    concepts: list[dict[str, Any]]  # summary + skipped
    linearity: dict[str, dict[str, Linearity]]  # inner product -> concept -> Linearity
    cosines: dict[str, list[list[float]]]  # inner product -> C x C cosines between mean directions
    mean_abs_offdiag: dict[str, float]

    @property
    def names(self) -> list[str]:
        return [c["name"] for c in self.concepts]

    def to_dict(self, with_scores: bool = False) -> dict[str, Any]:
        out = asdict(self)
        if not with_scores:
            for per in out["linearity"].values():
                for lin in per.values():
                    lin.pop("loo")
                    lin.pop("random")
        return out

    def markdown(self) -> str:
        lines = [
            "# Unembedding geometry of concepts",
            "",
            f"Model {self.model.get('id')!r}: vocabulary {self.vocab_size:,}, d = {self.d}; causal inner product "
            f"⟨x, y⟩ = xᵀ Cov(γ)⁻¹ y over the whole vocabulary (ridge {self.ridge:.3g}); "
            f"{self.n_random} random token pairs as the baseline.",
            "",
            "## Linearity (leave-one-out cosine of a pair's difference with the concept's mean direction)",
            "",
            "| concept | usable / pairs | LOO cos (eucl) | random (eucl) | AUROC (eucl) | d (eucl) "
            "| LOO cos (causal) | random (causal) | AUROC (causal) | d (causal) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in self.concepts:
            e, k = self.linearity["euclidean"][c["name"]], self.linearity["causal"][c["name"]]
            lines.append(
                f"| {c['name']} | {c['n_usable']} / {c['n_pairs']} | {e.mean_loo:.3f} | {e.mean_random:.3f} "
                f"| {e.auroc:.3f} | {e.cohens_d:.2f} | {k.mean_loo:.3f} | {k.mean_random:.3f} | {k.auroc:.3f} "
                f"| {k.cohens_d:.2f} |"
            )
        lines += ["", "## Orthogonality (cosines between concepts' mean directions)", ""]
        for ip in INNER_PRODUCTS:
            lines.append(f"Mean |off-diagonal cosine|, {ip}: **{self.mean_abs_offdiag[ip]:.3f}**")
            lines.append("")
            lines.append("| | " + " | ".join(self.names) + " |")
            lines.append("|---|" + "---:|" * len(self.names))
            for name, row in zip(self.names, self.cosines[ip], strict=True):
                lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
            lines.append("")
        return "\n".join(lines)


def analyze_geometry(
    gamma: np.ndarray,
    concepts: list[ConceptPairs],
    *,
    n_random: int = N_RANDOM,
    seed: int = 0,
    model: dict[str, Any] | None = None,
    causal: CausalInnerProduct | None = None,
) -> GeometryResult:
    """Linearity and orthogonality of `concepts` in the unembedding `gamma` (vocab, d)."""
    gamma = np.asarray(gamma, dtype=np.float64)
    causal = causal or CausalInnerProduct(gamma)
    ra, rb = random_pairs(gamma.shape[0], n_random, seed)
    random_deltas = gamma[rb] - gamma[ra]
    maps = {"euclidean": lambda x: x, "causal": causal.whiten}
    lin: dict[str, dict[str, Linearity]] = {ip: {} for ip in INNER_PRODUCTS}
    cos: dict[str, list[list[float]]] = {}
    offdiag: dict[str, float] = {}
    for ip, f in maps.items():
        means = []
        for concept in concepts:
            deltas = f(differences(gamma, concept))
            lin[ip][concept.name] = linearity(deltas, f(random_deltas))
            means.append(deltas.mean(0))
        m = np.stack(means)
        matrix = cosine(m[:, None, :], m[None, :, :])
        cos[ip] = matrix.tolist()
        offdiag[ip] = off_diagonal_mean(matrix)
    return GeometryResult(
        model=dict(model or {}),
        vocab_size=int(gamma.shape[0]),
        d=int(gamma.shape[1]),
        ridge=float(causal.ridge),
        n_random=n_random,
        concepts=[{**c.summary(), "skipped": c.skipped} for c in concepts],
        linearity=lin,
        cosines=cos,
        mean_abs_offdiag=offdiag,
    )


def geometry_from_store(
    store: Any, pair_files: list[str], *, n_random: int = N_RANDOM, seed: int = 0
) -> GeometryResult:
    """Item 1 from a store: its head's unembedding and its own tokenizer (no model run)."""
    from .concepts import load_concepts

    gamma = unembedding(store)  # first: a store without the head fails before any tokenizing
    concepts = load_concepts(pair_files, store.tokenizer())
    model = {k: store.meta.model.get(k) for k in ("id", "weights_hash")}
    return analyze_geometry(gamma, concepts, n_random=n_random, seed=seed, model=model)


# ---- files ---------------------------------------------------------------------------------------


def plot_orthogonality(result: GeometryResult, path: str | Path) -> Path:
    """Heatmaps of the concept-direction cosines, Euclidean and causal, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result.names
    n = len(names)
    fig, axes = plt.subplots(1, 2, figsize=(5 + 0.9 * n, 2.5 + 0.45 * n), constrained_layout=True)
    for ax, ip in zip(axes, INNER_PRODUCTS, strict=True):
        im = ax.imshow(np.asarray(result.cosines[ip]), vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{result.cosines[ip][i][j]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_title(f"{ip}: mean |off-diag| {result.mean_abs_offdiag[ip]:.3f}", fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.8, label="cosine")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_linearity(result: GeometryResult, path: str | Path) -> Path:
    """Per concept: leave-one-out cosines of its pairs vs random pairs, under both inner products."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result.names
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.1 * len(names), 4), constrained_layout=True, sharey=True)
    for ax, ip in zip(axes, INNER_PRODUCTS, strict=True):
        data, positions, colors = [], [], []
        for i, name in enumerate(names):
            lin = result.linearity[ip][name]
            data += [lin.loo, lin.random]
            positions += [3 * i, 3 * i + 1]
            colors += ["tab:blue", "tab:gray"]
        parts = ax.boxplot(data, positions=positions, widths=0.8, patch_artist=True, showfliers=False)
        for patch, color in zip(parts["boxes"], colors, strict=True):
            patch.set_facecolor(color)
        ax.set_xticks([3 * i + 0.5 for i in range(len(names))], names, rotation=60, ha="right", fontsize=8)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(f"{ip} (blue: concept pairs, LOO; gray: random pairs)", fontsize=9)
    axes[0].set_ylabel("cosine with the concept direction")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_geometry(result: GeometryResult, out: str | Path) -> list[Path]:
    """geometry.json, geometry.md, orthogonality.png and linearity.png in directory `out`."""
    where = Path(out)
    where.mkdir(parents=True, exist_ok=True)
    (where / "geometry.json").write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    (where / "geometry.md").write_text(result.markdown() + "\n")
    return [
        where / "geometry.json",
        where / "geometry.md",
        plot_orthogonality(result, where / "orthogonality.png"),
        plot_linearity(result, where / "linearity.png"),
    ]
