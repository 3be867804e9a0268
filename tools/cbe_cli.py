"""`lenscache cbe`: causal basis extraction for a lens, from a store alone (no model).

``lenscache cbe`` is a group: ``lenscache cbe fit STORE …`` fits a basis, and ``lenscache cbe STORE …``
(no subcommand) still means ``fit``; ``lenscache cbe fidelity`` (`lenscache.tools.cbe_fidelity`)
tests a basis in the model itself.
The fit works in ``OUT.partial`` (its checkpoints live there, so `--resume` continues from it) and
the finished basis is renamed to OUT: OUT is only ever absent, the old basis, or the new one.
Registered in the main CLI (``lenscache cbe``), whose `main` turns errors into one line.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from lenscache.publish import replace_dir
from lenscache.tools.cbe_fidelity import fidelity

MODES = ("mean", "zero", "resample")


def _layers(text: str | None) -> list[int] | None:
    from lenscache.tools.cli import parse_layers

    return parse_layers(text)


def partial_dir(out: Path) -> Path:
    """Where an unfinished fit keeps its checkpoint."""
    return out.with_name(out.name + ".partial")


def _check_out(out: Path, overwrite: bool, resume: bool) -> None:
    """Refuse an --out that cannot take a basis, before any work."""
    from lenscache.fit.basis import CONFIG_FILE

    if overwrite and resume:
        raise click.UsageError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise click.UsageError(f"--out {out} exists and is not a directory; nothing was written")
    if (out / CONFIG_FILE).exists() and not overwrite:
        raise click.UsageError(f"--out {out} already holds a basis; pass --overwrite to replace it")
    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG_FILE).exists():
        raise click.UsageError(f"--out {out} exists, is not empty and holds no basis; nothing was written")
    work = partial_dir(out)
    if work.exists() and not (resume or overwrite):
        raise click.UsageError(
            f"{work} holds an unfinished fit: continue it with --resume, or start over with --overwrite"
        )


class DefaultGroup(click.Group):
    """A group whose arguments go to `default` when they do not start with a subcommand's name."""

    def __init__(self, *args, default: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.default = default

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = [self.default, *args]
        return super().parse_args(ctx, args)


@click.group(name="cbe", cls=DefaultGroup, default="fit")
def cbe() -> None:
    """Causal basis extraction: `fit` a basis (the default: `lenscache cbe STORE …`), or test its `fidelity`."""


@cbe.command(name="fit")
@click.argument("store")
@click.option("--lens", "lens_dir", required=True, help="Lens directory (lens.json + lens.safetensors), or 'logit'.")
@click.option("--out", required=True, help="Basis directory to write (basis.safetensors + basis.json).")
@click.option("--layers", default=None, help="Boundaries (default: the lens's; logit: all but the last).")
@click.option("--k", default=16, show_default=True, type=int, help="Directions per layer.")
@click.option("--max-tokens", default=None, type=int, help="Train tokens to fit on (whole sequences; default all).")
@click.option("--eval-tokens", default=None, type=int, help="Held-out tokens for the final energies (default all).")
@click.option("--mode", default="mean", show_default=True, type=click.Choice(MODES), help="Ablation.")
@click.option(
    "--method",
    default="deflation",
    show_default=True,
    type=click.Choice(["deflation", "subspace"]),
    help="deflation: one direction after another (CBE as defined); subspace: all k at once, maximising "
    "the sum of their energies.",
)
@click.option("--steps", default=100, show_default=True, type=int, help="Optimiser steps per direction (deflation) "
              "or in all (subspace).")
@click.option("--lr", default=0.1, show_default=True, type=float, help="First step's rotation (radians).")
@click.option("--batch-tokens", default=512, show_default=True, type=int, help="Tokens per step.")
@click.option("--buffer-tokens", default=16384, show_default=True, type=int, help="Shuffle buffer (memory bound).")
@click.option("--init", default="unembed", show_default=True, type=click.Choice(["unembed", "random"]))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--checkpoint-every", default=50, show_default=True, type=int, help="Steps between checkpoints.")
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda | cuda:N")
@click.option("--resume", is_flag=True, help="Continue a killed fit from OUT.partial.")
@click.option("--overwrite", is_flag=True, help="Replace a basis in --out (and any unfinished fit).")
@click.option("--no-progress", is_flag=True)
def fit(store: str, lens_dir: str, out: str, **kw) -> None:
    """Causal basis extraction: the k directions per layer whose ablation changes the lens's output most."""
    from lenscache.fit.cbe import fit_cbe
    from lenscache.fit.lens import Lens
    from lenscache.fit.stream import StreamSpec
    from lenscache.reader import open_store

    where = Path(out)
    _check_out(where, kw["overwrite"], kw["resume"])
    st = open_store(store)
    lens = None if lens_dir == "logit" else Lens.load(lens_dir)
    spec = StreamSpec(batch_tokens=kw["batch_tokens"], buffer_tokens=kw["buffer_tokens"], max_tokens=kw["max_tokens"])
    work = partial_dir(where)
    if kw["overwrite"] and not kw["resume"]:
        shutil.rmtree(work, ignore_errors=True)
    basis = fit_cbe(
        st, lens, _layers(kw["layers"]), k=kw["k"], mode=kw["mode"], spec=spec, steps=kw["steps"], lr=kw["lr"],
        seed=kw["seed"], out=work, resume=kw["resume"], progress=not kw["no_progress"], init=kw["init"],
        eval_tokens=kw["eval_tokens"], checkpoint_every=kw["checkpoint_every"], device=kw["device"],
        method=kw["method"],
    )  # fmt: skip
    replace_dir(work, where)
    click.echo(f"wrote a {kw['mode']}-ablation basis of {basis.config.k} directions for {len(basis.layers)} layers to {out}")
    for i, layer in enumerate(basis.layers):
        top = ", ".join(f"{e:.4f}±{s:.4f}" for e, s in zip(basis.energies[i, :4].tolist(), basis.stderr[i, :4].tolist(),
                                                           strict=True))  # fmt: skip
        click.echo(f"  layer {layer}: top energies (nats, held out) {top}")


cbe.add_command(fidelity)
