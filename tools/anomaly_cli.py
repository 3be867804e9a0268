"""`lenscache anomaly`: a prompt-injection benchmark and detectors on lens trajectories.

    lenscache anomaly prompts --out prompts.jsonl [--clean 400 --injected 400 --seed 0 --control benign]
    lenscache build --data prompts.jsonl --packing padded --seq-len 80 --out prompts.zarr
    lenscache anomaly detect prompts.zarr --prompts prompts.jsonl [--lens NAME=DIR …] --out DIR

Every input (the prompts file, the store against it, each lens against the store, --out) is
checked before the features are computed, and outputs are written under a temporary name and
renamed when complete. Registered in the main CLI, whose `main` turns errors into one line.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.group(name="anomaly")
def anomaly() -> None:
    """Prompt-injection detection from lens trajectories (Belrose et al. 2023, section 5)."""


@anomaly.command(name="prompts")
@click.option("--out", required=True, help="JSONL file to write (one prompt per line: text, label, family, group).")
@click.option("--clean", "n_clean", default=400, show_default=True, type=int, help="Clean task prompts.")
@click.option("--injected", "n_injected", default=400, show_default=True, type=int, help="Injected twins.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--control", default="benign", show_default=True, type=click.Choice(["benign", "none"]),
              help="benign: each clean prompt carries a benign sentence as long as its twin's injection "
              "(length-matched); none: nothing (injected prompts are then longer).")  # fmt: skip
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
def prompts_cmd(out: str, n_clean: int, n_injected: int, seed: int, control: str, overwrite: bool) -> None:
    """Write clean task prompts and the same prompts with an injected instruction."""
    from lenscache.analysis.injection import prompts, write_jsonl

    where = Path(out)
    if where.is_dir():
        raise click.UsageError(f"--out {out} is a directory; give a file name ending in .jsonl")
    if where.exists() and not overwrite:
        raise click.UsageError(f"--out {out} already exists; pass --overwrite to replace it")
    if not where.parent.is_dir():
        raise click.UsageError(f"--out {out}: the directory {where.parent} does not exist; nothing was written")
    rows = prompts(n_clean, n_injected, seed, control)
    write_jsonl(rows, where)
    click.echo(f"wrote {len(rows)} prompts ({n_clean} clean, {n_injected} injected, control {control}) to {out}; "
               f"next: lenscache build --data {out} --packing padded --seq-len 80 --out STORE")  # fmt: skip


@anomaly.command(name="detect")
@click.argument("store")
@click.option("--prompts", "prompts_path", required=True, help="The prompts file STORE was built from.")
@click.option("--lens", "lens_dirs", multiple=True, help="Fitted lens directory, or NAME=DIR; repeatable (logit lens always).")
@click.option("--out", required=True, help="Directory to write: anomaly.json, anomaly.md, anomaly.png, features.npz.")
@click.option("--seed", default=0, show_default=True, type=int, help="Group split, detectors and bootstrap.")
@click.option("--train-fraction", default=0.5, show_default=True, type=float, help="Share of groups for training.")
@click.option("--bootstrap", "n_boot", default=2000, show_default=True, type=int, help="Bootstrap resamples for the CI.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out directory.")
@click.option("--no-progress", is_flag=True)
def detect_cmd(store: str, prompts_path: str, lens_dirs: tuple[str, ...], out: str, **kw) -> None:
    """Features from STORE's lens trajectories; detectors fitted on clean prompts; AUROC with 95% CI."""
    import time

    from lenscache.analysis.anomaly import (
        check_out,
        check_prompts_match,
        detect,
        group_split,
        lens_layers,
        markdown,
        prompt_features,
        write_outputs,
    )
    from lenscache.analysis.injection import read_jsonl
    from lenscache.errors import DataError
    from lenscache.fit.lens import Lens
    from lenscache.reader import open_store
    from lenscache.tools.cli import _lens_args

    started = time.perf_counter()
    check_out(out, kw["overwrite"])
    if kw["n_boot"] < 1:
        raise DataError(f"--bootstrap must be at least 1, got {kw['n_boot']}")
    rows = read_jsonl(prompts_path)
    group_split(rows, kw["train_fraction"], kw["seed"])  # enough prompts on each side, before any work
    st = open_store(store)
    lenses = {name: Lens.load(path) for name, path in _lens_args(lens_dirs).items()}
    lens_layers(st, lenses)
    check_prompts_match(st, rows)
    features = prompt_features(st, lenses, device=kw["device"], progress=not kw["no_progress"])
    result = detect(st, rows, features, seed=kw["seed"], train_fraction=kw["train_fraction"], n_boot=kw["n_boot"],
                    prompts_path=str(prompts_path))  # fmt: skip
    result.seconds = time.perf_counter() - started
    write_outputs(result, features, rows, out, overwrite=kw["overwrite"])
    click.echo(markdown(result))
    click.echo(f"wrote {out}/anomaly.json, anomaly.md, anomaly.png, features.npz ({result.seconds:.1f} s)")
