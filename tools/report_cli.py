"""`lenscache report`: one self-contained HTML page (``index.html``, plus ``report.json``) about a store.

Registered in the main CLI, whose `main` turns errors into one line. Every input (the lenses against
the store's model and layers, the sequences, positions, the basis) is checked before any work, and the
report directory is built under a hidden sibling name and renamed into place when complete
(`lenscache.publish.publish_dir`): --out is absent, the old report or the new one, never half of one.
An existing --out is refused unless --overwrite, and even then only when it holds a report (or nothing).
"""

from __future__ import annotations

from pathlib import Path

import click

from lenscache.publish import publish_dir
from lenscache.tools.analysis_cli import STATS, _load_lenses, _positions


def _seqs(text: str | None) -> list[int] | None:
    """'0,1,2' -> [0, 1, 2]; None -> the default (the first sequences of the split)."""
    if text is None:
        return None
    try:
        seqs = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(
            f"cannot parse {text!r}; use sequence indices, e.g. 0,1,2", param_hint="--seqs"
        ) from None
    if not seqs:
        raise click.BadParameter(f"{text!r} names no sequence", param_hint="--seqs")
    return list(dict.fromkeys(seqs))


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an --out that cannot take a report, before any work."""
    from lenscache.analysis.html_report import DATA, INDEX

    if not out.exists():
        return
    if not out.is_dir():
        raise click.UsageError(f"--out {out} exists and is not a directory; nothing was written")
    if not overwrite:
        raise click.UsageError(
            f"--out {out} already exists; pass --overwrite to replace it (nothing was written)"
        )
    holds_report = (out / INDEX).is_file() and (out / DATA).is_file()
    if any(out.iterdir()) and not holds_report:
        raise click.UsageError(
            f"--out {out} is not empty and holds no lenscache report; --overwrite replaces only a report "
            "(nothing was written)"
        )


@click.command(name="report")
@click.argument("store")
@click.option(
    "--lens", "lens_dirs", multiple=True, help="Lens directory, or NAME=DIR; repeatable (logit lens always)."
)
@click.option("--basis", default=None, help="A CBE basis directory (lenscache cbe): adds its energies.")
@click.option(
    "--out", required=True, help="Report directory to write: index.html (self-contained) + report.json."
)
@click.option(
    "--seqs",
    default=None,
    help="Sequences to show trajectories of, e.g. 0,1,2 (default: the first 3 of --split).",
)
@click.option("--positions", default=None, help="START:STOP positions of each trajectory (default: 0:40).")
@click.option("--stat", default="entropy", show_default=True, type=click.Choice(STATS),
              help="Trajectory cell colour at first (the page's menu switches it).")  # fmt: skip
@click.option("--split", default="held_out", show_default=True, type=click.Choice(["held_out", "train", "all"]),
              help="Sequences the metrics and prediction depth are computed on.")  # fmt: skip
@click.option("--max-tokens", default=None, type=int, help="Metrics and depth on at most this many tokens.")
@click.option(
    "--layers", default=None, help="Boundaries (default: all the lenses share; the output is added)."
)
@click.option(
    "--batch-tokens", default=256, show_default=True, type=int, help="Tokens per step (memory bound)."
)
@click.option("--device", default="cpu", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace a report already in --out.")
@click.option("--no-progress", is_flag=True)
def report(store: str, lens_dirs: tuple[str, ...], out: str, **kw) -> None:
    """One self-contained HTML report: provenance, lens metrics, prediction depth, trajectories, CBE energies."""
    import time

    from lenscache.analysis.html_report import (
        INDEX,
        collect_report,
        load_basis,
        plan_report,
        write_report_dir,
    )
    from lenscache.reader import open_store
    from lenscache.tools.cli import parse_layers

    started = time.perf_counter()
    where = Path(out)
    _check_out(where, kw["overwrite"])
    if kw["max_tokens"] is not None and kw["max_tokens"] < 1:
        raise click.BadParameter("must be at least 1", param_hint="--max-tokens")
    if kw["batch_tokens"] < 1:
        raise click.BadParameter("must be at least 1", param_hint="--batch-tokens")
    seqs, positions, layers = _seqs(kw["seqs"]), _positions(kw["positions"]), parse_layers(kw["layers"])
    st = open_store(store)
    lenses = _load_lenses(lens_dirs)
    basis = load_basis(kw["basis"]) if kw["basis"] is not None else None
    common = {"split": kw["split"], "max_tokens": kw["max_tokens"], "batch_tokens": kw["batch_tokens"]}
    plan = plan_report(st, lenses, seqs=seqs, positions=positions, layers=layers, basis=basis, **common)
    content = collect_report(st, lenses, plan, device=kw["device"], progress=not kw["no_progress"], **common)
    publish_dir(where, lambda tmp: write_report_dir(content, tmp, kw["stat"]))
    for note in content.notes:
        click.echo(f"note: {note}", err=True)
    size = (where / INDEX).stat().st_size
    click.echo(
        f"report of {len(lenses)} lenses ({', '.join(lenses)}) over boundaries {plan.layers[0]}..{plan.layers[-1]}, "
        f"{content.evaluation.tokens:,} tokens, trajectories of sequences {plan.seqs}"
        + (f", CBE energies at {content.basis.layers}" if content.basis is not None else "")
        + f"; wrote {where / INDEX} ({size / 2**20:.1f} MiB) in {time.perf_counter() - started:.1f} s"
    )
