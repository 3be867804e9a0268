"""Evaluation reports on disk: ``metrics.json``, a readable ``metrics.md`` table and ``metrics.png``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .evaluate import EvalReport

LABELS = {
    "kl": "KL(final ‖ lens) [nats]",
    "ce": "cross-entropy vs next token [nats]",
    "entropy": "entropy [nats]",
    "top1_agreement": "top-1 agreement with final",
}


def table(report: EvalReport, metric: str = "kl") -> str:
    """A markdown table of one metric: a row per layer, a column per lens."""
    names = list(report.lenses)
    lines = [
        f"| layer | {' | '.join(names)} |",
        "|---:|" + "---:|" * len(names),
    ]
    for layer in report.layers:
        cells = [f"{report.lenses[name][layer][metric]:.4f}" for name in names]
        lines.append(f"| {layer} | {' | '.join(cells)} |")
    lines.append(f"| model output | {report.model[metric]:.4f} |" + " |" * (len(names) - 1))
    return "\n".join(lines)


def markdown(report: EvalReport) -> str:
    head = [
        f"# Lens evaluation: {report.store}",
        "",
        f"{report.split} split, {report.tokens:,} tokens ({report.predicted_tokens:,} with a next token)"
        + (f", {report.bytes:,} bytes of text" if report.bytes else "")
        + f"; {report.seconds:.1f} s.",
        "",
    ]
    parts = []
    for metric, label in LABELS.items():
        parts += [f"## {label}", "", table(report, metric), ""]
    if report.bytes:
        parts += ["Bits per byte: multiply nats/token by tokens/bytes/ln 2 "
                  f"({report.tokens / report.bytes:.4f} tokens per byte on this split).", ""]
    return "\n".join(head + parts + [f"_{n}_" for n in report.notes])


def plot(report: EvalReport, path: str | os.PathLike) -> Path:
    """Four panels, metric by layer, one line per lens, the model's own output dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    for ax, (metric, label) in zip(axes.flat, LABELS.items(), strict=True):
        for name, rows in report.lenses.items():
            ax.plot(report.layers, [rows[layer][metric] for layer in report.layers], marker=".", label=name)
        if metric != "kl":  # the model's own KL to itself is 0: nothing to draw on a log axis
            ax.axhline(report.model[metric], color="black", linestyle="--", linewidth=1, label="model output")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer boundary")
        ax.set_title(label)
        if metric == "kl":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes.flat[1].legend()
    fig.suptitle(f"{Path(report.store).name}: {report.split} split, {report.tokens:,} tokens")
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(report: EvalReport, out_dir: str | os.PathLike, with_plot: bool = True) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report.to_dict(), indent=2))
    (out / "metrics.md").write_text(markdown(report))
    if with_plot:
        plot(report, out / "metrics.png")
    return out
