"""Prompt-injection detection from lens trajectories (Belrose et al. 2023, section 5), read from a store.

Input: a padded store built from a prompts file (`lenscache.analysis.injection`), one prompt per
sequence, and the prompts file itself (labels and groups). No model runs here: the features come
from the store.

Features, at each prompt's last position (``lengths - 1``, the answer cue's last token, where the
model predicts the first token of its answer): for each lens (the logit lens, and each fitted lens
given) and each boundary below the last, KL(final ‖ lens) — the tuned-lens paper's divergence, as in
`lenscache.analysis.evaluate` — and the entropy of the lens's distribution, in nats; and the entropy
of the model's own output distribution. A lens's trajectory set is its 2 × L columns plus the final
entropy (the trajectory's endpoint), so it contains the final-entropy baseline. A second baseline,
"prompt length", is each prompt's token count (the store's lengths, BOS included): a feature set that
does not beat it may be detecting length rather than injection (the benchmark's benign control is
meant to bring it to about 0.5).

The store is read block by block, each block a whole number of its chunks, one layer at a time:
memory is one block of one layer, whatever the store's size.

Evaluation: groups (a clean prompt and its injected twins) are split at random (seeded) into
training and held-out groups, so twins never fall on both sides. Detectors (scikit-learn's
IsolationForest and LocalOutlierFactor with novelty=True) are fitted on the training groups' clean
prompts only, after standardising each feature on those prompts; they score the held-out clean and
injected prompts (higher = more anomalous). AUROC (`sklearn.metrics.roc_auc_score`, injected as the
positive class) comes with a percentile bootstrap 95% interval that resamples the held-out clean and
injected scores separately, with replacement. The single-feature baselines are also scored raw (no
detector; higher entropy, or a longer prompt, = more anomalous): an AUROC below 0.5 there means
injected prompts have lower entropy, or are shorter.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lenscache.device import resolve_device
from lenscache.errors import DataError, LensError
from lenscache.fit.lens import Lens
from lenscache.fit.losses import FinalDist, entropy, log_probs
from lenscache.fit.stream import chunk_aligned_blocks
from lenscache.publish import publish_dir
from lenscache.reader import Store

from .prompt_store import check_prompt_store

DETECTORS = ("raw", "isolation_forest", "lof")
DETECTOR_TITLES = {"raw": "raw score", "isolation_forest": "IsolationForest", "lof": "LocalOutlierFactor"}
FINAL_SET = "final entropy"
LENGTH_SET = "prompt length"
BASELINES = (FINAL_SET, LENGTH_SET)  # one feature each: scored raw as well as by the detectors
FILES = ("anomaly.json", "anomaly.md", "anomaly.png", "features.npz")


# ---- checking the store against the prompts -----------------------------------------------------
def check_prompts_match(store: Store, rows: list[dict[str, Any]]) -> None:
    """Refuse a store that was not built (padded) from exactly these prompts, in this order."""
    check_prompt_store(store, [row["text"] for row in rows])


# ---- features ---------------------------------------------------------------------------------------
@dataclass
class Features:
    """One row per prompt (in store order); `sets` names column groups."""

    names: list[str]
    values: np.ndarray  # (n_prompts, n_features) float64
    sets: dict[str, list[int]]
    layers: list[int]
    lenses: list[str]


def lens_layers(store: Store, lenses: dict[str, Lens]) -> list[int]:
    """The store's boundaries below the last; every lens must have all of them."""
    layers = [b for b in store.layers if b != store.meta.n_layers]
    if not layers:
        raise DataError(f"store {store.url} holds only the last boundary: there is no trajectory to read")
    for name, lens in lenses.items():
        lens.check_compatible(store)
        missing = [b for b in layers if b not in lens.layers]
        if missing:
            raise LensError(f"lens {name!r} has no translator for boundaries {missing} of store {store.url}")
    return layers


def prompt_features(
    store: Store, lenses: dict[str, Lens] | None = None, device: str = "cpu", progress: bool = False
) -> Features:
    """Per-layer KL(final ‖ lens) and entropy at each sequence's last real position, for the logit lens
    and each lens in `lenses`, plus the final entropy (see the module docstring)."""
    fitted = dict(lenses or {})
    if "logit" in fitted:
        raise LensError("the name 'logit' is the logit lens's; name the fitted lens otherwise")
    layers = lens_layers(store, fitted)
    all_lenses = {"logit": Lens.identity(store, layers), **fitted}
    dev = resolve_device(device)
    unembed = store.unembed.to(dev)
    all_lenses = {name: lens.to(dev) for name, lens in all_lenses.items()}
    n = store.n_sequences
    lengths = store.lengths()
    final_h = np.zeros(n)
    kl = {name: np.zeros((n, len(layers))) for name in all_lenses}
    ent = {name: np.zeros((n, len(layers))) for name in all_lenses}
    blocks = chunk_aligned_blocks(range(n), store.meta.build.seqs_per_chunk)
    with torch.no_grad():
        for block in tqdm(blocks, desc="lenscache anomaly", unit="block", disable=not progress):
            rows = np.arange(len(block))
            last = lengths[block.start : block.stop] - 1
            sel = slice(block.start, block.stop)
            final = FinalDist.from_logp(unembed.log_probs(torch.from_numpy(store.final_resid(block)[rows, last]).to(dev)))
            final_h[sel] = (-final.neg_entropy).double().cpu().numpy()
            for k, layer in enumerate(layers):
                h = torch.from_numpy(store.resid(layer, block)[rows, last]).to(dev)
                for name, lens in all_lenses.items():
                    logp = log_probs(unembed(lens.translate(h, layer)))
                    kl[name][sel, k] = final.kl(logp).double().cpu().numpy()
                    ent[name][sel, k] = entropy(logp).double().cpu().numpy()
    names, columns = ["final_entropy", "prompt_length"], [final_h[:, None], lengths[:, None].astype(np.float64)]
    sets: dict[str, list[int]] = {FINAL_SET: [0], LENGTH_SET: [1]}
    for name in all_lenses:
        start = len(names)
        names += [f"{name}_kl_{b}" for b in layers] + [f"{name}_entropy_{b}" for b in layers]
        columns += [kl[name], ent[name]]
        sets[_set_name(name)] = [0, *range(start, len(names))]
    for name in fitted:
        sets[f"logit lens + {name}"] = sorted(set(sets["logit lens"]) | set(sets[_set_name(name)]))
    return Features(names, np.concatenate(columns, axis=1), sets, layers, list(all_lenses))


def _set_name(lens: str) -> str:
    return "logit lens" if lens == "logit" else lens


# ---- split, detectors, AUROC -------------------------------------------------------------------------
@dataclass
class Split:
    train: np.ndarray  # clean prompts of the training groups
    clean: np.ndarray  # held-out clean
    injected: np.ndarray  # held-out injected


def group_split(rows: list[dict[str, Any]], train_fraction: float = 0.5, seed: int = 0) -> Split:
    """Groups shuffled (seeded); the first `train_fraction` of them train, the rest are held out.

    Injected prompts of training groups are used nowhere: the detectors see clean prompts only,
    and a held-out twin of a training prompt would leak."""
    if not 0.0 < train_fraction < 1.0:
        raise DataError(f"train fraction (--train-fraction) must be in (0, 1), got {train_fraction}")
    groups = np.asarray([r["group"] for r in rows])
    labels = np.asarray([r["label"] for r in rows])
    unique = np.unique(groups)
    order = np.random.default_rng(seed).permutation(unique.size)
    n_train = int(round(train_fraction * unique.size))
    train_groups = unique[order[:n_train]]
    in_train = np.isin(groups, train_groups)
    split = Split(
        train=np.nonzero(in_train & (labels == "clean"))[0],
        clean=np.nonzero(~in_train & (labels == "clean"))[0],
        injected=np.nonzero(~in_train & (labels == "injected"))[0],
    )
    for what, idx, need in (("training clean", split.train, 3), ("held-out clean", split.clean, 2),
                            ("held-out injected", split.injected, 2)):  # fmt: skip
        if idx.size < need:
            raise DataError(
                f"only {idx.size} {what} prompts after the group split ({unique.size} groups, train fraction "
                f"{train_fraction}); write more prompts"
            )
    return split


def detector_scores(detector: str, train: np.ndarray, test: np.ndarray, seed: int = 0) -> np.ndarray:
    """Anomaly scores of `test` (higher = more anomalous) from a detector fitted on `train` (clean only).

    Features are standardised with the training prompts' mean and spread first; "raw" returns the
    first column of `test` unchanged (a single-feature baseline)."""
    from sklearn.ensemble import IsolationForest
    from sklearn.neighbors import LocalOutlierFactor
    from sklearn.preprocessing import StandardScaler

    if detector == "raw":
        return np.asarray(test[:, 0], dtype=np.float64)
    scaler = StandardScaler().fit(train)
    x_train, x_test = scaler.transform(train), scaler.transform(test)
    if detector == "isolation_forest":
        model = IsolationForest(n_estimators=200, random_state=seed).fit(x_train)
    elif detector == "lof":
        model = LocalOutlierFactor(n_neighbors=min(20, len(train) - 1), novelty=True).fit(x_train)
    else:
        raise DataError(f"unknown detector {detector!r}; choose one of {', '.join(DETECTORS)}")
    return -model.score_samples(x_test)  # sklearn: lower score_samples = more abnormal


def pair_matrix(clean: np.ndarray, injected: np.ndarray) -> np.ndarray:
    """(n_clean, n_injected): 1 where the injected prompt scores higher, 0.5 for a tie; its mean is the AUROC."""
    c, i = np.asarray(clean, np.float64)[:, None], np.asarray(injected, np.float64)[None, :]
    return (i > c) + 0.5 * (i == c)


def resampled_auroc(pairs: np.ndarray, counts_clean: np.ndarray, counts_injected: np.ndarray) -> np.ndarray:
    """AUROC of resamples given as (B, n) counts of each prompt: Σ counts_c · pairs · counts_i / (n_c n_i)."""
    n_c, n_i = counts_clean.sum(1), counts_injected.sum(1)
    return ((counts_clean @ pairs) * counts_injected).sum(1) / (n_c * n_i)


def auroc_with_ci(
    clean: np.ndarray, injected: np.ndarray, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(AUROC, low, high): sklearn's AUROC and the percentile bootstrap 95% interval (clean and injected
    resampled separately, `n_boot` times, seeded)."""
    from sklearn.metrics import roc_auc_score

    if n_boot < 1:
        raise DataError(f"bootstrap resamples (--bootstrap) must be at least 1, got {n_boot}")
    y = np.r_[np.zeros(len(clean)), np.ones(len(injected))]
    auc = float(roc_auc_score(y, np.r_[clean, injected]))
    rng = np.random.default_rng(seed)
    pairs = pair_matrix(clean, injected)
    counts_c = rng.multinomial(len(clean), np.full(len(clean), 1 / len(clean)), size=n_boot)
    counts_i = rng.multinomial(len(injected), np.full(len(injected), 1 / len(injected)), size=n_boot)
    low, high = np.percentile(resampled_auroc(pairs, counts_c, counts_i), [2.5, 97.5])
    return auc, float(low), float(high)


# ---- the whole analysis -------------------------------------------------------------------------------
@dataclass
class Row:
    feature_set: str
    detector: str
    n_features: int
    auroc: float
    ci_low: float
    ci_high: float


@dataclass
class AnomalyResult:
    store: str
    prompts: str
    n_train_clean: int
    n_heldout_clean: int
    n_heldout_injected: int
    seed: int
    n_boot: int
    train_fraction: float
    layers: list[int]
    lenses: list[str]
    rows: list[Row]
    seconds: float = 0.0
    mean_length: dict[str, float] = field(default_factory=dict)  # held-out clean/injected mean token count
    scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)  # "set|detector" -> clean/injected

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("rows", "scores")}
        out["seconds"] = round(self.seconds, 2)
        out["ci"] = f"percentile bootstrap 95%, {self.n_boot} resamples, clean and injected resampled separately"
        out["features"] = "at lengths-1: per-layer KL(final || lens) and entropy (nats) per lens, plus final entropy; prompt length in tokens"
        out["rows"] = [{k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(r).items()} for r in self.rows]
        return out


def detect(
    store: Store,
    rows: list[dict[str, Any]],
    features: Features,
    *,
    seed: int = 0,
    train_fraction: float = 0.5,
    n_boot: int = 2000,
    prompts_path: str = "",
) -> AnomalyResult:
    """Fit each detector on each feature set's training clean prompts; AUROC with CI on the held-out ones."""
    started = time.perf_counter()
    if len(rows) != features.values.shape[0]:
        raise DataError(f"{len(rows)} prompts but {features.values.shape[0]} feature rows")
    split = group_split(rows, train_fraction, seed)
    x = features.values
    results: list[Row] = []
    scores: dict[str, dict[str, np.ndarray]] = {}
    for set_name, cols in features.sets.items():
        detectors = DETECTORS if set_name in BASELINES else DETECTORS[1:]
        for det in detectors:
            train = x[np.ix_(split.train, cols)]
            s_clean = detector_scores(det, train, x[np.ix_(split.clean, cols)], seed)
            s_inj = detector_scores(det, train, x[np.ix_(split.injected, cols)], seed)
            auc, lo, hi = auroc_with_ci(s_clean, s_inj, n_boot, seed)
            results.append(Row(set_name, det, len(cols), auc, lo, hi))
            scores[f"{set_name}|{det}"] = {"clean": s_clean, "injected": s_inj}
    mean_length = {}
    if "prompt_length" in features.names:
        col = features.names.index("prompt_length")
        mean_length = {"clean": float(x[split.clean, col].mean()), "injected": float(x[split.injected, col].mean())}
    return AnomalyResult(
        store=store.url, prompts=prompts_path, n_train_clean=int(split.train.size),
        n_heldout_clean=int(split.clean.size), n_heldout_injected=int(split.injected.size), seed=seed,
        n_boot=n_boot, train_fraction=train_fraction, layers=features.layers, lenses=features.lenses,
        rows=results, seconds=time.perf_counter() - started, scores=scores, mean_length=mean_length,
    )  # fmt: skip


# ---- outputs ------------------------------------------------------------------------------------------
def markdown(result: AnomalyResult) -> str:
    """The AUROC table: a row per feature set, a column per detector, each 'AUROC [low, high]'."""
    sets = list(dict.fromkeys(r.feature_set for r in result.rows))
    cell = {(r.feature_set, r.detector): f"{r.auroc:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]" for r in result.rows}
    n_feat = {r.feature_set: r.n_features for r in result.rows}
    lines = [
        f"Prompt-injection detection: {result.n_train_clean} clean training prompts; held out "
        f"{result.n_heldout_clean} clean vs {result.n_heldout_injected} injected. AUROC with percentile "
        f"bootstrap 95% interval ({result.n_boot} resamples, seed {result.seed}); boundaries "
        f"{result.layers[0]}–{result.layers[-1]}.",
        "",
        "| feature set | features | " + " | ".join(DETECTOR_TITLES[d] for d in DETECTORS) + " |",
        "|---|---:|" + "---|" * len(DETECTORS),
    ]
    for s in sets:
        lines.append(f"| {s} | {n_feat[s]} | " + " | ".join(cell.get((s, d), "—") for d in DETECTORS) + " |")
    if result.mean_length:
        lines += ["", f"Mean prompt length (tokens, BOS included), held out: clean {result.mean_length['clean']:.2f}, "
                  f"injected {result.mean_length['injected']:.2f}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _plot(result: AnomalyResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, (bars, roc) = plt.subplots(1, 2, figsize=(12, 4.5))
    sets = list(dict.fromkeys(r.feature_set for r in result.rows))
    width = 0.8 / len(DETECTORS)
    for k, det in enumerate(DETECTORS):
        xs, ys, errs = [], [], [[], []]
        for j, s in enumerate(sets):
            row = next((r for r in result.rows if r.feature_set == s and r.detector == det), None)
            if row is None:
                continue
            xs.append(j + (k - (len(DETECTORS) - 1) / 2) * width)
            ys.append(row.auroc)
            errs[0].append(row.auroc - row.ci_low)
            errs[1].append(row.ci_high - row.auroc)
        bars.bar(xs, ys, width, yerr=errs, capsize=3, label=DETECTOR_TITLES[det])
    bars.axhline(0.5, color="grey", lw=0.8, ls="--")
    bars.set_xticks(range(len(sets)), sets, rotation=15, ha="right")
    bars.set_ylim(0, 1)
    bars.set_ylabel("AUROC (95% bootstrap CI)")
    bars.legend(fontsize=8)
    bars.set_title("held-out clean vs injected")
    for s in sets:
        det = "isolation_forest"
        sc = result.scores[f"{s}|{det}"]
        y = np.r_[np.zeros(len(sc["clean"])), np.ones(len(sc["injected"]))]
        fpr, tpr, _ = roc_curve(y, np.r_[sc["clean"], sc["injected"]])
        roc.plot(fpr, tpr, label=s)
    roc.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    roc.set_xlabel("false positive rate")
    roc.set_ylabel("true positive rate")
    roc.set_title("ROC, IsolationForest")
    roc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def check_out(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an --out that exists (unless `overwrite`) or whose parent does not, before any work."""
    where = Path(out)
    if where.exists() and not overwrite:
        raise DataError(f"--out {where} already exists; pass --overwrite to replace it (nothing was written)")
    if where.exists() and not where.is_dir():
        raise DataError(f"--out {where} exists and is not a directory; nothing was written")
    if not where.parent.is_dir():
        raise DataError(f"--out {where}: the directory {where.parent} does not exist; nothing was written")
    return where


def write_outputs(
    result: AnomalyResult, features: Features, rows: list[dict[str, Any]], out: str | os.PathLike,
    overwrite: bool = False,
) -> Path:  # fmt: skip
    """anomaly.json, anomaly.md, anomaly.png and features.npz into `out`, written in a temporary
    directory beside it and renamed into place whole (an existing `out` is replaced only with `overwrite`)."""
    where = check_out(out, overwrite)

    def write(tmp: Path) -> None:
        (tmp / "anomaly.json").write_text(json.dumps(result.to_dict(), indent=2))
        (tmp / "anomaly.md").write_text(markdown(result))
        _plot(result, tmp / "anomaly.png")
        np.savez(
            tmp / "features.npz", values=features.values, names=np.asarray(features.names),
            labels=np.asarray([r["label"] for r in rows]), groups=np.asarray([r["group"] for r in rows]),
        )  # fmt: skip

    publish_dir(where, write)
    return where
