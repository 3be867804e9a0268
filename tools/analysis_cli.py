"""`lenscache trajectory` and `lenscache depth`: prediction trajectories and prediction depth.

Registered in the main CLI, whose `main` turns errors into one line. The logit lens is always
included (named ``logit``); every --lens NAME=DIR is checked against the store's or the loaded
model's weights hash before any work. Every input is checked before anything is written, and each
output lands under a temporary name and is renamed when complete.
"""

from __future__ import annotations

from pathlib import Path

import click

from lenscache.errors import DataError

STATS = ("entropy", "kl_to_final", "p_top1", "ce", "rank")


def _positions(text: str | None) -> range | None:
    """'A:B' -> range(A, B); None -> all."""
    if text is None:
        return None
    lo, sep, hi = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return range(int(lo or 0), int(hi))
    except ValueError:
        raise click.BadParameter(f"cannot parse {text!r}; use START:STOP, e.g. 0:40", param_hint="--positions") from None


def _check_file_out(out: str, suffix: str) -> Path:
    where = Path(out)
    if where.suffix.lower() != suffix:
        raise click.UsageError(f"--out {out} must end in {suffix}")
    if where.is_dir():
        raise click.UsageError(f"--out {out} is a directory; give a file name ending in {suffix}")
    if not where.parent.is_dir():
        raise click.UsageError(f"--out {out}: the directory {where.parent} does not exist; nothing was written")
    return where


def _load_lenses(lens_dirs: tuple[str, ...]) -> dict:
    from lenscache.fit.lens import Lens
    from lenscache.tools.cli import _lens_args

    return {"logit": None, **{name: Lens.load(path) for name, path in _lens_args(lens_dirs).items()}}


def _read_text(text: str | None, text_file: str | None) -> str:
    if (text is None) == (text_file is None):
        raise click.UsageError("with --model, give exactly one of --text and --text-file")
    if text is not None:
        return text
    try:
        return Path(text_file).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"--text-file {text_file} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _live_trajectory(model: str, text: str, lenses: dict, positions: range | None, layers, device: str):
    import numpy as np

    from lenscache.analysis.trajectory import check_lens_for_model, trajectory_from_states
    from lenscache.cache.live import run_text
    from lenscache.cache.model import ModelSpec, check_model_spec, load_model
    from lenscache.errors import SelectionError
    from lenscache.fit.stream import IGNORE_INDEX

    if not text.strip():  # before the model takes its time to load
        raise DataError("the text is empty (--text / --text-file): give some text to run the model on")
    spec = ModelSpec(model, device=device)
    check_model_spec(spec)
    loaded = load_model(spec)
    n_layers = int(loaded.provenance["n_layers"])
    for name, lens in lenses.items():
        if lens is not None:
            check_lens_for_model(lens, loaded.provenance, int(loaded.provenance["d_model"]), n_layers, name)
    live = run_text(loaded, text)
    n_pos = live.tokens.size
    pos = positions or range(n_pos)
    if len(pos) == 0 or pos.start < 0 or pos.stop > n_pos:
        raise SelectionError(f"positions {pos.start}:{pos.stop} are outside the text's 0:{n_pos} tokens (--positions)")
    sel = slice(pos.start, pos.stop)
    nxt = np.full(n_pos, IGNORE_INDEX, dtype=np.int64)
    nxt[:-1] = live.tokens[1:]
    return trajectory_from_states(
        {b: h[sel] for b, h in live.resid.items()}, live.final_logprobs[sel], live.tokens[sel], live.unembed, lenses,
        live.tokenizer, n_layers=live.n_layers, next_tokens=nxt[sel], positions=np.arange(pos.start, pos.stop),
        layers=layers, source={"model": loaded.provenance["id"], "weights_hash": loaded.provenance["weights_hash"],
                               "text": text if len(text) <= 2000 else text[:2000] + "…"},
    )  # fmt: skip


@click.command(name="trajectory")
@click.argument("store", required=False)
@click.option("--seq", type=int, default=None, help="Stored sequence to show (with STORE).")
@click.option("--model", default=None, help="Instead of STORE: run this model (as `build --model`) on --text.")
@click.option("--text", default=None, help="The text to run the model on (with --model).")
@click.option("--text-file", default=None, help="A UTF-8 file holding the text (with --model).")
@click.option("--lens", "lens_dirs", multiple=True, help="Lens directory, or NAME=DIR; repeatable (logit lens always).")
@click.option("--out", required=True, help="PNG to write; the table goes beside it as .json and .parquet.")
@click.option("--stat", default="entropy", show_default=True, type=click.Choice(STATS), help="Cell colour.")
@click.option("--layers", default=None, help="Boundaries to show (default: all the lenses share; the output is added).")
@click.option("--positions", default=None, help="START:STOP positions to compute (default: all).")
@click.option("--start", type=int, default=None, help="First position of the plotted window.")
@click.option("--window", type=int, default=40, show_default=True, help="Positions per figure.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--no-table", is_flag=True, help="Write only the PNG.")
def trajectory(store: str | None, lens_dirs: tuple[str, ...], out: str, **kw) -> None:
    """The layer × position grid of each lens's top-1 token, probability, entropy, KL, CE and rank."""
    from lenscache.analysis.trajectory import trajectory_from_store, write_json, write_parquet
    from lenscache.analysis.trajectory_plot import plot_trajectory, window_indices
    from lenscache.reader import open_store
    from lenscache.tools.cli import parse_layers

    if (store is None) == (kw["model"] is None):
        raise click.UsageError("give a STORE (with --seq) or --model (with --text or --text-file), not both")
    if store is not None and kw["seq"] is None:
        raise click.UsageError("with a STORE, --seq N chooses the sequence")
    if store is not None and (kw["text"] is not None or kw["text_file"] is not None):
        raise click.UsageError("--text and --text-file go with --model, not with a STORE")
    png = _check_file_out(out, ".png")
    if kw["window"] < 1:
        raise click.BadParameter("must be at least 1", param_hint="--window")
    positions, layers = _positions(kw["positions"]), parse_layers(kw["layers"])
    lenses = _load_lenses(lens_dirs)
    if store is not None:
        traj = trajectory_from_store(open_store(store), kw["seq"], lenses, positions, layers, kw["device"])
    else:
        text = _read_text(kw["text"], kw["text_file"])
        traj = _live_trajectory(kw["model"], text, lenses, positions, layers, kw["device"])
    window_indices(traj, kw["start"], kw["window"])  # a bad --start fails before anything is written
    plot_trajectory(traj, png, kw["stat"], kw["start"], kw["window"])
    written = [str(png)]
    if not kw["no_table"]:
        written += [str(write_json(traj, png.with_suffix(".json"))), str(write_parquet(traj, png.with_suffix(".parquet")))]
    for note in traj.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"{len(traj.layers)} boundaries × {traj.positions.size} positions, lenses {', '.join(traj.lens_names)}; "
               f"wrote {', '.join(written)}")  # fmt: skip


@click.command(name="depth")
@click.argument("store")
@click.option("--lens", "lens_dirs", multiple=True, help="Lens directory, or NAME=DIR; repeatable (logit lens always).")
@click.option("--out", required=True, help="Directory for depth.parquet, depth.json and depth.png.")
@click.option("--max-tokens", default=None, type=int, help="Use at most this many tokens (from the split's start).")
@click.option("--layers", default=None, help="Boundaries to use (default: all the lenses share; the output is added).")
@click.option("--split", default="all", show_default=True, type=click.Choice(["all", "train", "held_out"]))
@click.option("--batch-tokens", default=512, show_default=True, type=int, help="Tokens per step (memory bound).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--no-progress", is_flag=True)
def depth(store: str, lens_dirs: tuple[str, ...], out: str, **kw) -> None:
    """Prediction depth of every token, streamed over STORE: Parquet table, histogram, ρ with loss."""
    from lenscache.analysis.depth import PARQUET, PLOT, SUMMARY, write_depth
    from lenscache.reader import open_store
    from lenscache.tools.cli import _check_out_dir, parse_layers

    _check_out_dir(out)
    st = open_store(store)
    summary = write_depth(
        st, _load_lenses(lens_dirs), out, layers=parse_layers(kw["layers"]), split=kw["split"],
        max_tokens=kw["max_tokens"], batch_tokens=kw["batch_tokens"], device=kw["device"],
        progress=not kw["no_progress"],
    )  # fmt: skip
    for note in summary.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"prediction depth of {summary.tokens:,} tokens over boundaries {summary.layers} "
               f"({summary.seconds:.1f} s):")  # fmt: skip
    for name, s in summary.lenses.items():
        hist = ", ".join(f"{b}: {f:.1%}" for b, f in s["fraction"].items())
        click.echo(f"  {name}: mean depth {s['mean_depth']}; {hist}; ρ(depth, final loss) "
                   f"{s['spearman_depth_vs_final_loss']}, ρ(depth, token frequency) "
                   f"{s['spearman_depth_vs_log_token_frequency']}")  # fmt: skip
    click.echo(f"wrote {out}/{PARQUET}, {out}/{SUMMARY}, {out}/{PLOT}")
