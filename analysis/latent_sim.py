"""The latent-variable simulation of Jiang et al. 2024 ("On the Origins of Linear Representations in LLMs").

The model (the paper's §2, reduced to what the simulation needs): m binary latent concepts C = (C_1..C_m);
the vocabulary is the 2^m assignments, token t having concept i equal to bit i of t; a context x gives a
distribution over concept values and the next token is the assignment drawn from it. A softmax model
p̂(y | x) ∝ exp(f(x)ᵀ g(y)) — a free context embedding f(x) ∈ R^d per context (the theory treats f as
free) and a free unembedding g(y) ∈ R^d per token — is trained on the population cross-entropy (or, with
``samples_per_context``, on sampled tokens) by plain full-batch gradient descent from a small random start.

**With and without log-odds matching.** The paper's linearity theorem needs *log-odds matching*: for
every context x, concept i and base assignment c, ln p̂(c(i→0)|x)/p̂(c(i→1)|x) = ln p(C_i=0|x)/p(C_i=1|x).
For the softmax model the left side is f(x)ᵀ(g(c(i→0)) − g(c(i→1))); if it equals a number that does not
depend on c for contexts whose f(x) span the space, the difference vectors of concept i are all one
vector — a linear representation. We make the two conditions differ in whether the cross-entropy
optimum *forces* matching:

- ``log_odds_matching=True``: each context carries its own product distribution, p(y|x) = Π_i
  Bernoulli(σ(ℓ_{x,i})) with ℓ_{x,i} ~ N(0, logit_scale²) independently; every token has positive
  probability and the log-ratio of two tokens differing in concept i is ℓ_{x,i} whatever the other
  concepts are. The cross-entropy minimiser therefore satisfies matching for every (x, i, c); the only
  freedom left (an invertible map between f and g, components outside the span of the f(x)) is what
  gradient descent's implicit bias settles, which is where the paper's Euclidean orthogonality and the
  embedding–unembedding alignment come from.
- ``log_odds_matching=False``: the paper's latent *conditional* model (its Fig. 1). One latent joint
  p(C) ∝ exp(Σ h_i s_i + Σ_{i<j} J_ij s_i s_j) (s = 2C − 1, h ~ N(0, 0.5²), J ~ N(0, coupling_scale²))
  draws the concept values; a context reveals a random subset of them (each concept hidden with
  probability ``missing_prob``, at least one hidden), and the next token is the revealed values plus the
  hidden ones drawn from p(C_hidden | C_revealed). Tokens that contradict a revealed concept have
  probability 0, so the data say nothing about the log-ratio for base assignments off the context's
  support, and the hidden concept's log-odds depends on the revealed values (the couplings J). Matching
  is not forced; the loss has no finite minimiser (logits of impossible tokens go to −∞) and whatever
  linearity appears comes from the implicit bias of gradient descent — the regime of the paper's
  L(w_1, w_0, v) = Σ ℓ(−y_i w_iᵀ v) analysis.

**Metrics** (all on the current parameters, in plain Euclidean geometry; signs are kept):

- *within-concept cosine* of concept i: the 2^(m−1) difference vectors δ_{i,c} = g(c with C_i=1) −
  g(c with C_i=0), one per assignment c of the other concepts; the mean cosine over all unordered pairs
  of distinct δ's (not against their mean, which would count each δ in its own reference). 1 exactly
  when the representation is linear; about 0 for unrelated vectors. ``within`` is the mean over concepts.
- *concept direction* γ_i = the mean of the δ_{i,c}; *cross-concept* = mean |cos(γ_i, γ_j)| over i < j.
- *embedding direction* β_i: the coefficients of the least-squares fit f(x) ≈ a + Σ_i z_{x,i} β_i over
  the contexts, with z_{x,i} = 2 p(C_i=1|x) − 1 the context's expected spin of concept i (so β_i is how
  the context embedding moves per unit of concept i, the others held fixed); *alignment* of concept i =
  cos(β_i, γ_i); ``alignment`` is the mean over concepts.
- ``loss``: the training cross-entropy (nats per context); ``kl``: loss minus the entropy of the
  training targets, i.e. the mean KL(target ‖ model), 0 at a perfect fit.

Confidence intervals over seeds (`run_seeds`) are two-sided 95% Student-t intervals, mean ± t_{0.975,n−1}
s/√n, with n the number of seeds; one seed has no interval (a t band can leave [−1, 1]; the plot clips it).
A run is bit-for-bit deterministic for a seed: float64, one torch generator, one CPU thread, and the
least-squares fit by the normal equations (LAPACK's lstsq differed in the last bit between equal calls).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lenscache.errors import LensCacheError

OPTIMISERS = ("gd", "adam")
METRICS = ("within", "cross", "alignment", "loss", "kl")
# t_{0.975, df} for df = 1..30; beyond, a Cornish–Fisher expansion (error < 1e-3)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)  # fmt: skip


class SimConfigError(LensCacheError, ValueError):
    """A simulation setting out of range (the message names the field)."""


@dataclass(frozen=True)
class SimConfig:
    """One simulation run. The defaults are those of `lenscache linrep sim` (m = 4, 5,000 steps)."""

    m: int = 4  # binary concepts; the vocabulary has 2^m tokens
    n_contexts: int = 512
    d: int = 16  # embedding dimension (at least m)
    steps: int = 5000
    lr: float = 5.0
    optimiser: str = "gd"  # "gd": plain full-batch gradient descent; "adam": torch's Adam
    log_odds_matching: bool = True
    seed: int = 0
    eval_every: int = 50
    init_scale: float = 1e-3  # std of the initial f and g entries (small: the implicit-bias regime)
    logit_scale: float = 2.0  # matching: std of the per-context concept log-odds
    missing_prob: float = 0.5  # no matching: chance a concept is hidden by a context
    coupling_scale: float = 0.5  # no matching: std of the latent joint's pairwise couplings
    samples_per_context: int = 0  # 0: the exact target distribution; k: k sampled next tokens per context

    def __post_init__(self) -> None:
        checks = {
            "m": (self.m >= 2 and self.m <= 12, "must be between 2 and 12"),
            "n_contexts": (self.n_contexts >= 2, "must be at least 2"),
            "d": (self.d >= self.m, f"must be at least m = {self.m}"),
            "steps": (self.steps >= 1, "must be at least 1"),
            "lr": (math.isfinite(self.lr) and self.lr > 0, "must be a positive number"),
            "optimiser": (self.optimiser in OPTIMISERS, f"must be one of {', '.join(OPTIMISERS)}"),
            "eval_every": (self.eval_every >= 1, "must be at least 1"),
            "init_scale": (math.isfinite(self.init_scale) and self.init_scale > 0, "must be positive"),
            "logit_scale": (math.isfinite(self.logit_scale) and self.logit_scale >= 0, "must be ≥ 0"),
            "missing_prob": (0 < self.missing_prob <= 1, "must be in (0, 1]"),
            "coupling_scale": (math.isfinite(self.coupling_scale) and self.coupling_scale >= 0, "must be ≥ 0"),
            "samples_per_context": (self.samples_per_context >= 0, "must be ≥ 0"),
        }
        for name, (ok, why) in checks.items():
            if not ok:
                raise SimConfigError(f"{name} = {getattr(self, name)!r} {why}")


@dataclass
class SimResult:
    """Metrics at each evaluated step (step 0 is the initialisation, the last is `config.steps`)."""

    config: SimConfig
    steps: list[int] = field(default_factory=list)
    within: list[float] = field(default_factory=list)
    within_per_concept: list[list[float]] = field(default_factory=list)
    cross: list[float] = field(default_factory=list)
    alignment: list[float] = field(default_factory=list)
    alignment_per_concept: list[list[float]] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def final(self) -> dict[str, float]:
        return {name: getattr(self, name)[-1] for name in METRICS}

    def to_dict(self) -> dict:
        out = asdict(self)
        out["config"] = asdict(self.config)
        return out


def token_bits(m: int) -> torch.Tensor:
    """(2^m, m) float64: row t holds the concept values of token t (bit i of t is concept i)."""
    t = torch.arange(2**m)
    return ((t[:, None] >> torch.arange(m)[None, :]) & 1).to(torch.float64)


def _product_contexts(config: SimConfig, gen: torch.Generator) -> torch.Tensor:
    """Targets (n, 2^m) of contexts with independent concepts of random log-odds."""
    logits = torch.randn(config.n_contexts, config.m, generator=gen, dtype=torch.float64) * config.logit_scale
    bits = token_bits(config.m)
    log_p = logits @ bits.T - torch.nn.functional.softplus(logits).sum(1, keepdim=True)
    return log_p.exp()


def _conditional_contexts(config: SimConfig, gen: torch.Generator) -> torch.Tensor:
    """Targets (n, 2^m) of the latent conditional model: revealed concepts fixed, hidden ones from p(C)."""
    m, n = config.m, config.n_contexts
    h = torch.randn(m, generator=gen, dtype=torch.float64) * 0.5
    couplings = torch.randn(m, m, generator=gen, dtype=torch.float64).triu(1) * config.coupling_scale
    spins = 2 * token_bits(m) - 1
    log_joint = spins @ h + ((spins @ couplings) * spins).sum(1)
    joint = torch.softmax(log_joint, 0)
    latent = torch.multinomial(joint, n, replacement=True, generator=gen)  # the concept values behind x
    hidden = torch.rand(n, m, generator=gen, dtype=torch.float64) < config.missing_prob
    forced = torch.randint(m, (n,), generator=gen)  # a context always leaves at least one concept open
    hidden[torch.arange(n), forced] |= ~hidden.any(1)
    bits = token_bits(m)
    latent_bits = bits[latent]  # (n, m)
    consistent = ((bits[None, :, :] == latent_bits[:, None, :]) | hidden[:, None, :]).all(2)  # (n, 2^m)
    weights = joint[None, :] * consistent
    return weights / weights.sum(1, keepdim=True)


def make_targets(config: SimConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The training targets (n, 2^m) (exact, or the empirical distribution of sampled tokens) and the
    contexts' true concept probabilities p(C_i=1|x) (n, m)."""
    make = _product_contexts if config.log_odds_matching else _conditional_contexts
    exact = make(config, gen)
    concept_prob = exact @ token_bits(config.m)
    if config.samples_per_context == 0:
        return exact, concept_prob
    draws = torch.multinomial(exact, config.samples_per_context, replacement=True, generator=gen)
    counts = torch.zeros_like(exact).scatter_add_(1, draws, torch.ones_like(draws, dtype=exact.dtype))
    return counts / config.samples_per_context, concept_prob


def concept_differences(g: torch.Tensor, m: int) -> torch.Tensor:
    """(m, 2^(m-1), d): δ_{i,c} = g(c with C_i=1) − g(c with C_i=0) for each assignment c of the others."""
    tokens = torch.arange(2**m)
    rows = []
    for i in range(m):
        base = tokens[((tokens >> i) & 1) == 0]
        rows.append(g[base | (1 << i)] - g[base])
    return torch.stack(rows)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-300)


def within_cosines(g: torch.Tensor, m: int) -> torch.Tensor:
    """(m,): per concept, the mean cosine over unordered pairs of distinct difference vectors δ_{i,c}."""
    u = _unit(concept_differences(g, m))
    gram = u @ u.transpose(1, 2)  # (m, k, k)
    k = gram.shape[1]
    off = ~torch.eye(k, dtype=torch.bool)
    return gram[:, off].mean(1)


def concept_directions(g: torch.Tensor, m: int) -> torch.Tensor:
    """(m, d): γ_i, the mean difference vector of concept i."""
    return concept_differences(g, m).mean(1)


def cross_cosine(directions: torch.Tensor) -> float:
    """Mean |cos(γ_i, γ_j)| over pairs i < j of concept directions (rows)."""
    u = _unit(directions)
    gram = u @ u.T
    i, j = torch.triu_indices(len(u), len(u), 1)
    return gram[i, j].abs().mean().item()


def embedding_directions(f: torch.Tensor, concept_prob: torch.Tensor) -> torch.Tensor:
    """(m, d): β_i, the least-squares coefficients of f(x) ≈ a + Σ_i (2 p(C_i=1|x) − 1) β_i."""
    design = torch.cat([torch.ones_like(concept_prob[:, :1]), 2 * concept_prob - 1], 1)
    # the normal equations, not lstsq: LAPACK's lstsq varied in the last bit between identical calls
    try:
        return torch.linalg.solve(design.T @ design, design.T @ f)[1:]
    except torch.linalg.LinAlgError:  # contexts that do not vary a concept: the minimum-norm fit
        return torch.linalg.lstsq(design, f, driver="gelsd").solution[1:]


def alignments(embed_dirs: torch.Tensor, unembed_dirs: torch.Tensor) -> torch.Tensor:
    """(m,): cos(β_i, γ_i), concept by concept."""
    return (_unit(embed_dirs) * _unit(unembed_dirs)).sum(1)


def loss_and_grads(f: torch.Tensor, g: torch.Tensor, targets: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over contexts and its gradients in f and g, written out (cheaper than autograd
    for a model this small): ∂/∂logits = (softmax − targets)/n, so ∇f = R g and ∇g = Rᵀ f."""
    log_q = torch.log_softmax(f @ g.T, 1)
    n = len(f)
    loss = -(targets * log_q).sum() / n
    resid = (log_q.exp() - targets) / n  # target rows sum to 1
    return loss.item(), resid @ g, resid.T @ f


def simulate(config: SimConfig, progress: bool = False) -> SimResult:
    """Sample a data set from the latent variable model, train f and g on it, and track the metrics.

    Runs on one CPU thread (restored afterwards): the matrices are tiny, and intra-op threads only add
    synchronisation — 500 steps took 11 s on two threads of a busy 2-core machine and 0.25 s on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _simulate(config, progress)
    finally:
        torch.set_num_threads(threads)


def _simulate(config: SimConfig, progress: bool) -> SimResult:
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(config.seed)
    targets, concept_prob = make_targets(config, gen)
    entropy = -(targets * targets.clamp_min(1e-300).log()).sum(1).mean().item()
    f = torch.randn(config.n_contexts, config.d, generator=gen, dtype=torch.float64) * config.init_scale
    g = torch.randn(2**config.m, config.d, generator=gen, dtype=torch.float64) * config.init_scale
    adam = torch.optim.Adam([f, g], lr=config.lr) if config.optimiser == "adam" else None
    result = SimResult(config)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, desc=f"seed {config.seed}", leave=False)
    for step in range(config.steps + 1):
        loss, grad_f, grad_g = loss_and_grads(f, g, targets)
        if step % config.eval_every == 0 or step == config.steps:
            _record(result, step, f, g, concept_prob, loss, entropy)
        if step == config.steps:
            break
        if adam is not None:
            f.grad, g.grad = grad_f, grad_g
            adam.step()
        else:
            f -= config.lr * grad_f
            g -= config.lr * grad_g
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    result.seconds = time.perf_counter() - start
    return result


def _record(result: SimResult, step: int, f, g, concept_prob, loss: float, entropy: float) -> None:
    m = result.config.m
    within = within_cosines(g, m)
    gamma = concept_directions(g, m)
    align = alignments(embedding_directions(f, concept_prob), gamma)
    result.steps.append(step)
    result.within.append(within.mean().item())
    result.within_per_concept.append(within.tolist())
    result.cross.append(cross_cosine(gamma))
    result.alignment.append(align.mean().item())
    result.alignment_per_concept.append(align.tolist())
    result.loss.append(loss)
    result.kl.append(loss - entropy)


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom."""
    if df < 1:
        raise SimConfigError(f"a t interval needs at least 1 degree of freedom, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959963984540054
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values: list[float]) -> dict:
    """Mean and two-sided 95% Student-t interval (None for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "lo": None, "hi": None}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half}


def run_seeds(config: SimConfig, seeds: list[int], progress: bool = False) -> dict:
    """`simulate` for each seed; per step and at the end, the mean and 95% t interval over seeds."""
    if not seeds:
        raise SimConfigError("seeds is empty: give at least one seed")
    runs = [simulate(_with_seed(config, s), progress=progress) for s in seeds]
    steps = runs[0].steps
    curves = {}
    for name in METRICS:
        per_step = [mean_ci([getattr(r, name)[k] for r in runs]) for k in range(len(steps))]
        curves[name] = {key: [p[key] for p in per_step] for key in ("mean", "lo", "hi")}
    final = {name: {**mean_ci([r.final()[name] for r in runs]), "values": [r.final()[name] for r in runs]}
             for name in METRICS}  # fmt: skip
    per_concept = {
        "within": [mean_ci([r.within_per_concept[-1][i] for r in runs]) for i in range(config.m)],
        "alignment": [mean_ci([r.alignment_per_concept[-1][i] for r in runs]) for i in range(config.m)],
    }
    return {
        "config": asdict(config) | {"seed": None},
        "seeds": list(seeds),
        "interval": "two-sided 95% Student-t over seeds (mean ± t_{0.975,n-1} s/sqrt(n))",
        "steps": steps,
        "curves": curves,
        "final": final,
        "final_per_concept": per_concept,
        "seconds": sum(r.seconds for r in runs),
    }


def _with_seed(config: SimConfig, seed: int) -> SimConfig:
    return SimConfig(**(asdict(config) | {"seed": seed}))


LABELS = {
    "within": "within-concept cosine (pairs of δ)",
    "cross": "mean |cross-concept cosine|",
    "alignment": "embedding–unembedding alignment",
    "kl": "KL(target ‖ model) [nats]",
}


def plot(results: dict[str, dict], path: str | os.PathLike) -> Path:
    """Four panels against training step, one line per condition (name → `run_seeds` output), 95% bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    for ax, (metric, label) in zip(axes.flat, LABELS.items(), strict=True):
        for name, res in results.items():
            curve = res["curves"][metric]
            (line,) = ax.plot(res["steps"], curve["mean"], label=f"{name} (n={len(res['seeds'])})")
            if curve["lo"][0] is not None:
                # a t band can leave [-1, 1] (or go below 0 for the KL); clip it to what the metric can be
                low, high = (1e-12, math.inf) if metric == "kl" else (-1.0, 1.0)
                lo = [min(max(v, low), high) for v in curve["lo"]]
                hi = [min(max(v, low), high) for v in curve["hi"]]
                ax.fill_between(res["steps"], lo, hi, color=line.get_color(), alpha=0.25)
        ax.set_title(label)
        ax.set_xlabel("gradient step (linear to the first evaluation, then log)")
        steps = next(iter(results.values()))["steps"]
        if len(steps) > 1:
            ax.set_xscale("symlog", linthresh=steps[1])
        if metric == "kl":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(loc="lower right")
    m = next(iter(results.values()))["config"]["m"]
    fig.suptitle(f"Latent-variable simulation (Jiang et al. 2024), m = {m} concepts: mean and 95% t-interval over seeds")
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
