"""`lenscache linrep`: linear representations from stores (Park et al. 2023; Jiang et al. 2024).

- ``linrep geometry STORE --pairs F.json … --out DIR``: the unembedding geometry of concepts given as
  word pairs (`lenscache.analysis.linrep`), from the store's head; no model runs.
- ``linrep prompts --pairs F.json … --out prompts.jsonl``: prompts whose next word is a pair's base
  or counterfactual word (`lenscache.analysis.concepts`), to build with
  ``lenscache build --packing padded --data prompts.jsonl``.
- ``linrep residual STORE --prompts prompts.jsonl --pairs … [--lens DIR] --out DIR``: embedding vs
  unembedding alignment layer by layer (`lenscache.analysis.linrep_residual`).

Outputs are written to a temporary sibling and renamed into place: --out is absent, the old output
or the new one, never half of one. An existing --out is refused unless --overwrite.
Registered in the main CLI, whose `main` turns errors into one line.
"""

from __future__ import annotations

from pathlib import Path

import click

from lenscache.publish import publish_dir


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise click.UsageError(f"--out {out} already exists; pass --overwrite to replace it (nothing was written)")


@click.group(name="linrep")
def linrep() -> None:
    """Linear representations: unembedding geometry of concepts, prompts for them, residual alignment."""


@linrep.command()
@click.argument("store")
@click.option("--pairs", "pair_files", multiple=True, required=True,
              help="Pair file (JSON list of [base, counterfactual]); repeat for each concept (name = file stem).")
@click.option("--out", required=True, help="Directory to write (geometry.json/.md, orthogonality.png, linearity.png).")
@click.option("--n-random", default=1000, show_default=True, type=click.IntRange(10), help="Random token pairs.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
def geometry(store: str, pair_files: tuple[str, ...], out: str, n_random: int, seed: int, overwrite: bool) -> None:
    """Linearity and orthogonality of concepts in the store's unembedding (Euclidean and causal)."""
    from lenscache.analysis.linrep import geometry_from_store, write_geometry
    from lenscache.reader import open_store

    where = Path(out)
    _refuse_existing(where, overwrite)
    result = geometry_from_store(open_store(store), list(pair_files), n_random=n_random, seed=seed)
    publish_dir(where, lambda tmp: write_geometry(result, tmp))
    for c in result.concepts:
        e, k = result.linearity["euclidean"][c["name"]], result.linearity["causal"][c["name"]]
        click.echo(
            f"{c['name']}: {c['n_usable']}/{c['n_pairs']} pairs usable; AUROC euclidean {e.auroc:.3f}, "
            f"causal {k.auroc:.3f}"
        )
    click.echo(
        f"mean |off-diagonal cosine|: euclidean {result.mean_abs_offdiag['euclidean']:.3f}, "
        f"causal {result.mean_abs_offdiag['causal']:.3f}; wrote {where}"
    )


@linrep.command()
@click.option("--pairs", "pair_files", multiple=True, required=True, help="Pair file; repeat for each concept.")
@click.option("--out", required=True, help="Prompts file to write (JSONL: text, label, concept, pair, target).")
@click.option("--tokenizer-store", default=None,
              help="Take the tokenizer from this store (default: the embedded default model's tokenizer).")
@click.option("--tokenizer", "tokenizer_source", default=None,
              help="Or a tokenizer directory / .gguf file / hub id.")
@click.option("--max-pairs", default=None, type=click.IntRange(1), help="A seeded subset of each concept's pairs.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
def prompts(pair_files: tuple[str, ...], out: str, tokenizer_store: str | None, tokenizer_source: str | None,
            max_pairs: int | None, seed: int, overwrite: bool) -> None:  # fmt: skip
    """Write prompts whose next word is a pair's base (label 0) or counterfactual (label 1) word."""
    from lenscache.analysis.concepts import load_concepts, write_prompts

    where = Path(out)
    if tokenizer_store and tokenizer_source:
        raise click.UsageError("--tokenizer-store and --tokenizer exclude each other")
    if where.is_dir():
        raise click.UsageError(f"--out {where} is a directory; give a file name (nothing was written)")
    _refuse_existing(where, overwrite)
    tok = _tokenizer(tokenizer_store, tokenizer_source)
    concepts = load_concepts(pair_files, tok)
    where.parent.mkdir(parents=True, exist_ok=True)
    n = write_prompts(where, concepts, max_pairs=max_pairs, seed=seed)
    for c in concepts:
        click.echo(f"{c.name}: {c.n_usable}/{len(c.pairs)} pairs usable ({len(c.skipped)} skipped: not single tokens)")
    click.echo(f"wrote {n} prompts to {where}; build them with `lenscache build --packing padded --data {where}`")


def _tokenizer(store: str | None, source: str | None):
    if store is not None:
        from lenscache.reader import open_store

        return open_store(store).tokenizer()
    from lenscache.tokenizer import load_tokenizer

    if source is None:
        from lenscache.cache.model import default_model_dir

        source = str(default_model_dir())
    return load_tokenizer(source)


@linrep.command()
@click.argument("store")
@click.option("--prompts", "prompts_file", required=True, help="The prompts file the store was built from.")
@click.option("--pairs", "pair_files", multiple=True, required=True, help="Pair file of each concept in the prompts.")
@click.option("--lens", "lens_dir", default=None, help="A fitted lens of the store's model (lens.json + .safetensors).")
@click.option("--out", required=True, help="Directory to write (residual.json/.md/.png).")
@click.option("--held-out", default=0.25, show_default=True, type=float, help="Fraction of each concept's pairs held out.")
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(1), help="Probe epochs (passes).")
@click.option("--lr", default=0.01, show_default=True, type=float, help="Probe Adam learning rate.")
@click.option("--l2", default=1e-3, show_default=True, type=float, help="Probe L2 on standardized weights.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1), help="Read threads.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
def residual(store: str, prompts_file: str, pair_files: tuple[str, ...], lens_dir: str | None, out: str,
             held_out: float, epochs: int, lr: float, l2: float, seed: int, workers: int, overwrite: bool) -> None:  # fmt: skip
    """Per layer: class-mean difference and probe vs the unembedding direction (Euclidean and causal)."""
    from lenscache.analysis.concepts import load_concepts, read_prompts
    from lenscache.analysis.linrep import unembedding
    from lenscache.analysis.linrep_residual import ProbeSettings, analyze_residual, write_residual
    from lenscache.fit.lens import Lens
    from lenscache.reader import open_store

    where = Path(out)
    _refuse_existing(where, overwrite)
    st = open_store(store)
    unembedding(st)  # a store without the head fails first
    lens = None
    if lens_dir is not None:
        lens = Lens.load(lens_dir)
        lens.check_compatible(st)
    rows = read_prompts(prompts_file)
    concepts = load_concepts(pair_files, st.tokenizer())
    result = analyze_residual(
        st, rows, concepts, lens=lens, lens_path=lens_dir, held_out_fraction=held_out,
        probe=ProbeSettings(epochs=epochs, lr=lr, l2=l2, seed=seed), seed=seed, workers=workers,
    )  # fmt: skip
    publish_dir(where, lambda tmp: write_residual(result, tmp))
    last = result.layers[-1]
    for name, per in result.table.items():
        r = per[last]
        click.echo(
            f"{name}: layer {last} cos(δ, γ̄) euclidean {r['dom_cos_euclidean']:.3f}, causal {r['dom_cos_causal']:.3f}; "
            f"probe held-out accuracy {r['probe_acc_held_out']:.3f}"
        )
    click.echo(f"wrote {where} ({result.seconds:.1f} s)")


from lenscache.tools.linrep_sim_cli import sim  # noqa: E402

linrep.add_command(sim)
