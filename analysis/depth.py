"""Prediction depth, streamed over a whole store: per token and lens, the first layer boundary from
which the lens's top-1 equals the model's final top-1 and stays equal up to the last layer.

Definition. With the boundaries b_1 < … < b_K below the last one (those every lens has, as
`trajectory.choose_layers` picks them) and the last boundary n_layers (the model's output, where
every lens equals the model), depth = the smallest b in {b_1, …, b_K, n_layers} such that the top-1
agrees at every boundary from b on. A token whose prediction never settles below the output
(the last stored boundary disagrees) has depth n_layers: "settled only at the output". Depth is
measured on the stored boundaries only: a store of boundaries 6,14,22,30 can only say 6, 14, 22 or 30.

Out of core: the tokens come from `ResidualStream` (the one reader) in order, a minibatch of
`batch_tokens` at a time, and each minibatch's rows go straight to a row group of the Parquet file
(`pyarrow.parquet.ParquetWriter`). What stays in memory per token is four small numbers (depth,
final loss, token and prediction ids: 14 bytes per lens) for the rank correlations; token
frequencies come from a first streamed pass over the store's token ids.

Outputs: ``depth.parquet`` (long format, a row per (lens, token): lens, seq, pos, token, next_token,
final_top1, final_loss, depth, kl_<layer>…), ``depth.json`` (histogram, Spearman ρ of depth against
the final loss and against token frequency) and ``depth.png`` (the histogram, and the mean final
loss per depth). Each is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lenscache.device import resolve_device
from lenscache.fit.lens import Lens
from lenscache.fit.losses import FinalDist, layer_groups, log_probs
from lenscache.fit.stream import IGNORE_INDEX, ResidualStream, StreamSpec, split_sequences
from lenscache.reader import Store

from .trajectory import choose_layers, save_png, temp_name

PARQUET, SUMMARY, PLOT = "depth.parquet", "depth.json", "depth.png"
TOKEN_BLOCK = 256  # sequences of token ids per read in the frequency pass


# ---- the definition ---------------------------------------------------------------------------------
def depth_from_agreement(agree: np.ndarray, boundaries: list[int]) -> np.ndarray:
    """(K, B) bool agreement with the final top-1 at `boundaries[:-1]` -> (B,) depth in `boundaries`.

    `boundaries[-1]` is the output (always agreeing): the depth of a token that never settles.
    """
    agree = np.asarray(agree, dtype=bool)
    k = agree.shape[0]
    if len(boundaries) != k + 1:
        raise ValueError(f"{k} agreement rows need {k + 1} boundaries, got {len(boundaries)}")
    # trailing run of agreement, counted from the last boundary below the output downwards
    suffix = np.flip(np.cumprod(np.flip(agree, 0), 0), 0).astype(bool) if k else agree
    settled_from = k - suffix.sum(0)  # index into boundaries of the first boundary of that run
    return np.asarray(boundaries, dtype=np.int16)[settled_from]


# ---- Spearman without scipy -------------------------------------------------------------------------
def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of their ranks (what Spearman's ρ needs with many ties)."""
    x = np.asarray(x)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    mean_rank = ends - (counts - 1) / 2.0
    return mean_rank[inverse.reshape(-1)]


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rank correlation (Pearson's r of average ranks); None when either side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 2:
        return None
    rx, ry = average_ranks(x[keep]), average_ranks(y[keep])
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return None if den == 0 else float((rx * ry).sum() / den)


# ---- the streamed pass ------------------------------------------------------------------------------
def token_counts(store: Store, vocab: int) -> np.ndarray:
    """How often each token id occurs in the store's committed sequences (a streamed pass)."""
    counts = np.zeros(vocab, dtype=np.int64)
    for start in range(0, store.n_sequences, TOKEN_BLOCK):
        block = store.tokens(range(start, min(start + TOKEN_BLOCK, store.n_sequences)))
        counts += np.bincount(block.reshape(-1), minlength=vocab)[:vocab]
    return counts


@dataclass
class DepthSummary:
    store: str
    split: str
    tokens: int
    layers: list[int]  # boundaries a depth can take (the last: the output)
    lenses: dict[str, dict[str, Any]]
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "split": self.split,
            "tokens": self.tokens,
            "layers": self.layers,
            "definition": "first boundary from which the lens's top-1 equals the model's final top-1 at every "
            f"boundary up to the output; {self.layers[-1]} (the output) when it never settles below it",
            "seconds": round(self.seconds, 2),
            "tokens_per_second": round(self.tokens / self.seconds, 1) if self.seconds else None,
            "notes": self.notes,
            "lenses": self.lenses,
        }


def _schema(layers: list[int]):
    import pyarrow as pa

    fields = [("lens", pa.string()), ("seq", pa.int32()), ("pos", pa.int32()), ("token", pa.int32()),
              ("next_token", pa.int32()), ("final_top1", pa.int32()), ("final_loss", pa.float32()),
              ("depth", pa.int16())]  # fmt: skip
    fields += [(f"kl_{b}", pa.float32()) for b in layers]
    return pa.schema(fields)


def _lens_summary(
    depth: np.ndarray, loss: np.ndarray, token: np.ndarray, pred: np.ndarray, counts: np.ndarray, boundaries: list[int]
) -> dict[str, Any]:
    known = np.isfinite(loss)
    hist = {str(b): int((depth == b).sum()) for b in boundaries}
    mean_loss = {str(b): (round(float(loss[known & (depth == b)].mean()), 6) if (known & (depth == b)).any() else None)
                 for b in boundaries}  # fmt: skip
    n = max(1, depth.size)
    return {
        "histogram": hist,
        "fraction": {b: round(c / n, 6) for b, c in hist.items()},
        "mean_depth": round(float(depth.mean()), 4) if depth.size else None,
        "median_depth": float(np.median(depth)) if depth.size else None,
        "settled_only_at_output": round(hist[str(boundaries[-1])] / n, 6),
        "mean_final_loss_by_depth": mean_loss,
        # frequency: Spearman is rank-based, so log frequency and frequency give the same ρ
        "spearman_depth_vs_final_loss": _round(spearman(depth[known], loss[known])),
        "spearman_depth_vs_log_token_frequency": _round(spearman(depth, np.log(counts[token]))),
        "spearman_depth_vs_log_prediction_frequency": _round(spearman(depth, np.log1p(counts[pred]))),
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def plan(
    store: Store, lenses: dict[str, Lens | None], layers: list[int] | None, split: str, max_tokens: int | None,
    batch_tokens: int,
) -> tuple[ResidualStream, list[int], list[str]]:
    """Every check of the inputs, before anything is read or written: (stream, boundaries below the last, notes)."""
    for lens in lenses.values():
        if lens is not None:
            lens.check_compatible(store)
    below, notes = choose_layers(store.layers, store.meta.n_layers, lenses, layers)
    spec = StreamSpec(layers=below, split=split, batch_tokens=batch_tokens, buffer_tokens=batch_tokens,
                      shuffle=False, max_tokens=max_tokens)  # fmt: skip
    return ResidualStream(store, spec), below, notes


def prediction_depth(
    store: Store,
    lenses: dict[str, Lens | None],
    parquet_path: str | os.PathLike,
    layers: list[int] | None = None,
    split: str = "all",
    max_tokens: int | None = None,
    batch_tokens: int = 512,
    device: str = "cpu",
    progress: bool = True,
) -> DepthSummary:
    """Stream the store, write the per-token table to `parquet_path` (renamed into place when whole)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    stream, below, notes = plan(store, lenses, layers, split, max_tokens, batch_tokens)
    n_layers = store.meta.n_layers
    boundaries = [*below, n_layers]
    vocab = store.meta.vocab_size
    counts = token_counts(store, vocab)
    lengths = _lengths(store)
    dev = resolve_device(device)
    unembed = store.unembed.to(dev)
    lenses = {name: (lens.to(dev) if lens is not None else None) for name, lens in lenses.items()}
    groups = layer_groups(len(below), batch_tokens, vocab)
    kept: dict[str, list[np.ndarray]] = {name: [] for name in lenses}
    common: dict[str, list[np.ndarray]] = {"loss": [], "token": [], "pred": []}
    out = Path(parquet_path)
    tmp = temp_name(out)
    schema = _schema(below)
    started = time.perf_counter()
    n_tokens = 0
    bar = tqdm(total=stream.n_batches(), desc="lenscache depth", unit="batch", disable=not progress)
    try:
        with pq.ParquetWriter(tmp, schema) as writer, torch.no_grad():
            for batch in stream:
                seq, pos = batch.seq.numpy(), batch.pos.numpy()
                real = pos < lengths[seq] if lengths is not None else np.ones(seq.shape, bool)
                nxt = batch.next_tokens.to(dev)
                final = FinalDist.from_logp(unembed.log_probs(batch.final.to(dev)))
                known = nxt != IGNORE_INDEX
                if lengths is not None:  # in a padded store the token after a document's end is padding
                    known &= torch.from_numpy(pos + 1 < lengths[seq]).to(dev)
                loss = -final.logp.gather(-1, nxt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                loss = torch.where(known, loss, torch.full_like(loss, float("nan"))).cpu().numpy()
                top = final.argmax.cpu().numpy()
                resid = batch.resid.to(dev)
                base = {"seq": seq, "pos": pos, "token": batch.tokens.numpy(), "final_top1": top, "final_loss": loss,
                        "next_token": np.where(known.cpu().numpy(), batch.next_tokens.numpy(), -1)}  # fmt: skip
                base = {k: v[real] for k, v in base.items()}
                tables = []
                for name, lens in lenses.items():
                    agree = np.empty((len(below), resid.shape[1]), dtype=bool)
                    kl = np.empty((len(below), resid.shape[1]), dtype=np.float32)
                    for g in groups:
                        h = resid[g] if lens is None else lens.translate_all(resid[g], below[g])
                        logp = log_probs(unembed(h))
                        agree[g] = (logp.argmax(-1) == final.argmax).cpu().numpy()
                        kl[g] = final.kl(logp).cpu().numpy()
                    depth = depth_from_agreement(agree, boundaries)[real]
                    kept[name].append(depth)
                    cols = {"lens": pa.array([name] * int(real.sum()), pa.string()), **base, "depth": depth,
                            **{f"kl_{b}": kl[i][real] for i, b in enumerate(below)}}  # fmt: skip
                    tables.append(_table(cols, schema))
                writer.write_table(pa.concat_tables(tables))  # one row group per minibatch
                common["loss"].append(base["final_loss"])
                common["token"].append(base["token"])
                common["pred"].append(base["final_top1"])
                n_tokens += int(real.sum())
                bar.update()
        os.replace(tmp, out)
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    loss, token, pred = (np.concatenate(common[k]) if common[k] else np.zeros(0) for k in ("loss", "token", "pred"))
    token, pred = token.astype(np.int64), pred.astype(np.int64)
    summaries = {name: _lens_summary(np.concatenate(kept[name]) if kept[name] else np.zeros(0, np.int16), loss,
                                     token, pred, counts, boundaries) for name in lenses}  # fmt: skip
    if split != "all":
        notes.append(f"the {split} split: sequences {split_sequences(store.n_sequences).get(split)}")
    return DepthSummary(store.url, split, n_tokens, boundaries, summaries, seconds, notes)


def _lengths(store: Store) -> np.ndarray | None:
    """Real lengths of a padded store's sequences (positions past them are padding), else None."""
    return store.lengths() if store.padded else None


def _table(cols: dict[str, Any], schema):
    import pyarrow as pa

    arrays = []
    for f in schema:
        value = cols[f.name]
        if f.name == "final_loss":
            value = pa.array(value, pa.float32(), mask=~np.isfinite(value))
        elif f.name == "next_token":
            value = pa.array(value, pa.int32(), mask=np.asarray(value) < 0)
        elif not isinstance(value, pa.Array):
            value = pa.array(np.asarray(value), f.type)  # a checked cast (int64 ids to int32)
        arrays.append(value)
    return pa.Table.from_arrays(arrays, schema=schema)


# ---- outputs ----------------------------------------------------------------------------------------
def plot_depth(summary: DepthSummary, path: str | os.PathLike) -> Path:
    """The histogram of depth per lens and the mean final loss of the tokens at each depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = summary.layers
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    names = list(summary.lenses)
    width = 0.8 / max(1, len(names))
    x = np.arange(len(layers))
    for i, name in enumerate(names):
        s = summary.lenses[name]
        frac = [s["fraction"][str(b)] for b in layers]
        rho = s["spearman_depth_vs_final_loss"]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, frac, width, label=f"{name} (ρ with loss {'–' if rho is None else f'{rho:.3f}'})")
        means = [s["mean_final_loss_by_depth"][str(b)] for b in layers]
        ax2.plot(x, [np.nan if m is None else m for m in means], marker="o", label=name)
    labels = [f"{b}\n(output)" if b == layers[-1] else str(b) for b in layers]
    for a in (ax, ax2):
        a.set_xticks(x)
        a.set_xticklabels(labels)
        a.set_xlabel("prediction depth (layer boundary)")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    ax.set_ylabel("fraction of tokens")
    ax.set_title("prediction depth")
    ax2.set_ylabel("mean final loss [nats]")
    ax2.set_title("the model's loss on tokens of each depth")
    fig.suptitle(f"{Path(summary.store).name}: {summary.tokens:,} tokens ({summary.split})")
    return save_png(fig, path)


def write_depth(store: Store, lenses: dict[str, Lens | None], out_dir: str | os.PathLike, **kw: Any) -> DepthSummary:
    """`prediction_depth` into `out_dir`: depth.parquet, depth.json and depth.png."""
    plan(store, lenses, kw.get("layers"), kw.get("split", "all"), kw.get("max_tokens"), kw.get("batch_tokens", 512))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)  # only once the inputs are known to be good
    summary = prediction_depth(store, lenses, out / PARQUET, **kw)
    tmp = temp_name(out / SUMMARY)
    tmp.write_text(json.dumps(summary.to_dict(), indent=2))
    os.replace(tmp, out / SUMMARY)
    plot_depth(summary, out / PLOT)
    return summary
