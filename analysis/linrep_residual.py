"""Embedding vs unembedding alignment, layer by layer (Jiang et al. 2024), from a padded prompts store.

The store holds one prompt per sequence (``lenscache build --packing padded --data prompts.jsonl``,
the prompts of `lenscache.analysis.concepts`): position ``lengths - 1`` predicts the next word,
the pair's base word (label 0) or its counterfactual (label 1). At every stored boundary, for each
concept:

- the difference of class means δ = mean(label 1) − mean(label 0) and its cosine with the concept's
  unembedding direction γ̄ (`linrep.concept_direction`), Euclidean and causal;
- a logistic probe (L2, fitted out of core) and its held-out accuracy, and the cosine of its weight
  vector with γ̄;
- the same cosines of δ when each state is first mapped by a fitted lens into the final space.

Which space: a residual state h is read as the head reads it, φ(h) = final norm (+ projection) of
h, the vector γ multiplies (``logit(y) = γ(y)ᵀ φ(h)``); φ is applied per state, before averaging.
At an inner layer that is the logit lens's reading; with a lens, φ(lens.translate(h, layer)).
δ is an embedding-side vector: its causal cosine with γ̄ is ``cos(Cov^{1/2} δ, Cov^{-1/2} γ̄)``
(`CausalInnerProduct.embed` / `whiten`), which does not depend on how the norm's weight is split
between the two sides. A probe's weight w acts as ``wᵀ φ(h)``, like an unembedding vector: its
causal cosine is ``cos(Cov^{-1/2} w, Cov^{-1/2} γ̄)``.

Everything streams from the store through the one reader (`lenscache.fit.stream.ResidualStream`):
blocks of whole chunks, of which only the prediction position of each sequence is kept; memory is
a few blocks whatever the size of the store. Sums are float64. The probe's held-out set is a
seeded fraction of each concept's pairs, so the prompts of a pair are never on both sides.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lenscache.errors import LensCacheError, StoreError

from .concepts import ConceptError, ConceptPairs, PromptRow
from .linrep import CausalInnerProduct, concept_direction, cosine, unembedding
from .prompt_store import check_prompt_store

VIEWS = ("raw", "lens")


class PromptMismatch(StoreError):
    """The store's sequences are not the prompts file's prompts."""


# ---- the prompts and the store -------------------------------------------------------------------


def check_prompts(store: Any, rows: list[PromptRow]) -> None:
    """Refuse a store that is not the padded build of exactly these prompts (count and token ids)."""
    check_prompt_store(store, [r.text for r in rows], PromptMismatch)


@dataclass
class Design:
    """Per sequence: its concept (index into `names`), label, pair, held-out flag, target token."""

    names: list[str]
    concept: np.ndarray  # int64 (n,)
    label: np.ndarray  # int64 (n,)
    pair: np.ndarray  # int64 (n,)
    held_out: np.ndarray  # bool (n,)
    target: np.ndarray  # int64 (n,): the token id of the expected next word

    @property
    def n_concepts(self) -> int:
        return len(self.names)


def held_out_pairs(pairs: list[int], fraction: float, seed: int) -> set[int]:
    """A seeded `fraction` of `pairs` (at least one, and at least one left) for held-out evaluation."""
    unique = sorted(set(pairs))
    n = min(len(unique) - 1, max(1, round(fraction * len(unique))))
    rng = np.random.default_rng(seed)
    return set(rng.choice(unique, size=n, replace=False).tolist()) if n > 0 else set()


def design(rows: list[PromptRow], concepts: list[ConceptPairs], held_out_fraction: float = 0.25,
           seed: int = 0) -> Design:
    """Index the prompts by concept; every concept, pair and label must be a usable one of `concepts`."""
    if not 0.0 < held_out_fraction < 1.0:
        raise LensCacheError(f"held-out fraction (--held-out) must be in (0, 1), got {held_out_fraction}")
    by_name = {c.name: c for c in concepts}
    names = list(dict.fromkeys(r.concept for r in rows))
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ConceptError(
            f"the prompts name concepts with no pair file: {', '.join(missing)} (give --pairs NAME.json for each)"
        )
    index = {n: i for i, n in enumerate(names)}
    ids = {n: dict(zip(by_name[n].usable, by_name[n].ids, strict=True)) for n in names}
    target = np.empty(len(rows), dtype=np.int64)
    for k, r in enumerate(rows):
        if r.pair not in ids[r.concept]:
            raise ConceptError(
                f"prompt {k} refers to pair {r.pair} of concept {r.concept!r}, which is not a usable pair of its "
                "pair file (write the prompts with `lenscache linrep prompts` from the same pair files)"
            )
        target[k] = ids[r.concept][r.pair][r.label]
    concept = np.array([index[r.concept] for r in rows], dtype=np.int64)
    label = np.array([r.label for r in rows], dtype=np.int64)
    pair = np.array([r.pair for r in rows], dtype=np.int64)
    held = np.zeros(len(rows), dtype=bool)
    for c, name in enumerate(names):
        mine = concept == c
        for y in (0, 1):
            if not (mine & (label == y)).any():
                raise ConceptError(f"concept {name!r} has no prompt of label {y} in the prompts file")
        chosen = held_out_pairs(pair[mine].tolist(), held_out_fraction, seed + c)
        if not chosen:
            raise ConceptError(f"concept {name!r} has prompts for one pair only: no held-out split by pair")
        held |= mine & np.isin(pair, list(chosen))
    return Design(names, concept, label, pair, held, target)


# ---- streaming the prediction positions ------------------------------------------------------------


@dataclass
class Rows:
    """States at the prediction position of some sequences: feats (L, b, d) float32, and their sequence ids."""

    feats: dict[str, torch.Tensor]  # view -> (L, b, d), φ applied
    seq: np.ndarray  # int64 (b,)
    final_logprob: np.ndarray  # float32 (b,): log-prob of the target token at the model's output
    final_top1: np.ndarray  # bool (b,): the target is the model's most likely next token


class PredictionStream:
    """Prediction-position states of a padded store, block by block, through `ResidualStream`."""

    def __init__(self, store: Any, design: Design, lens: Any = None, workers: int = 2):
        from lenscache.fit.stream import ResidualStream

        self.store, self.design, self.lens, self.workers = store, design, lens, workers
        self.n_layers = store.meta.n_layers
        inner = [b for b in store.layers if b != self.n_layers]
        if not inner:
            raise StoreError(f"store {store.url} holds no layer boundary before the last")
        self.stream_layers = inner
        self.layers = inner + [self.n_layers]  # the exact last boundary comes from `final`
        self.lengths = store.lengths()
        self.head = store.unembed
        self._stream_cls = ResidualStream
        if lens is not None:
            lens.check_compatible(store)
        self.lens_layers = [b for b in self.layers if lens is not None and (b in lens.layers or b == self.n_layers)]

    def phi(self, h: torch.Tensor) -> torch.Tensor:
        """What the unembedding multiplies: the final norm (+ projection) of residual states."""
        x = self.head.normalize(h)
        if self.head.proj_out is not None:
            x = x @ self.head.proj_out.T
        return x

    def __iter__(self) -> Iterator[Rows]:
        return self.epochs(1, shuffle=False)

    def epochs(self, epochs: int, shuffle: bool, seed: int = 0) -> Iterator[Rows]:
        from lenscache.fit.stream import StreamSpec

        store = self.store
        block = store.meta.build.seqs_per_chunk * store.seq_len  # one chunk-aligned block per minibatch
        spec = StreamSpec(
            layers=self.stream_layers, split="all", held_out_fraction=0.0, batch_tokens=block,
            buffer_tokens=block, read_ahead=1, shuffle=shuffle, seed=seed, epochs=epochs, with_final=True,
            workers=self.workers,
        )  # fmt: skip
        for mb in self._stream_cls(store, spec):
            rows = self._rows(mb)
            if rows is not None:
                yield rows  # outside no_grad: grad mode is thread state, a consumer may train on the rows

    @torch.no_grad()
    def _rows(self, mb: Any) -> Rows | None:
        """The prediction positions of one minibatch (a whole block), φ applied per view."""
        seq = mb.seq.numpy()
        keep = np.nonzero(mb.pos.numpy() == self.lengths[seq] - 1)[0]
        if keep.size == 0:
            return None
        sel = torch.from_numpy(keep)
        h = torch.cat([mb.resid[:, sel], mb.final[sel].unsqueeze(0)])  # (L, b, d)
        feats = {"raw": self.phi(h)}
        if self.lens is not None:
            mapped = [self.lens.translate(h[i], b) for i, b in enumerate(self.layers) if b in self.lens_layers]
            feats["lens"] = self.phi(torch.stack(mapped)) if mapped else h[:0]
        logp = self.head.log_probs(h[-1])
        tgt = torch.from_numpy(self.design.target[seq[keep]])
        final_logprob = logp.gather(1, tgt[:, None])[:, 0].numpy()
        return Rows(feats, seq[keep], final_logprob, (logp.argmax(-1) == tgt).numpy())


@dataclass
class ClassStats:
    """float64 sums per view: (L, C, 2, d) by concept and label; counts (C, 2); train moments for the probe."""

    layers: list[int]
    lens_layers: list[int]
    sums: dict[str, np.ndarray]
    counts: np.ndarray
    train_sum: np.ndarray  # (L, C, d) raw view, training prompts only
    train_sq: np.ndarray
    train_count: np.ndarray  # (C,)
    target_logprob_sum: np.ndarray  # (C, 2)
    target_top1: np.ndarray  # (C, 2)

    def means(self, view: str = "raw") -> np.ndarray:
        return self.sums[view] / np.maximum(self.counts, 1)[None, :, :, None]

    def difference(self, view: str = "raw") -> np.ndarray:
        """δ per layer and concept, (L, C, d): mean(label 1) − mean(label 0)."""
        m = self.means(view)
        return m[:, :, 1] - m[:, :, 0]


def class_statistics(stream: PredictionStream) -> ClassStats:
    """One streamed pass: class sums of every view, training moments, the model's own target log-probs."""
    d_des = stream.design
    n_c, n_l = d_des.n_concepts, len(stream.layers)
    d = stream.head.unembed.shape[1]
    sums = {"raw": np.zeros((n_l, n_c, 2, d))}
    if stream.lens is not None:
        sums["lens"] = np.zeros((len(stream.lens_layers), n_c, 2, d))
    counts = np.zeros((n_c, 2))
    tsum, tsq, tcount = np.zeros((n_l, n_c, d)), np.zeros((n_l, n_c, d)), np.zeros(n_c)
    lp_sum, top1 = np.zeros((n_c, 2)), np.zeros((n_c, 2))
    seen = np.zeros(len(d_des.concept), dtype=bool)
    for rows in stream:
        c, y = d_des.concept[rows.seq], d_des.label[rows.seq]
        seen[rows.seq] = True
        key = c * 2 + y
        for view, feats in rows.feats.items():
            f = feats.double().numpy()
            flat = sums[view].reshape(f.shape[0], n_c * 2, d)
            for k in np.unique(key):
                flat[:, k] += f[:, key == k].sum(1)
        np.add.at(counts, (c, y), 1)
        train = ~d_des.held_out[rows.seq]
        f = rows.feats["raw"].double().numpy()[:, train]
        for k in np.unique(c[train]):
            part = f[:, c[train] == k]
            tsum[:, k] += part.sum(1)
            tsq[:, k] += (part**2).sum(1)
            tcount[k] += part.shape[1]
        np.add.at(lp_sum, (c, y), rows.final_logprob)
        np.add.at(top1, (c, y), rows.final_top1)
    if not seen.all():
        raise StoreError(f"{int((~seen).sum())} sequences gave no prediction position (store not fully readable)")
    return ClassStats(stream.layers, stream.lens_layers, sums, counts, tsum, tsq, tcount, lp_sum, top1)


# ---- the probe -----------------------------------------------------------------------------------


@dataclass
class ProbeBatch:
    """Training or evaluation rows of one concept: features (L, b, d) of the raw view, labels (b,)."""

    concept: int
    feats: torch.Tensor
    labels: torch.Tensor
    held_out: torch.Tensor  # bool (b,)


@dataclass
class ProbeSettings:
    epochs: int = 30
    lr: float = 0.01
    l2: float = 1e-3  # on the standardized weights
    batch_rows: int = 64
    seed: int = 0


@dataclass
class Probes:
    """One logistic probe per layer and concept, on standardized features: logit = ((f − m)/s)·w + b."""

    mean: torch.Tensor  # (C, L, d)
    scale: torch.Tensor  # (C, L, d)
    weight: torch.Tensor  # (C, L, d)
    bias: torch.Tensor  # (C, L)

    def logits(self, c: int, feats: torch.Tensor) -> torch.Tensor:
        """(L, b) logits of concept c's probes for features (L, b, d)."""
        z = (feats - self.mean[c][:, None]) / self.scale[c][:, None]
        return (z * self.weight[c][:, None]).sum(-1) + self.bias[c][:, None]

    def directions(self) -> np.ndarray:
        """(C, L, d) float64: each probe's weight on the unstandardized features (w / s)."""
        return (self.weight / self.scale).double().numpy()


def fit_probes(
    batches: Callable[[int], Iterator[ProbeBatch]],
    mean: np.ndarray,
    scale: np.ndarray,
    settings: ProbeSettings | None = None,
) -> Probes:
    """Fit the probes out of core: `batches(epoch)` yields each epoch's rows; held-out rows are ignored.

    Each concept has its own Adam optimizer, stepped only on its own rows, minimising per layer the
    mean binary cross-entropy plus l2/2 |w|² on standardized features.
    """
    s = settings or ProbeSettings()
    n_c, n_l, d = mean.shape
    torch.manual_seed(s.seed)
    probes = Probes(
        torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(scale, dtype=torch.float32),
        torch.zeros(n_c, n_l, d), torch.zeros(n_c, n_l),
    )  # fmt: skip
    params = [(torch.zeros(n_l, d, requires_grad=True), torch.zeros(n_l, requires_grad=True)) for _ in range(n_c)]
    opts = [torch.optim.Adam(p, lr=s.lr) for p in params]
    for epoch in range(s.epochs):
        for batch in batches(epoch):
            train = ~batch.held_out
            if not train.any():
                continue
            feats, labels = batch.feats[:, train], batch.labels[train].float()
            w, b = params[batch.concept]
            m, sc = probes.mean[batch.concept][:, None], probes.scale[batch.concept][:, None]
            for start in range(0, feats.shape[1], s.batch_rows):
                z = (feats[:, start : start + s.batch_rows] - m) / sc
                y = labels[start : start + s.batch_rows]
                logit = (z * w[:, None]).sum(-1) + b[:, None]
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    logit, y.expand_as(logit), reduction="none"
                ).mean(1).sum() + 0.5 * s.l2 * (w**2).sum()
                opts[batch.concept].zero_grad()
                loss.backward()
                opts[batch.concept].step()
    with torch.no_grad():
        for c, (w, b) in enumerate(params):
            probes.weight[c] = w.detach()
            probes.bias[c] = b.detach()
    return probes


def probe_accuracy(probes: Probes, batches: Iterator[ProbeBatch], n_c: int, n_l: int) -> dict[str, np.ndarray]:
    """Accuracy (C, L) on the held-out and the training rows."""
    right = {"held_out": np.zeros((n_c, n_l)), "train": np.zeros((n_c, n_l))}
    count = {"held_out": np.zeros(n_c), "train": np.zeros(n_c)}
    with torch.no_grad():
        for batch in batches:
            ok = ((probes.logits(batch.concept, batch.feats) > 0).long() == batch.labels[None]).numpy()
            for name, mask in (("held_out", batch.held_out.numpy()), ("train", ~batch.held_out.numpy())):
                right[name][batch.concept] += ok[:, mask].sum(1)
                count[name][batch.concept] += mask.sum()
    return {k: right[k] / np.maximum(count[k], 1)[:, None] for k in right}


def probe_batches(stream: PredictionStream, rows: Iterator[Rows]) -> Iterator[ProbeBatch]:
    """The raw-view rows of a stream, split by concept."""
    des = stream.design
    for r in rows:
        c = des.concept[r.seq]
        for k in np.unique(c):
            mine = np.nonzero(c == k)[0]
            sel = torch.from_numpy(mine)
            yield ProbeBatch(
                int(k), r.feats["raw"][:, sel], torch.from_numpy(des.label[r.seq[mine]]),
                torch.from_numpy(des.held_out[r.seq[mine]]),
            )  # fmt: skip


# ---- the analysis --------------------------------------------------------------------------------


@dataclass
class ResidualResult:
    """Per concept and layer: difference-of-means and probe alignment with the unembedding direction."""

    store: str
    model: dict[str, Any]
    lens: dict[str, Any] | None
    layers: list[int]
    lens_layers: list[int]
    concepts: list[dict[str, Any]]  # name, prompts, pairs, held-out pairs, target log-prob, ...
    table: dict[str, dict[int, dict[str, float]]]  # concept -> layer -> metric -> value
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["table"] = {c: {str(k): v for k, v in per.items()} for c, per in self.table.items()}
        return out

    def markdown(self) -> str:
        lines = [
            "# Embedding vs unembedding alignment, layer by layer",
            "",
            f"Store {self.store} (model {self.model.get('id')!r}); lens: "
            + (f"{self.lens.get('kind')} ({self.lens.get('path')})" if self.lens else "none")
            + f"; probe: {self.settings.get('probe')}; held-out fraction of pairs {self.settings.get('held_out')}; "
            f"{self.seconds:.1f} s.",
            "",
            "cos(δ, γ̄): δ the difference of class means of φ(h) at the prediction position, γ̄ the concept's "
            "unembedding direction; causal: cos(Cov^½ δ, Cov^-½ γ̄). probe: held-out accuracy and the cosine of "
            "its weight with γ̄ (causal: cos(Cov^-½ w, Cov^-½ γ̄)). lens: δ of φ(lens(h)).",
            "",
            "| concept | prompts | pairs (held out) | target log-prob at the output (label 0 / 1) "
            "| target is top-1 (label 0 / 1) |",
            "|---|---:|---:|---:|---:|",
        ]
        for c in self.concepts:
            lines.append(
                f"| {c['name']} | {c['prompts']} | {c['pairs']} ({c['held_out_pairs']}) "
                f"| {c['target_logprob'][0]:.2f} / {c['target_logprob'][1]:.2f} "
                f"| {c['target_top1'][0]:.2f} / {c['target_top1'][1]:.2f} |"
            )
        cols = ["dom_cos_euclidean", "dom_cos_causal", "lens_cos_euclidean", "lens_cos_causal",
                "probe_acc_held_out", "probe_cos_euclidean", "probe_cos_causal"]  # fmt: skip
        heads = ["δ·γ̄ eucl", "δ·γ̄ causal", "lens eucl", "lens causal", "probe acc", "probe eucl", "probe causal"]
        for name, per in self.table.items():
            lines += ["", f"## {name}", "", "| layer | " + " | ".join(heads) + " |", "|---:|" + "---:|" * len(cols)]
            for layer in self.layers:
                row = per[layer]
                cells = ["" if math.isnan(row[k]) else f"{row[k]:.3f}" for k in cols]
                lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def analyze_residual(
    store: Any,
    rows: list[PromptRow],
    concepts: list[ConceptPairs],
    *,
    lens: Any = None,
    lens_path: str | None = None,
    held_out_fraction: float = 0.25,
    probe: ProbeSettings | None = None,
    seed: int = 0,
    workers: int = 2,
) -> ResidualResult:
    """Item 2: per layer and concept, δ and probe alignment with γ̄ (see the module docstring)."""
    t0 = time.perf_counter()
    gamma = unembedding(store)
    check_prompts(store, rows)
    des = design(rows, concepts, held_out_fraction, seed)
    stream = PredictionStream(store, des, lens, workers)
    stats = class_statistics(stream)
    probe = probe or ProbeSettings(seed=seed)
    n_c, n_l = des.n_concepts, len(stream.layers)
    mean = stats.train_sum / np.maximum(stats.train_count, 1)[None, :, None]
    var = stats.train_sq / np.maximum(stats.train_count, 1)[None, :, None] - mean**2
    scale = np.sqrt(np.maximum(var, 0.0))
    scale = np.where(scale > 1e-6 * max(1e-30, float(scale.max())), scale, 1.0)  # constant features stay put
    probes = fit_probes(
        lambda epoch: probe_batches(stream, stream.epochs(1, shuffle=True, seed=probe.seed * 1000 + epoch)),
        mean.transpose(1, 0, 2), scale.transpose(1, 0, 2), probe,
    )  # fmt: skip
    acc = probe_accuracy(probes, probe_batches(stream, iter(stream)), n_c, n_l)

    ip = CausalInnerProduct(gamma)
    by_name = {c.name: c for c in concepts}
    directions = np.stack([concept_direction(gamma, by_name[n]) for n in des.names])  # (C, d)
    g_white = ip.whiten(directions)
    delta = stats.difference("raw")  # (L, C, d)
    wdir = probes.directions()  # (C, L, d)
    lens_delta = stats.difference("lens") if lens is not None else None
    table: dict[str, dict[int, dict[str, float]]] = {}
    for c, name in enumerate(des.names):
        per: dict[int, dict[str, float]] = {}
        for li, layer in enumerate(stream.layers):
            row = {
                "dom_cos_euclidean": float(cosine(delta[li, c], directions[c])),
                "dom_cos_causal": float(cosine(ip.embed(delta[li, c]), g_white[c])),
                "dom_norm": float(np.linalg.norm(delta[li, c])),
                "lens_cos_euclidean": math.nan,
                "lens_cos_causal": math.nan,
                "probe_acc_held_out": float(acc["held_out"][c, li]),
                "probe_acc_train": float(acc["train"][c, li]),
                "probe_cos_euclidean": float(cosine(wdir[c, li], directions[c])),
                "probe_cos_causal": float(cosine(ip.whiten(wdir[c, li]), g_white[c])),
            }
            if lens_delta is not None and layer in stream.lens_layers:
                k = stream.lens_layers.index(layer)
                row["lens_cos_euclidean"] = float(cosine(lens_delta[k, c], directions[c]))
                row["lens_cos_causal"] = float(cosine(ip.embed(lens_delta[k, c]), g_white[c]))
            per[layer] = row
        table[name] = per
    summary = []
    for c, name in enumerate(des.names):
        mine = des.concept == c
        summary.append({
            "name": name,
            "prompts": int(mine.sum()),
            "pairs": int(np.unique(des.pair[mine]).size),
            "held_out_pairs": int(np.unique(des.pair[mine & des.held_out]).size),
            "held_out_prompts": int((mine & des.held_out).sum()),
            "target_logprob": (stats.target_logprob_sum[c] / np.maximum(stats.counts[c], 1)).tolist(),
            "target_top1": (stats.target_top1[c] / np.maximum(stats.counts[c], 1)).tolist(),
            "unembedding_pairs": by_name[name].n_usable,
        })  # fmt: skip
    lens_info = None
    if lens is not None:
        lens_info = {"kind": lens.config.kind, "path": lens_path, "layers": lens.layers}
    return ResidualResult(
        store=str(store.url),
        model={k: store.meta.model.get(k) for k in ("id", "weights_hash")},
        lens=lens_info,
        layers=stream.layers,
        lens_layers=stream.lens_layers,
        concepts=summary,
        table=table,
        settings={"held_out": held_out_fraction, "probe": asdict(probe), "causal_ridge": ip.ridge},
        seconds=time.perf_counter() - t0,
    )


def plot_residual(result: ResidualResult, path: str | Path) -> Path:
    """Per concept: cosine with γ̄ vs layer (δ raw / lens, probe; Euclidean dashed, causal solid) and probe accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.table)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False, constrained_layout=True)
    series = [
        ("dom", "δ raw", "tab:blue"),
        ("lens", "δ lens", "tab:orange"),
        ("probe", "probe w", "tab:green"),
    ]
    for ax, name in zip(axes.flat, names, strict=False):
        per = result.table[name]
        layers = result.layers
        for key, label, color in series:
            for ip, style in (("causal", "-"), ("euclidean", "--")):
                ys = [per[layer][f"{key}_cos_{ip}"] for layer in layers]
                if all(math.isnan(v) for v in ys):
                    continue
                ax.plot(layers, ys, style, color=color, marker="." if key == "lens" else None,
                        label=f"{label} ({ip})")  # fmt: skip
        ax.plot(layers, [per[layer]["probe_acc_held_out"] for layer in layers], ":", color="k", label="probe acc")
        ax.set_ylim(-0.3, 1.02)
        ax.axhline(0, color="gray", lw=0.5)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("layer boundary")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, loc="lower right")
    axes.flat[0].set_ylabel("cosine with γ̄ / accuracy")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_residual(result: ResidualResult, out: str | Path) -> list[Path]:
    """residual.json, residual.md and residual.png in directory `out`."""
    where = Path(out)
    where.mkdir(parents=True, exist_ok=True)
    (where / "residual.json").write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    (where / "residual.md").write_text(result.markdown() + "\n")
    return [where / "residual.json", where / "residual.md", plot_residual(result, where / "residual.png")]
