"""One self-contained HTML page about a store and its lenses: `lenscache report`.

The page gathers what the other analyses compute, recomputed here by the same functions: the per-layer
lens metrics of `lenscache eval` (`analysis.evaluate`), the trajectories of a few stored sequences
(`analysis.trajectory`), the prediction-depth histogram (`analysis.depth`), the CBE energies of a
basis (`fit.basis`) and the store's provenance. Every figure is plotly: its JavaScript is inlined once
in the page's head, so the page needs no network when it is viewed (no CDN, no fonts, no MathJax).

Every string that comes from outside (token texts, lens names, paths, metadata) is escaped: with
`html.escape` where it goes into HTML, and also where it goes into a plotly label, since plotly reads
its labels as a small subset of HTML (``<b>``, ``<a href>``, entities); the figures' JSON is written
by plotly's own encoder, which writes ``<`` as ``\\u003c``, so no string can close a script element.

`plan_report` checks every input before anything is read or written; `collect_report` computes;
`render_html` builds the page; `write_report_dir` writes ``index.html`` and ``report.json``.
"""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lenscache import __version__
from lenscache.errors import BasisError, SelectionError
from lenscache.fit.basis import Basis, lens_identity
from lenscache.fit.lens import Lens
from lenscache.fit.stream import split_sequences
from lenscache.reader import Store

from .depth import DepthSummary, prediction_depth
from .depth import plan as depth_plan
from .evaluate import EvalReport, evaluate
from .report import LABELS
from .trajectory import Trajectory, trajectory_from_store
from .trajectory_plot import PLOT_STATS, cell_label

INDEX, DATA = "index.html", "report.json"
DEFAULT_SEQS = 3  # trajectories shown when --seqs is not given: the first sequences of the split
DEFAULT_WINDOW = 40  # positions per trajectory when --positions is not given
MAX_POSITIONS = 128  # beyond this a heatmap's cells are too narrow to label
LABEL_CHARS = 6  # characters of a token shown in a heatmap cell (the hover shows all of it)
CELL_W, CELL_H = 36, 17  # heatmap cell size in CSS pixels: room for LABEL_CHARS of 9 px type
PLOT_CONFIG = {"displaylogo": False, "responsive": False}


def esc(value: Any) -> str:
    """Text for HTML (and for plotly labels, which read HTML entities): <, >, & and quotes escaped."""
    return html.escape(str(value), quote=True)


def plot_text(value: Any) -> str:
    """A label for plotly: HTML-escaped (plotly turns the entities back into the characters), and a
    token's whitespace made visible as in the PNG figures."""
    return html.escape(str(value), quote=False)


def token_label(text: str, width: int = LABEL_CHARS) -> str:
    """A token as a cell or tick label: `cell_label`'s visible whitespace, without its matplotlib `$` escape."""
    return plot_text(cell_label(text, width).replace(r"\$", "$"))


# ---- inputs -----------------------------------------------------------------------------------------
@dataclass
class ReportPlan:
    """Checked inputs: the boundaries below the output, the sequences, positions and the basis's lens."""

    layers: list[int]
    seqs: list[int]
    positions: range
    basis: Basis | None = None
    basis_lens: str | None = None  # which of the report's lenses the basis belongs to (None: none of them)
    notes: list[str] = field(default_factory=list)


def plan_report(
    store: Store,
    lenses: dict[str, Lens | None],
    *,
    seqs: list[int] | None = None,
    positions: range | None = None,
    layers: list[int] | None = None,
    split: str = "held_out",
    max_tokens: int | None = None,
    batch_tokens: int = 256,
    basis: Basis | None = None,
) -> ReportPlan:
    """Every check before any work: the lenses belong to the store's model and share its layers, the
    sequences and positions exist, the split has tokens, the basis belongs to the store's model."""
    _, below, notes = depth_plan(store, lenses, layers, split, max_tokens, batch_tokens)
    store.tokenizer()  # the trajectories decode tokens with it: a store without one fails here, not after the passes
    n = store.n_sequences
    if seqs is None:  # the first sequences of the split the metrics are computed on
        parts = split_sequences(n)
        seqs = list({"train": parts.train, "held_out": parts.held_out, "all": range(n)}[split][:DEFAULT_SEQS])
    if not seqs:
        raise SelectionError(f"no sequence to show a trajectory of (--seqs); {store.url} has {n} committed")
    for seq in seqs:
        if not 0 <= seq < n:
            raise SelectionError(
                f"sequence {seq} (--seqs) is not in {store.url}: it has {n} committed sequences (0..{n - 1})"
            )
    if positions is None:
        positions = range(0, min(DEFAULT_WINDOW, store.seq_len))
    if len(positions) == 0 or positions.start < 0 or positions.stop > store.seq_len:
        raise SelectionError(
            f"positions {positions.start}:{positions.stop} are outside the sequences' 0:{store.seq_len} (--positions)"
        )
    if len(positions) > MAX_POSITIONS:
        raise SelectionError(
            f"positions {positions.start}:{positions.stop} are {len(positions)} columns; a trajectory shows at "
            f"most {MAX_POSITIONS} (--positions)"
        )
    owner = None
    if basis is not None:
        basis.check_compatible(store)
        want = basis.config.lens
        for name, lens in lenses.items():
            got = lens_identity(lens)
            if (want.get("kind"), want.get("tensor_sha256")) == (got["kind"], got["tensor_sha256"]):
                owner = name
                break
        if owner is None:
            notes.append(
                f"the basis belongs to a {want.get('kind')} lens that is not among this report's lenses"
            )
    return ReportPlan(below, list(seqs), positions, basis, owner, notes)


def load_basis(path: str | os.PathLike) -> Basis:
    """`Basis.load`, naming the option in its error."""
    try:
        return Basis.load(path)
    except BasisError as exc:
        raise BasisError(f"{exc} (--basis)") from None


# ---- the computation --------------------------------------------------------------------------------
@dataclass
class ReportContent:
    store: str
    meta: dict[str, Any]  # the store's metadata (`StoreMeta.to_dict`)
    lenses: dict[str, dict[str, Any]]  # name -> kind, layers, how it was fitted
    evaluation: EvalReport
    depth: DepthSummary
    trajectories: list[Trajectory]
    basis: Basis | None
    basis_lens: str | None
    split: str
    seconds: dict[str, float]
    notes: list[str]
    created: str


def _lens_info(lens: Lens | None) -> dict[str, Any]:
    if lens is None:
        return {"kind": "logit", "layers": "all", "fit": "none: the store's head applied to each layer"}
    fit = lens.config.fit or {}
    brief = {k: fit[k] for k in ("method", "tokens", "seconds", "steps", "loss", "init") if k in fit}
    return {"kind": lens.config.kind, "layers": _ranges(lens.layers), "fit": brief}


def collect_report(
    store: Store,
    lenses: dict[str, Lens | None],
    plan: ReportPlan,
    *,
    split: str = "held_out",
    max_tokens: int | None = None,
    batch_tokens: int = 256,
    device: str = "cpu",
    progress: bool = True,
) -> ReportContent:
    """Run the evaluation, the depth pass and the trajectories (the long part; nothing is written)."""
    seconds: dict[str, float] = {}
    fitted = {name: lens for name, lens in lenses.items() if lens is not None}
    started = time.perf_counter()
    evaluation = evaluate(store, fitted, layers=plan.layers, split=split, max_tokens=max_tokens,
                          batch_tokens=batch_tokens, device=device, progress=progress)  # fmt: skip
    seconds["evaluation"] = time.perf_counter() - started
    started = time.perf_counter()
    # the per-token table is not part of the report: it goes to a scratch directory
    with tempfile.TemporaryDirectory(prefix="lenscache-report-") as scratch:
        depth = prediction_depth(store, lenses, Path(scratch) / "depth.parquet", layers=plan.layers, split=split,
                                 max_tokens=max_tokens, batch_tokens=batch_tokens, device=device, progress=progress)  # fmt: skip
    seconds["depth"] = time.perf_counter() - started
    started = time.perf_counter()
    trajectories = [
        trajectory_from_store(store, seq, lenses, plan.positions, plan.layers, device) for seq in plan.seqs
    ]
    seconds["trajectories"] = time.perf_counter() - started
    notes = list(dict.fromkeys([*plan.notes, *evaluation.notes, *depth.notes, *trajectories[0].notes]))
    return ReportContent(
        store=store.url, meta=store.meta.to_dict(), lenses={name: _lens_info(lens) for name, lens in lenses.items()},
        evaluation=evaluation, depth=depth, trajectories=trajectories, basis=plan.basis, basis_lens=plan.basis_lens,
        split=split, seconds=seconds, notes=notes,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )  # fmt: skip


# ---- figures ----------------------------------------------------------------------------------------
def _layer_label(layer: int, last: int) -> str:
    return f"{layer} (output)" if layer == last else str(layer)


def metrics_figure(report: EvalReport):
    """Four panels, metric by layer boundary, a line per lens; the model's own output dashed."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    metrics = list(LABELS)
    fig = make_subplots(rows=2, cols=2, subplot_titles=[plot_text(LABELS[m]) for m in metrics],
                        horizontal_spacing=0.08, vertical_spacing=0.14)  # fmt: skip
    colors = _colors(list(report.lenses))
    for i, metric in enumerate(metrics):
        row, col = divmod(i, 2)
        for name, rows in report.lenses.items():
            fig.add_trace(
                go.Scatter(x=report.layers, y=[rows[layer][metric] for layer in report.layers], mode="lines+markers",
                           name=plot_text(name), legendgroup=name, showlegend=i == 0, line={"color": colors[name]},
                           hovertemplate=f"layer %{{x}}<br>{plot_text(metric)} %{{y:.4f}}<extra>{plot_text(name)}</extra>"),
                row=row + 1, col=col + 1,
            )  # fmt: skip
        if metric != "kl":  # the model's KL to itself is 0: nothing to draw on a log axis
            fig.add_trace(
                go.Scatter(x=[report.layers[0], report.layers[-1]], y=[report.model[metric]] * 2, mode="lines",
                           name="model output", legendgroup="model", showlegend=i == 1,
                           line={"color": "black", "dash": "dash", "width": 1},
                           hovertemplate="model output: %{y:.4f}<extra></extra>"),
                row=row + 1, col=col + 1,
            )  # fmt: skip
        fig.update_xaxes(title_text="layer boundary", row=row + 1, col=col + 1)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_layout(
        height=720, width=1100, margin={"t": 40, "l": 60, "r": 20, "b": 50}, template="plotly_white"
    )
    return fig


def depth_figure(summary: DepthSummary):
    """The depth histogram (fraction of tokens per boundary, per lens) and the mean final loss per depth."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    labels = [_layer_label(b, summary.layers[-1]) for b in summary.layers]
    fig = make_subplots(rows=1, cols=2, subplot_titles=["prediction depth: fraction of tokens",
                                                        "the model's loss on the tokens of each depth"])  # fmt: skip
    colors = _colors(list(summary.lenses))
    for name, s in summary.lenses.items():
        frac = [s["fraction"][str(b)] for b in summary.layers]
        counts = [s["histogram"][str(b)] for b in summary.layers]
        fig.add_trace(
            go.Bar(x=labels, y=frac, name=plot_text(name), legendgroup=name, marker={"color": colors[name]},
                   customdata=counts, hovertemplate=f"depth %{{x}}: %{{y:.1%}} (%{{customdata:,}} tokens)"
                   f"<extra>{plot_text(name)}</extra>"),
            row=1, col=1,
        )  # fmt: skip
        means = [s["mean_final_loss_by_depth"][str(b)] for b in summary.layers]
        fig.add_trace(
            go.Scatter(x=labels, y=means, mode="lines+markers", name=plot_text(name), legendgroup=name,
                       showlegend=False, line={"color": colors[name]}, connectgaps=False,
                       hovertemplate=f"depth %{{x}}: mean loss %{{y:.3f}} nats<extra>{plot_text(name)}</extra>"),
            row=1, col=2,
        )  # fmt: skip
    fig.update_xaxes(title_text="prediction depth (layer boundary)", type="category")
    fig.update_yaxes(title_text="fraction of tokens", tickformat=".0%", row=1, col=1)
    fig.update_yaxes(title_text="mean final loss [nats]", row=1, col=2)
    fig.update_layout(barmode="group", height=430, width=1100, margin={"t": 40, "l": 60, "r": 20, "b": 60},
                      template="plotly_white")  # fmt: skip
    return fig


def _stat_grid(traj: Trajectory, name: str, stat: str) -> np.ndarray:
    grid = traj.stats[name][stat].astype(np.float64)
    if stat == "rank":  # ranks span 1..vocab: colour by log10, as the PNG's LogNorm does
        grid = np.where(grid >= 1, np.log10(np.maximum(grid, 1)), np.nan)
    return grid


def _stat_range(traj: Trajectory, stat: str) -> tuple[float, float]:
    if stat == "p_top1":
        return 0.0, 1.0
    values = np.concatenate([_stat_grid(traj, name, stat).ravel() for name in traj.lens_names])
    values = values[np.isfinite(values)]
    return 0.0, max(1e-6, float(values.max())) if values.size else 1.0


def _stat_title(stat: str) -> str:
    return "log10 rank of the next token" if stat == "rank" else PLOT_STATS[stat]


def _z(grid: np.ndarray) -> list[list[float | None]]:
    return [[None if not math.isfinite(x) else round(float(x), 5) for x in row] for row in grid]


def _fmt(x: float, spec: str = ".3f") -> str:
    return "–" if not math.isfinite(float(x)) else f"{float(x):{spec}}"


def trajectory_figure(traj: Trajectory, stat: str = "entropy"):
    """A heatmap per lens (rows: layer boundaries, columns: positions), each cell labelled with the lens's
    top-1 token and coloured by `stat`; a menu recolours by another statistic; the hover shows them all."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = traj.lens_names
    n_l, n_p = len(traj.layers), traj.positions.size
    last = traj.layers[-1]
    layer_text = [_layer_label(b, last) for b in traj.layers]
    fig = make_subplots(rows=len(names), cols=1, subplot_titles=[f"{plot_text(n)} lens" for n in names],
                        vertical_spacing=min(0.3, 110 / (len(names) * (n_l * CELL_H + 130))))  # fmt: skip
    for i, name in enumerate(names):
        s = traj.stats[name]
        custom = np.empty((n_l, n_p, 10), dtype=object)
        for r in range(n_l):
            for c in range(n_p):
                rank = int(s["rank"][r, c])
                custom[r, c] = [
                    plot_text(repr(traj.top1_texts[name][r][c])), _fmt(s["p_top1"][r, c]),
                    _fmt(s["entropy"][r, c]), _fmt(s["kl_to_final"][r, c]), _fmt(s["ce"][r, c]),
                    "–" if rank < 1 else f"{rank:,}", plot_text(repr(traj.token_texts[c])),
                    plot_text(repr(traj.next_texts[c])) if traj.next_tokens[c] >= 0 else "(unknown)",
                    layer_text[r], str(int(traj.positions[c])),
                ]  # fmt: skip
        fig.add_trace(
            go.Heatmap(
                z=_z(_stat_grid(traj, name, stat)), x=list(range(n_p)), y=list(range(n_l)),
                text=[[token_label(t) for t in row] for row in traj.top1_texts[name]], texttemplate="%{text}",
                textfont={"size": 9}, customdata=custom.tolist(), coloraxis="coloraxis", xgap=1, ygap=1,
                name=plot_text(name),
                hovertemplate=(
                    "layer %{customdata[8]}, position %{customdata[9]}<br>input %{customdata[6]} → next %{customdata[7]}<br>"
                    "<b>top-1 %{customdata[0]}</b>, p %{customdata[1]}<br>entropy %{customdata[2]}, "
                    "KL(final ‖ lens) %{customdata[3]}<br>next token: CE %{customdata[4]}, rank %{customdata[5]}"
                    f"<extra>{plot_text(name)} lens</extra>"
                ),
            ),
            row=i + 1, col=1,
        )  # fmt: skip
        fig.update_yaxes(tickvals=list(range(n_l)), ticktext=layer_text, title_text="layer boundary",
                         tickfont={"size": 9}, row=i + 1, col=1)  # fmt: skip
        fig.update_xaxes(tickvals=list(range(n_p)), ticktext=[token_label(t) for t in traj.token_texts],
                         tickangle=-90, tickfont={"size": 9}, row=i + 1, col=1)  # fmt: skip
    lo, hi = _stat_range(traj, stat)
    buttons = []
    for option in PLOT_STATS:
        olo, ohi = _stat_range(traj, option)
        buttons.append({
            "label": plot_text(_stat_title(option)), "method": "update",
            "args": [{"z": [_z(_stat_grid(traj, n, option)) for n in names]},
                     {"coloraxis.cmin": olo, "coloraxis.cmax": ohi,
                      "coloraxis.colorbar.title.text": plot_text(_stat_title(option))}],
        })  # fmt: skip
    fig.update_layout(
        coloraxis={"colorscale": "Viridis", "cmin": lo, "cmax": hi,
                   "colorbar": {"title": {"text": plot_text(_stat_title(stat)), "side": "right"}, "len": 0.6}},
        updatemenus=[{"buttons": buttons, "active": list(PLOT_STATS).index(stat), "x": 0, "xanchor": "left",
                      "y": 1.0, "yanchor": "bottom", "pad": {"b": 28}, "showactive": True}],
        width=n_p * CELL_W + 260, height=len(names) * (n_l * CELL_H + 130) + 90,
        margin={"t": 90, "l": 110, "r": 40, "b": 60}, template="plotly_white",
    )  # fmt: skip
    return fig


def energies_figure(basis: Basis, lens_name: str | None):
    """The held-out energy of each basis direction (± standard error), a bar group per direction, one
    colour per layer."""
    import plotly.graph_objects as go

    fig = go.Figure()
    k = basis.config.k
    for i, layer in enumerate(basis.layers):
        fig.add_trace(go.Bar(
            x=list(range(1, k + 1)), y=basis.energies[i].tolist(), name=f"layer {layer}",
            error_y={"type": "data", "array": basis.stderr[i].tolist(), "visible": True},
            hovertemplate=f"layer {layer}, direction %{{x}}: %{{y:.4f}} nats<extra></extra>",
        ))  # fmt: skip
    owner = (
        f"the {plot_text(lens_name)} lens"
        if lens_name
        else f"a {plot_text(basis.config.lens.get('kind'))} lens"
    )
    fig.update_layout(
        barmode="group", height=420, width=1100, template="plotly_white",
        title={"text": f"CBE energies of {owner} ({plot_text(basis.config.mode)} ablation), held-out split"},
        xaxis={"title": {"text": "direction (ordered by energy)"}, "dtick": 1},
        yaxis={"title": {"text": "energy E[KL(f(h) ‖ f(r(h, v)))] [nats]"}},
        margin={"t": 50, "l": 70, "r": 20, "b": 50},
    )  # fmt: skip
    return fig


def _colors(names: list[str]) -> dict[str, str]:
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def _figure_div(fig, div_id: str) -> str:
    import plotly.io as pio

    # plotly.js is in the page's head once; plotly's JSON writes "<" as \u003c (no </script> can appear)
    return pio.to_html(fig, full_html=False, include_plotlyjs=False, include_mathjax=False, div_id=div_id,
                       config=PLOT_CONFIG, default_width=f"{fig.layout.width}px",
                       default_height=f"{fig.layout.height}px")  # fmt: skip


# ---- the page ---------------------------------------------------------------------------------------
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 24px;
       color: #222; max-width: 1800px; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.92em; }
.seq-text { white-space: pre-wrap; background: #f6f6f6; padding: 8px; border-radius: 4px; max-width: 1400px; }
.note { color: #555; } nav a { margin-right: 1em; } .figure { overflow-x: auto; }
"""


def _table(headers: list[str], rows: list[list[Any]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th{' class=num' if i in numeric else ''}>{esc(h)}</th>" for i, h in enumerate(headers))
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=num' if i in numeric else ''}>{esc(c)}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, values = [], sorted(values)
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ", ".join(out)


def provenance_rows(meta: dict[str, Any]) -> list[list[str]]:
    """The store's provenance as (field, value) rows."""
    model, data, build = meta.get("model", {}), meta.get("data", {}), meta.get("build", {})
    spec, storage, final = data.get("spec", {}) or {}, meta.get("storage", {}), meta.get("final", {})
    tok = model.get("tokenizer", {}) or {}
    stored_tok = meta.get("tokenizer") or {}
    spec_text = ", ".join(f"{k}={v}" for k, v in spec.items() if v is not None and k != "source")
    rows = [
        ("model", f"{model.get('id')} (source {model.get('source')}, revision {model.get('revision')})"),
        ("architecture", f"{model.get('architecture')}: {meta.get('n_layers')} blocks, d_model {meta.get('d_model')}, "
                         f"vocab {meta.get('vocab_size')}"),
        ("weights hash", model.get("weights_hash")),
        ("computed in", f"{model.get('dtype')} on {model.get('device')} (torch {model.get('torch_version')}, "
                        f"transformers {model.get('transformers_version')})"),
        ("tokenizer", f"{tok.get('name')} {tok.get('hash')}; stored in the store: "
                      + (f"{stored_tok.get('hash')} ({stored_tok.get('bytes'):,} bytes)" if stored_tok else "no")),
        ("data", f"{spec.get('source')}" + (f" ({spec_text})" if spec_text else "")),
        ("documents, packing", f"{data.get('n_documents')} documents, {data.get('packing', 'packed')}, "
                               f"fingerprint {data.get('fingerprint')}"),
        ("sequences", f"{build.get('committed')} committed of {meta.get('n_sequences')} × seq_len {meta.get('seq_len')} "
                      f"= {int(build.get('committed') or 0) * int(meta.get('seq_len') or 0):,} tokens"),
        ("layers stored", _ranges(list(meta.get("layers", [])))),
        ("codec", f"{storage.get('codec')}: {storage.get('description')}"),
        ("final distribution", f"exact last layer via {final.get('encoding')!r}, top-{final.get('topk')}, "
                               f"full logits {'yes' if final.get('full_logits') else 'no'}; head check max |Δlogit| "
                               f"{(meta.get('head') or {}).get('check_max_abs_error')}"),
        ("build", f"{build.get('status')}: started {build.get('started')}, finished {build.get('finished')}"),
        ("created", f"{meta.get('created')} by lenscache {meta.get('package_version')} "
                    f"(schema {meta.get('schema_version')})"),
    ]  # fmt: skip
    return [[k, "" if v is None else str(v)] for k, v in rows]


def _metrics_tables(report: EvalReport) -> str:
    names = list(report.lenses)
    parts = []
    for metric, label in LABELS.items():
        rows = [
            [layer, *(f"{report.lenses[n][layer][metric]:.4f}" for n in names)] for layer in report.layers
        ]
        rows.append(["model output", f"{report.model[metric]:.4f}", *[""] * (len(names) - 1)])
        parts.append(f"<h4>{esc(label)}</h4>" + _table(["layer", *names], rows, set(range(len(names) + 1))))
    return "".join(parts)


def _sequence_text(traj: Trajectory) -> str:
    return "".join(traj.token_texts)


def render_html(content: ReportContent, stat: str = "entropy") -> str:
    """The whole page as one string: plotly.js inline once, every figure a div and a script."""
    import plotly
    from plotly.offline import get_plotlyjs

    if stat not in PLOT_STATS:
        raise SelectionError(f"unknown statistic {stat!r} (--stat); choose one of {', '.join(PLOT_STATS)}")
    ev, dp = content.evaluation, content.depth
    store_name = Path(content.store.rstrip("/")).name or content.store
    body: list[str] = []
    nav = [("provenance", "Provenance"), ("metrics", "Lens metrics"), ("depth", "Prediction depth"),
           ("trajectories", "Trajectories")] + ([("cbe", "CBE energies")] if content.basis is not None else [])  # fmt: skip
    body.append(f"<h1>lenscache report: {esc(store_name)}</h1>")
    total = sum(content.seconds.values())
    body.append(
        f"<p class=note>{esc(content.store)} · generated {esc(content.created)} by lenscache {esc(__version__)} "
        f"(plotly {esc(plotly.__version__)}) in {total:.1f} s · {esc(content.split)} split</p>"
    )
    body.append("<nav>" + "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t in nav) + "</nav>")

    body.append('<h2 id="provenance">Provenance</h2>')
    body.append(_table(["field", "value"], provenance_rows(content.meta)))
    lens_rows = [[name, i["kind"], i["layers"], json.dumps(i["fit"]) if isinstance(i["fit"], dict) else i["fit"]]
                 for name, i in content.lenses.items()]  # fmt: skip
    body.append("<h3>Lenses</h3>" + _table(["name", "kind", "layers", "fit"], lens_rows))
    body.append("<details><summary>the store's full metadata (JSON)</summary><pre class=mono>"
                f"{esc(json.dumps(content.meta, indent=1, default=str))}</pre></details>")  # fmt: skip

    body.append('<h2 id="metrics">Lens metrics by layer</h2>')
    bpb = f", {ev.bytes:,} bytes of text ({ev.tokens / ev.bytes:.4f} tokens per byte)" if ev.bytes else ""
    body.append(
        f"<p>What <code>lenscache eval</code> computes: the {esc(ev.split)} split, {ev.tokens:,} tokens "
        f"({ev.predicted_tokens:,} with a next token){esc(bpb)}; {ev.seconds:.1f} s. Nats per token; KL on a log axis. "
        f"The model's own cross-entropy: {ev.model['ce']:.4f} nats"
        + (f" = {ev.bits_per_byte(ev.model['ce'], per='predicted'):.4f} bits per byte" if ev.bytes else "")
        + ".</p>"
    )
    body.append(f"<div class=figure>{_figure_div(metrics_figure(ev), 'fig-metrics')}</div>")
    body.append(f"<details><summary>the tables</summary>{_metrics_tables(ev)}</details>")

    body.append('<h2 id="depth">Prediction depth</h2>')
    body.append(
        f"<p>Per token, the first boundary from which the lens's top-1 equals the model's final top-1 and stays "
        f"equal up to the output ({dp.layers[-1]}: it never settles below it). {dp.tokens:,} tokens of the "
        f"{esc(dp.split)} split; {dp.seconds:.1f} s.</p>"
    )
    body.append(f"<div class=figure>{_figure_div(depth_figure(dp), 'fig-depth')}</div>")
    rho_rows = [[name, s["mean_depth"], s["median_depth"], f"{s['settled_only_at_output']:.1%}",
                 s["spearman_depth_vs_final_loss"], s["spearman_depth_vs_log_token_frequency"],
                 s["spearman_depth_vs_log_prediction_frequency"]] for name, s in dp.lenses.items()]  # fmt: skip
    body.append(_table(["lens", "mean depth", "median", "settled only at the output", "ρ(depth, final loss)",
                        "ρ(depth, input-token freq.)", "ρ(depth, prediction freq.)"], rho_rows, set(range(1, 7))))  # fmt: skip

    body.append('<h2 id="trajectories">Trajectories</h2>')
    body.append(
        "<p>Each cell: the lens's top-1 token at that layer boundary and position; colour: the statistic chosen "
        "in the menu (all panels share one scale). Hover a cell for its token, probability, entropy, KL and the "
        "next token's cross-entropy and rank. Columns are labelled with the input tokens.</p>"
    )
    for i, traj in enumerate(content.trajectories):
        seq = traj.source.get("seq")
        first, last = int(traj.positions[0]), int(traj.positions[-1])
        body.append(f"<h3>sequence {esc(seq)}, positions {first}–{last}</h3>")
        body.append(f"<div class=seq-text>{esc(_sequence_text(traj))}</div>")
        body.append(
            f"<div class=figure>{_figure_div(trajectory_figure(traj, stat), f'fig-trajectory-{i}')}</div>"
        )

    if content.basis is not None:
        b = content.basis
        body.append('<h2 id="cbe">Causal basis (CBE) energies</h2>')
        owner = (
            f"the {content.basis_lens!r} lens" if content.basis_lens else "a lens not given to this report"
        )
        body.append(
            f"<p>{b.config.k} directions per layer at boundaries {esc(_ranges(b.layers))}, fitted for {esc(owner)} "
            f"({esc(b.config.lens.get('kind'))}), {esc(b.config.mode)} ablation; energies re-estimated on the held-out "
            f"split, ± one standard error over sequences. Tokens: {esc(json.dumps(b.config.tokens))}.</p>"
        )
        body.append(
            f"<div class=figure>{_figure_div(energies_figure(b, content.basis_lens), 'fig-cbe')}</div>"
        )

    if content.notes:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in content.notes) + "</ul>")
    secs = ", ".join(f"{k} {v:.1f} s" for k, v in content.seconds.items())
    body.append(f"<p class=note>Time: {esc(secs)}.</p>")
    return (
        "<!DOCTYPE html>\n<html lang=en>\n<head>\n<meta charset=utf-8>\n"
        f"<title>lenscache report: {esc(store_name)}</title>\n<style>{CSS}</style>\n"
        f'<script type="text/javascript">{get_plotlyjs()}</script>\n</head>\n<body>\n'
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def report_data(content: ReportContent) -> dict[str, Any]:
    """The numbers behind the page, JSON-able (``report.json``)."""
    basis = None
    if content.basis is not None:
        cfg = content.basis.config
        basis = {"layers": cfg.layers, "k": cfg.k, "mode": cfg.mode, "lens": cfg.lens, "report_lens": content.basis_lens,
                 "energies": {str(layer): [{"energy": float(e), "stderr": float(s)} for e, s in
                                           zip(content.basis.energies[i].tolist(), content.basis.stderr[i].tolist(),
                                               strict=True)] for i, layer in enumerate(cfg.layers)}}  # fmt: skip
    return {
        "store": content.store,
        "created": content.created,
        "package_version": __version__,
        "split": content.split,
        "provenance": content.meta,
        "lenses": content.lenses,
        "evaluation": content.evaluation.to_dict(),
        "depth": content.depth.to_dict(),
        "trajectories": [
            {**t.source, "positions": [int(t.positions[0]), int(t.positions[-1]) + 1]}
            for t in content.trajectories
        ],
        "basis": basis,
        "seconds": {k: round(v, 2) for k, v in content.seconds.items()},
        "notes": content.notes,
    }


def write_report_dir(content: ReportContent, out_dir: str | os.PathLike, stat: str = "entropy") -> Path:
    """Write ``index.html`` and ``report.json`` into `out_dir` (a fresh directory: callers publish it whole)."""
    out = Path(out_dir)
    (out / DATA).write_text(json.dumps(report_data(content), indent=1, default=str, allow_nan=False))
    (out / INDEX).write_text(render_html(content, stat), encoding="utf-8")
    return out / INDEX
