"""`lenscache linrep sim`: the latent-variable simulation of Jiang et al. 2024, with and without log-odds matching.

Writes OUT/sim.json (every setting, curves and final numbers with 95% t-intervals over seeds), OUT/sim.png
(metrics against training step, both conditions) and OUT/sim.md (the final numbers as a table). The files
are written into a temporary directory next to OUT and renamed to OUT at the end, so a run that fails or
is interrupted leaves no OUT, or the old one. The command is registered by the main CLI's `linrep` group.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from lenscache.publish import publish_dir

CONDITIONS = {"matching": True, "no-matching": False}
NAMES = {True: "log-odds matching", False: "no log-odds matching"}


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an --out that cannot take the results, before any work."""
    if out.exists() and not out.is_dir():
        raise click.UsageError(f"--out {out} exists and is not a directory; nothing was written")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise click.UsageError(f"--out {out} exists and is not empty; pass --overwrite to replace it")


def _cell(entry: dict, spec: str = ".3f") -> str:
    if entry["lo"] is None:
        return f"{entry['mean']:{spec}}"
    return f"{entry['mean']:{spec}} [{entry['lo']:{spec}}, {entry['hi']:{spec}}]"


def markdown(results: dict[str, dict], seconds: float) -> str:
    """The final numbers of each condition as a markdown table, with the settings and the definitions."""
    first = next(iter(results.values()))
    c, seeds = first["config"], first["seeds"]
    lines = [
        "# Latent-variable simulation (Jiang et al. 2024, arXiv 2403.03867)",
        "",
        f"m = {c['m']} binary concepts ({2 ** c['m']} tokens), {c['n_contexts']} contexts, d = {c['d']}, "
        f"{c['steps']} steps of {'plain gradient descent' if c['optimiser'] == 'gd' else c['optimiser']} "
        f"(lr {c['lr']}, init scale {c['init_scale']:g}), seeds {seeds[0]}–{seeds[-1]} ({len(seeds)}); "
        f"wall time {seconds:.1f} s. Mean over seeds [two-sided 95% Student-t interval], at the last step.",
        "",
        "| condition | within-concept cosine | mean abs cross-concept cosine | embedding–unembedding alignment "
        "| KL(target ‖ model) [nats] |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, res in results.items():
        f = res["final"]
        lines.append(f"| {name} | {_cell(f['within'])} | {_cell(f['cross'])} | {_cell(f['alignment'])} "
                     f"| {_cell(f['kl'], '.2e')} |")  # fmt: skip
    lines += ["", "Per concept (within-concept cosine; alignment):", ""]
    for name, res in results.items():
        per = res["final_per_concept"]
        cells = ", ".join(f"C{i + 1} {w['mean']:.3f}; {a['mean']:.3f}"
                          for i, (w, a) in enumerate(zip(per["within"], per["alignment"], strict=True)))  # fmt: skip
        lines.append(f"- {name}: {cells}")
    lines += [
        "",
        "Within-concept cosine: mean cosine over pairs of the difference vectors g(c, C_i=1) − g(c, C_i=0) of "
        "one concept. Cross-concept: mean |cos| between the concepts' mean difference vectors. Alignment: "
        "cos between a concept's embedding direction (least-squares coefficient of f(x) on 2p(C_i=1|x) − 1) "
        "and its unembedding direction. Definitions and the two conditions: `lenscache.analysis.latent_sim`.",
        "",
    ]
    return "\n".join(lines)


@click.command(name="sim")
@click.option("--m", "m", default=4, show_default=True, type=click.IntRange(2, 12), help="Binary concepts.")
@click.option("--steps", default=5000, show_default=True, type=click.IntRange(min=1), help="Gradient steps.")
@click.option("--seeds", default=5, show_default=True, type=click.IntRange(1, 1000),
              help="Seeds per condition (0..N-1).")  # fmt: skip
@click.option("--n-contexts", default=512, show_default=True, type=click.IntRange(min=2), help="Contexts.")
@click.option("--d", "d", default=16, show_default=True, type=click.IntRange(min=2), help="Embedding dimension.")
@click.option("--lr", default=5.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--eval-every", default=50, show_default=True, type=click.IntRange(min=1), help="Steps between evaluations.")
@click.option("--condition", default="both", show_default=True, type=click.Choice(["both", *CONDITIONS]),
              help="With log-odds matching, without, or both.")  # fmt: skip
@click.option("--out", required=True, help="Directory to write sim.json, sim.png and sim.md into.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def sim(m: int, steps: int, seeds: int, n_contexts: int, d: int, lr: float, eval_every: int, condition: str,
        out: str, overwrite: bool, no_progress: bool) -> None:  # fmt: skip
    """Train softmax next-token models on the latent concept model and track linearity, orthogonality, alignment."""
    from lenscache.analysis.latent_sim import SimConfig, SimConfigError, plot, run_seeds

    where = Path(out)
    if d < m:
        raise click.UsageError(f"--d {d} must be at least --m {m} (the concepts need that many dimensions)")
    _check_out(where, overwrite)
    chosen = list(CONDITIONS.values()) if condition == "both" else [CONDITIONS[condition]]
    try:
        configs = [SimConfig(m=m, n_contexts=n_contexts, d=d, steps=steps, lr=lr, eval_every=eval_every,
                             log_odds_matching=lom) for lom in chosen]  # fmt: skip
    except SimConfigError as exc:
        raise click.UsageError(f"{exc}; nothing was written") from exc
    start = time.perf_counter()
    results = {}
    for config in configs:
        results[NAMES[config.log_odds_matching]] = run_seeds(config, list(range(seeds)), progress=not no_progress)
    seconds = time.perf_counter() - start
    options = {"m": m, "steps": steps, "seeds": seeds, "n_contexts": n_contexts, "d": d, "lr": lr,
               "eval_every": eval_every, "condition": condition}  # fmt: skip

    def write(work: Path) -> None:
        (work / "sim.json").write_text(json.dumps({"options": options, "seconds": seconds, "conditions": results},
                                                  indent=1), encoding="utf-8")  # fmt: skip
        plot(results, work / "sim.png")
        (work / "sim.md").write_text(markdown(results, seconds), encoding="utf-8")

    publish_dir(where, write)
    click.echo(f"wrote sim.json, sim.png, sim.md to {out} ({seconds:.1f} s)")
    for name, res in results.items():
        f = res["final"]
        click.echo(f"  {name}: within {_cell(f['within'])}, cross {_cell(f['cross'])}, "
                   f"alignment {_cell(f['alignment'])}")  # fmt: skip
