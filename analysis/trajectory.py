"""Prediction trajectories: what each lens predicts at every layer boundary and position of one text.

For one sequence (from a store, or a user's text run through the live model by `lenscache.cache.live`)
and each lens, a layers × positions grid of: the lens's top-1 token (id and text), its probability,
the entropy of the lens distribution, KL(final ‖ lens), and the cross-entropy and rank of the actual
next token. The last row is the last boundary through the model's own head: the model's output,
which every lens maps to itself (KL 0).

All quantities are in nats. `ce` is NaN and `rank` is -1 where the next token is unknown (the last
position); `rank` is 1-based (1: the next token is the lens's top-1). The lens name ``logit`` with the
value None is the logit lens (the store's head applied to the raw residual).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lenscache.errors import LensError, SelectionError
from lenscache.fit.lens import Lens
from lenscache.fit.losses import FinalDist, entropy, log_probs
from lenscache.fit.stream import IGNORE_INDEX
from lenscache.head import Unembed
from lenscache.reader import Store

STATS = ("p_top1", "entropy", "kl_to_final", "ce", "rank")  # besides top1 (id) and its text
POSITION_BLOCK = 256  # positions whose (P, vocab) log-probs are held at once: memory bound of the core


@dataclass
class Trajectory:
    """The grid of one sequence: `stats[lens][name]` and `top1[lens]` are (layers, positions) arrays."""

    layers: list[int]  # boundaries, ascending; the last is n_layers (the model's output)
    positions: np.ndarray  # (P,) positions in the sequence or text
    tokens: np.ndarray  # (P,) input token ids
    next_tokens: np.ndarray  # (P,) the actual next token, -1 where unknown
    token_texts: list[str]
    next_texts: list[str]  # "" where unknown
    top1: dict[str, np.ndarray]  # lens -> (L, P) int ids
    top1_texts: dict[str, list[list[str]]]  # lens -> L lists of P strings
    stats: dict[str, dict[str, np.ndarray]]  # lens -> stat -> (L, P)
    source: dict[str, Any] = field(default_factory=dict)  # store + seq, or model + text
    notes: list[str] = field(default_factory=list)

    @property
    def lens_names(self) -> list[str]:
        return list(self.stats)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: stats as nested lists (NaN written as null)."""

        def grid(a: np.ndarray) -> list:
            if a.dtype.kind == "f":
                return [[None if not np.isfinite(x) else round(float(x), 6) for x in row] for row in a]
            return a.tolist()

        return {
            "source": self.source,
            "units": "nats; rank 1-based (-1: next token unknown); ce null where the next token is unknown",
            "layers": self.layers,
            "positions": self.positions.tolist(),
            "tokens": self.tokens.tolist(),
            "token_texts": self.token_texts,
            "next_tokens": self.next_tokens.tolist(),
            "next_texts": self.next_texts,
            "notes": self.notes,
            "lenses": {
                name: {
                    "top1": self.top1[name].tolist(),
                    "top1_text": self.top1_texts[name],
                    **{stat: grid(self.stats[name][stat]) for stat in STATS},
                }
                for name in self.stats
            },
        }

    def to_arrow(self):
        """Long format: one row per (lens, layer, pos)."""
        import pyarrow as pa

        n_l, n_p = len(self.layers), len(self.positions)
        cols: dict[str, list] = {k: [] for k in ("lens", "layer", "pos", "token", "token_text", "next_token",
                                                 "top1", "top1_id", *STATS)}  # fmt: skip
        for name in self.stats:
            cols["lens"] += [name] * (n_l * n_p)
            cols["layer"] += np.repeat(self.layers, n_p).tolist()
            cols["pos"] += np.tile(self.positions, n_l).tolist()
            cols["token"] += np.tile(self.tokens, n_l).tolist()
            cols["token_text"] += self.token_texts * n_l
            cols["next_token"] += [None if t < 0 else int(t) for t in np.tile(self.next_tokens, n_l)]
            cols["top1"] += [t for row in self.top1_texts[name] for t in row]
            cols["top1_id"] += self.top1[name].reshape(-1).tolist()
            for stat in STATS:
                flat = self.stats[name][stat].reshape(-1)
                if stat == "ce":
                    cols[stat] += [None if not np.isfinite(x) else float(x) for x in flat]
                elif stat == "rank":
                    cols[stat] += [None if x < 0 else int(x) for x in flat]
                else:
                    cols[stat] += flat.tolist()
        types = {"lens": pa.string(), "layer": pa.int32(), "pos": pa.int32(), "token": pa.int32(),
                 "token_text": pa.string(), "next_token": pa.int32(), "top1": pa.string(), "top1_id": pa.int32(),
                 "p_top1": pa.float32(), "entropy": pa.float32(), "kl_to_final": pa.float32(), "ce": pa.float32(),
                 "rank": pa.int32()}  # fmt: skip
        return pa.table({k: pa.array(v, type=types[k]) for k, v in cols.items()})


# ---- writing (atomic: a reader sees the old file or the new one, never half of one) ---------------
def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def save_png(fig: Any, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure as PNG at `path` (atomically) and close it."""
    import matplotlib.pyplot as plt

    out = Path(path)
    tmp = temp_name(out)
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out


def write_json(traj: Trajectory, path: str | os.PathLike) -> Path:
    out = Path(path)
    tmp = temp_name(out)
    tmp.write_text(json.dumps(traj.to_dict()))
    os.replace(tmp, out)
    return out


def write_parquet(traj: Trajectory, path: str | os.PathLike) -> Path:
    import pyarrow.parquet as pq

    out = Path(path)
    tmp = temp_name(out)
    pq.write_table(traj.to_arrow(), tmp)
    os.replace(tmp, out)
    return out


# ---- lens checks and layer choice -------------------------------------------------------------------
def check_lens_for_model(lens: Lens, identity: dict[str, Any], d_model: int, n_layers: int, name: str = "") -> None:
    """Refuse a lens fitted on another model than `identity` (a model's provenance: its weights hash).

    The live-model counterpart of `Lens.check_compatible`, which checks a lens against a store.
    """
    mine = lens.config.model
    label = f"lens {name!r}" if name else "this lens"
    if mine.get("weights_hash") != identity.get("weights_hash"):
        raise LensError(
            f"{label} was fitted on model {mine.get('id')!r} (weights {mine.get('weights_hash')}) but the loaded "
            f"model is {identity.get('id')!r} (weights {identity.get('weights_hash')}); use a lens fitted on a store "
            "of that model"
        )
    if (lens.config.d_model, lens.config.n_layers) != (d_model, n_layers):
        raise LensError(
            f"{label} shape (d_model {lens.config.d_model}, {lens.config.n_layers} layers) does not match the "
            f"model (d_model {d_model}, {n_layers} layers)"
        )


def choose_layers(
    available: list[int], n_layers: int, lenses: dict[str, Lens | None], requested: list[int] | None = None
) -> tuple[list[int], list[str]]:
    """(boundaries below the last to show, notes). Default: those available that every lens has.

    Requested layers must be available and covered by every lens; a lens sharing no layer with the
    store is refused, naming both lists. The last boundary (the model's output) is added by the caller.
    """
    below = sorted(b for b in available if b != n_layers)
    notes: list[str] = []
    if requested is not None:
        missing = sorted(set(requested) - set(below))
        if missing:
            raise SelectionError(
                f"layers (--layers) {missing} are not available below the last boundary (available: {below})"
            )
        chosen = sorted(set(requested))
        for name, lens in lenses.items():
            if lens is not None and (lacking := [b for b in chosen if b not in lens.layers]):
                raise LensError(f"lens {name!r} has no translator for layers {lacking}; it has {lens.layers}")
        return chosen, notes
    chosen = below
    for name, lens in lenses.items():
        if lens is None:
            continue
        common = [b for b in chosen if b in lens.layers]
        if not common:
            raise LensError(
                f"lens {name!r} has translators for layers {lens.layers}, none of which are available here "
                f"(the store or model has {below}); use a store with the lens's layers"
            )
        if len(common) < len(chosen):
            notes.append(f"layers {sorted(set(chosen) - set(common))} left out: lens {name!r} has no translator there")
        chosen = common
    return chosen, notes


# ---- the grid --------------------------------------------------------------------------------------
def _decode_all(tokenizer: Any, ids: np.ndarray) -> dict[int, str]:
    return {int(t): tokenizer.decode([int(t)]) for t in np.unique(ids)}


def _cells(logp: torch.Tensor, final: FinalDist, nxt: torch.Tensor) -> dict[str, torch.Tensor]:
    """The statistics of (B, V) lens log-probs at B positions."""
    top_lp, top = logp.max(-1)
    valid = nxt != IGNORE_INDEX
    lp_next = logp.gather(-1, nxt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    rank = 1 + (logp > lp_next.unsqueeze(-1)).sum(-1)
    return {
        "top1": top,
        "p_top1": top_lp.exp(),
        "entropy": entropy(logp),
        "kl_to_final": final.kl(logp),
        "ce": torch.where(valid, -lp_next, torch.full_like(lp_next, float("nan"))),
        "rank": torch.where(valid, rank, torch.full_like(rank, -1)),
    }


def trajectory_from_states(
    resid: dict[int, torch.Tensor],
    final_logprobs: torch.Tensor,
    tokens: np.ndarray | torch.Tensor,
    unembed: Unembed,
    lenses: dict[str, Lens | None],
    tokenizer: Any,
    *,
    n_layers: int,
    next_tokens: np.ndarray | None = None,
    positions: np.ndarray | None = None,
    layers: list[int] | None = None,
    source: dict[str, Any] | None = None,
    block: int = POSITION_BLOCK,
) -> Trajectory:
    """The common core: residuals (P, d) per boundary, the final log-probs (P, V) and the tokens (P,).

    `next_tokens` defaults to the tokens shifted by one (unknown at the last position); `positions`
    labels the columns (default 0..P-1). Callers check that the lenses belong to the model.
    """
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    n_pos = tokens.shape[0]
    if n_pos == 0:
        raise SelectionError("no positions to show")
    if next_tokens is None:
        next_tokens = np.full(n_pos, IGNORE_INDEX, dtype=np.int64)
        next_tokens[:-1] = tokens[1:]
    next_tokens = np.where(np.asarray(next_tokens) < 0, IGNORE_INDEX, next_tokens).astype(np.int64)
    positions = np.arange(n_pos) if positions is None else np.asarray(positions, dtype=np.int64)
    below, notes = choose_layers(list(resid), n_layers, lenses, layers)
    all_layers = [*below, n_layers]
    names = list(lenses)
    grids = {name: {k: [] for k in ("top1", *STATS)} for name in names}
    nxt_all = torch.from_numpy(next_tokens)
    with torch.no_grad():
        for start in range(0, n_pos, block):
            sl = slice(start, min(start + block, n_pos))
            final = FinalDist.from_logp(final_logprobs[sl].float())
            nxt = nxt_all[sl]
            final_cells = _cells(final.logp, final, nxt)
            for name in names:
                lens = lenses[name]
                rows = []
                for b in below:
                    h = resid[b][sl].float()
                    if lens is not None:
                        h = lens.translate(h, b)
                    rows.append(_cells(log_probs(unembed(h)), final, nxt))
                rows.append(final_cells)
                for k in grids[name]:
                    grids[name][k].append(torch.stack([r[k] for r in rows]))
    top1 = {n: torch.cat(grids[n]["top1"], 1).numpy() for n in names}
    stats = {n: {k: torch.cat(grids[n][k], 1).numpy() for k in STATS} for n in names}
    texts = _decode_all(tokenizer, np.concatenate([tokens, next_tokens[next_tokens >= 0], *top1.values()], None))
    return Trajectory(
        layers=all_layers,
        positions=positions,
        tokens=tokens,
        next_tokens=np.where(next_tokens == IGNORE_INDEX, -1, next_tokens),
        token_texts=[texts[int(t)] for t in tokens],
        next_texts=[texts[int(t)] if t >= 0 else "" for t in next_tokens],
        top1=top1,
        top1_texts={n: [[texts[int(t)] for t in row] for row in top1[n]] for n in names},
        stats=stats,
        source=source or {},
        notes=notes,
    )


def _position_range(positions: range | slice | None, seq_len: int) -> range:
    if positions is None:
        return range(seq_len)
    if isinstance(positions, slice):
        positions = range(*positions.indices(seq_len))
    if len(positions) == 0 or positions.start < 0 or positions.stop > seq_len:
        raise SelectionError(
            f"positions {positions.start}:{positions.stop} are outside the sequence's 0:{seq_len} (--positions)"
        )
    return positions


def trajectory_from_store(
    store: Store,
    seq: int,
    lenses: dict[str, Lens | None],
    positions: range | slice | None = None,
    layers: list[int] | None = None,
    device: str = "cpu",
) -> Trajectory:
    """The grid of stored sequence `seq` (the next token is known up to the sequence's last position)."""
    n = store.n_sequences
    if not 0 <= seq < n:
        raise SelectionError(
            f"sequence {seq} (--seq) is not in {store.url}: it has {n} committed sequences (0..{n - 1})"
        )
    for lens in lenses.values():
        if lens is not None:
            lens.check_compatible(store)
    n_layers = store.meta.n_layers
    below, notes = choose_layers(store.layers, n_layers, lenses, layers)  # fail before reading anything
    pos = _position_range(positions, store.seq_len)
    sel = slice(pos.start, pos.stop, pos.step)
    tokens = store.tokens([seq])[0].astype(np.int64)
    nxt = np.full_like(tokens, IGNORE_INDEX)
    nxt[:-1] = tokens[1:]
    resid = {b: torch.from_numpy(store.resid(b, [seq])[0][sel]).to(device) for b in below}
    unembed = store.unembed.to(device)
    final_lp = store.final_logprobs([seq], device=device)[0][sel]
    traj = trajectory_from_states(
        resid, final_lp, tokens[sel], unembed, {k: (v.to(device) if v is not None else None) for k, v in lenses.items()},
        store.tokenizer(), n_layers=n_layers, next_tokens=nxt[sel], positions=np.arange(pos.start, pos.stop, pos.step),
        layers=below, source={"store": store.url, "seq": seq, "model": store.meta.model.get("id")},
    )  # fmt: skip
    traj.notes = notes + traj.notes
    return traj
