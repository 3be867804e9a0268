"""The trajectory figure: one panel per lens side by side, a cell per (layer, position) coloured by a
statistic (entropy by default) and labelled with the lens's top-1 token, as in the tuned-lens paper.

Sizes follow the grid: a 30-layer × 40-position window stays readable (about 0.42 in per column and
6 pt labels); a longer text is drawn one window of `window` positions at a time (`start` picks it).
All panels share one colour scale, so colours compare across lenses.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np

from lenscache.errors import SelectionError

from .trajectory import Trajectory, save_png

PLOT_STATS = {
    "entropy": "entropy [nats]",
    "kl_to_final": "KL(final ‖ lens) [nats]",
    "p_top1": "probability of the top-1 token",
    "ce": "cross-entropy of the next token [nats]",
    "rank": "rank of the next token (1 = top-1)",
}
DEFAULT_WINDOW = 40


def cell_label(text: str, width: int) -> str:
    """A token's text made visible in a cell: whitespace shown, long tokens cut with an ellipsis."""
    shown = text.replace("\n", "\\n").replace("\t", "\\t").replace("$", r"\$")
    shown = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in shown)  # no font has control glyphs
    if shown.startswith(" "):
        shown = "·" + shown[1:]  # a leading space, visible
    if not shown.strip():
        shown = "␣" * max(1, len(text))
    return shown if len(shown) <= width else shown[: width - 1] + "…"


def window_indices(traj: Trajectory, start: int | None, window: int) -> np.ndarray:
    """Column indices of the window starting at position `start` (default: the first position)."""
    if window < 1:
        raise SelectionError(f"window (--window) must be at least 1, got {window}")
    positions = traj.positions
    first = int(positions[0]) if start is None else start
    idx = np.nonzero(positions >= first)[0][:window]
    if idx.size == 0:
        raise SelectionError(
            f"start (--start) {first} is past the last position shown ({int(positions[-1])})"
        )
    return idx


def plot_trajectory(
    traj: Trajectory,
    path: str | os.PathLike,
    stat: str = "entropy",
    start: int | None = None,
    window: int = DEFAULT_WINDOW,
    title: str | None = None,
) -> Path:
    """Write the PNG for the window of `window` positions at `start`; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm, Normalize

    if stat not in PLOT_STATS:
        raise SelectionError(f"unknown statistic {stat!r} (--stat); choose one of {', '.join(PLOT_STATS)}")
    cols = window_indices(traj, start, window)
    names = traj.lens_names
    n_l, n_p = len(traj.layers), cols.size
    wide, tall = n_p > 20, n_l > 20  # many positions: narrow columns; many layers: low rows, small type
    cell_w, width = (0.42, 6) if wide else (0.75, 9)
    cell_h, fontsize = (0.22, 5.5) if tall else (0.36, 8)
    grids = [traj.stats[name][stat][:, cols].astype(np.float64) for name in names]
    finite = np.concatenate([g[np.isfinite(g)] for g in grids]) if grids else np.zeros(1)
    if stat == "rank":
        norm = LogNorm(vmin=1, vmax=max(2.0, float(finite.max(initial=2.0))))
    elif stat == "p_top1":
        norm = Normalize(vmin=0.0, vmax=1.0)
    else:
        norm = Normalize(vmin=0.0, vmax=max(1e-6, float(finite.max(initial=1e-6))))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")  # masked cells: the next token is unknown

    panel_w, panel_h = n_p * cell_w + 1.0, n_l * cell_h + 1.9
    fig, axes = plt.subplots(
        1, len(names), figsize=(panel_w * len(names) + 1.2, panel_h), squeeze=False, constrained_layout=True
    )
    token_labels = [cell_label(traj.token_texts[i], width) for i in cols]
    next_labels = [cell_label(traj.next_texts[i], width) if traj.next_tokens[i] >= 0 else "" for i in cols]
    image = None
    for ax, name, grid in zip(axes[0], names, grids, strict=True):
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto", origin="lower",
                          interpolation="nearest")  # fmt: skip
        texts = traj.top1_texts[name]
        for r in range(n_l):
            for c, col in enumerate(cols):
                value = grid[r, c]
                rgba = cmap(norm(value)) if np.isfinite(value) else (0.87, 0.87, 0.87, 1.0)
                light = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] > 0.5
                ax.text(c, r, cell_label(texts[r][col], width), ha="center", va="center", fontsize=fontsize,
                        color="black" if light else "white")  # fmt: skip
        ax.set_yticks(range(n_l))
        ax.set_yticklabels([f"{b} (output)" if b == traj.layers[-1] else str(b) for b in traj.layers],
                           fontsize=fontsize + 1)  # fmt: skip
        ax.set_xticks(range(n_p))
        ax.set_xticklabels(token_labels, rotation=90, fontsize=fontsize + 1)
        ax.set_xlabel("input token")
        ax.set_ylabel("layer boundary")
        top = ax.secondary_xaxis("top")
        top.set_xticks(range(n_p))
        top.set_xticklabels(next_labels, rotation=90, fontsize=fontsize + 1)
        ax.set_title(f"{name} lens", fontsize=11)
    bar = fig.colorbar(image, ax=list(axes[0]), shrink=0.8, pad=0.01)
    bar.set_label(PLOT_STATS[stat])
    shown = f"positions {int(traj.positions[cols[0]])}–{int(traj.positions[cols[-1]])}"
    if cols.size < traj.positions.size:
        shown += f" of {int(traj.positions[0])}–{int(traj.positions[-1])} (--start moves the window)"
    heading = title or f"{_describe(traj)}: top-1 token per cell, colour = {PLOT_STATS[stat]}; {shown}"
    chars = max(40, int(fig.get_figwidth() * 10))  # about 10 characters of 11 pt per inch
    fig.suptitle("\n".join(textwrap.wrap(heading, chars)), fontsize=11)
    return save_png(fig, path)


def _describe(traj: Trajectory) -> str:
    src = traj.source
    if "store" in src:
        return f"{Path(str(src['store'])).name} sequence {src.get('seq')}"
    return f"{src.get('model', 'model')} on the given text"
