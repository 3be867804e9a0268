"""The `lenscache` command line."""

from __future__ import annotations

import json
import sys

import click

from lenscache import __version__
from lenscache.encoding import DEFAULT_PRESET, PRESETS
from lenscache.errors import LensCacheError
from lenscache.tools.analysis_cli import depth, trajectory
from lenscache.tools.anomaly_cli import anomaly
from lenscache.tools.cbe_cli import cbe
from lenscache.tools.copy_cli import copy_cmd
from lenscache.tools.linrep_cli import linrep
from lenscache.tools.report_cli import report


def parse_layers(text: str | None) -> list[int] | None:
    """'all' | '0,4,8' | '0-10' | '0-30:5' (every 5th) -> boundary indices (None = all)."""
    if text is None or text.strip() == "all":
        return None
    layers: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                span, _, step = part.partition(":")
                lo, hi = span.split("-")
                layers.extend(range(int(lo), int(hi) + 1, int(step or 1)))
            else:
                layers.append(int(part))
    except ValueError:
        raise click.BadParameter(
            f"cannot parse {text!r}; use e.g. 'all', '0,4,8', '0-10' or '0-30:5'"
        ) from None
    if not layers:
        raise click.BadParameter(f"{text!r} selects no layer boundary (a range runs low-high)")
    return layers


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lenscache")
def cli() -> None:
    """lenscache: cache a model's residual stream once, fit lenses and analyse from the store."""


@cli.command()
@click.option(
    "--model",
    default="default",
    show_default=True,
    help="Hub id, local model directory, local .gguf file, or 'default' (embedded SmolLM2-135M).",
)
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    help="Compute dtype: auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16",
)
@click.option("--trust-remote-code", is_flag=True, help="Allow the model repository's own code to run.")
@click.option(
    "--data",
    default="builtin:stdlib-docstrings",
    show_default=True,
    help="Text file, JSONL, Parquet, directory, saved HF dataset, hf:NAME, or builtin:stdlib-docstrings.",
)
@click.option("--text-field", default="text", show_default=True, help="Column/field holding the text.")
@click.option("--split", default="train", show_default=True, help="Hugging Face dataset split.")
@click.option("--data-config", default=None, help="Hugging Face dataset config name.")
@click.option(
    "--doc-regex",
    default=None,
    help="Plain text: a new document starts at each line matching this regex (e.g. '^ = [^=]').",
)
@click.option("--out", required=True, help="Store location: a local path or an fsspec URL.")
@click.option("--seq-len", default=512, show_default=True, type=int, help="Tokens per packed sequence.")
@click.option("--max-tokens", default=None, type=int, help="Stop after this many tokens (whole sequences).")
@click.option("--layers", default=None, help="Layer boundaries to store: all | 0,4,8 | 0-10 | 0-30:5.")
@click.option(
    "--codec",
    default=DEFAULT_PRESET,
    show_default=True,
    type=click.Choice(sorted(PRESETS)),
    help="Residual storage preset.",
)
@click.option(
    "--topk", default=16, show_default=True, type=int, help="Top-k next-token log-probs to store (0: none)."
)
@click.option("--full-logits", is_flag=True, help="Also store full logits (vocab values per token: large).")
@click.option(
    "--batch-size", default=None, type=int, help="Sequences per forward pass (default: 4096 tokens)."
)
@click.option(
    "--seqs-per-chunk", default=None, type=int, help="Sequences per chunk (default: about 4 MiB chunks)."
)
@click.option(
    "--bos/--no-bos",
    "prepend_bos",
    default=None,
    help="Prepend BOS to every sequence (default: as the tokenizer does).",
)
@click.option("--separator", default=None, help="Token placed between documents (default: EOS).")
@click.option(
    "--packing",
    default="packed",
    show_default=True,
    type=click.Choice(["packed", "padded"]),
    help="packed: documents cut into one token stream; padded: one document per sequence, right-padded "
    "(prompt sets: the store records each one's length).",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted build of the same store.")
@click.option("--overwrite", is_flag=True, help="Replace an existing lenscache store at --out.")
@click.option(
    "--break-lock",
    is_flag=True,
    help="Take over the store's writer lock even when its holder cannot be checked (another host).",
)
@click.option(
    "--no-fsync",
    is_flag=True,
    help="Local stores: do not wait for each row to reach the device before committing it (faster on "
    "slow disks; a killed process still resumes, an OS crash or power loss may then lose rows).",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=int,
    help="Build with this many Dask worker processes (a local cluster; each loads the model; "
    "needs lenscache[distributed]). 1: in this process.",
)
@click.option(
    "--scheduler",
    default=None,
    help="Build on the workers of an existing Dask cluster: its scheduler address (tcp://HOST:PORT).",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def build(**kw) -> None:
    """Run the model once over the data and write a Zarr v3 activation store."""
    from lenscache.cache.build import BuildConfig, build_store
    from lenscache.cache.host_memory import keep_freed_memory
    from lenscache.cache.model import ModelSpec
    from lenscache.cache.text import DataSpec

    cfg = BuildConfig(
        out=kw["out"],
        model=ModelSpec(kw["model"], kw["revision"], kw["device"], kw["dtype"], kw["trust_remote_code"]),
        data=DataSpec(kw["data"], kw["text_field"], kw["split"], kw["data_config"], kw["doc_regex"]),
        seq_len=kw["seq_len"],
        max_tokens=kw["max_tokens"],
        layers=parse_layers(kw["layers"]),
        codec=kw["codec"],
        topk=kw["topk"],
        full_logits=kw["full_logits"],
        batch_size=kw["batch_size"],
        seqs_per_chunk=kw["seqs_per_chunk"],
        prepend_bos=kw["prepend_bos"],
        separator=kw["separator"],
        packing=kw["packing"],
        resume=kw["resume"],
        overwrite=kw["overwrite"],
        fsync=not kw["no_fsync"],
        break_lock=kw["break_lock"],
        progress=not kw["no_progress"],
        workers=kw["workers"],
        scheduler=kw["scheduler"],
    )
    keep_freed_memory()  # this process exists to build: reuse freed memory batch after batch
    s = build_store(cfg)
    summary = {
        "store": s.url,
        "sequences": s.n_sequences,
        "tokens": s.n_tokens,
        "tokens_built_this_run": s.tokens_built,
        "resumed_from_sequence": s.resumed_from,
        "seconds": round(s.seconds, 2),
        "tokens_per_second": round(s.tokens_per_second, 1),
        "bytes_written": s.bytes_written,
        "compression_ratio": round(s.compression_ratio, 3),
        "head_max_abs_error": s.head_max_abs_error,
    }
    if s.workers is not None:  # a distributed build: the cluster, its workers, tasks and their timings
        summary["workers"] = s.workers
    if kw["as_json"]:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(
            f"built {s.url}: {s.n_sequences:,} sequences, {s.n_tokens:,} tokens "
            f"({s.tokens_built:,} this run{f', resumed at sequence {s.resumed_from}' if s.resumed_from else ''}) "
            f"in {s.seconds:,.1f} s = {s.tokens_per_second:,.0f} tokens/s; wrote {s.bytes_written / 2**20:,.1f} MiB, "
            f"compression {s.compression_ratio:.2f}x; head check max |Δlogit| {s.head_max_abs_error:.2e}"
            + (f"; {s.workers['tasks']} rows on {s.workers['workers']} Dask workers ({s.workers['scheduler']})"
               if s.workers is not None else "")
        )


@cli.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def info(store: str, as_json: bool) -> None:
    """What is in STORE: contents, sizes, provenance."""
    from lenscache.tools.inspect_store import describe, render

    description = describe(store)
    click.echo(json.dumps(description, indent=2, default=str) if as_json else render(description))


@cli.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def verify(store: str, as_json: bool) -> None:
    """Check every chunk's checksum, shapes and metadata of STORE; exit 0 only when clean."""
    from lenscache.verify import verify_store

    report = verify_store(store)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "store": report.url,
                    "ok": report.ok,
                    "problems": report.problems,
                    "chunks_checked": report.chunks_checked,
                },
                indent=2,
            )
        )
    else:
        for problem in report.problems:
            click.echo(f"BAD  {problem}")
        state = "clean" if report.ok else f"{len(report.problems)} problem(s)"
        click.echo(
            f"{report.url}: {state}; {report.chunks_checked} chunks in {report.arrays_checked} arrays checked"
        )
    sys.exit(0 if report.ok else 1)


def _check_out_dir(out: str, option: str = "--out") -> None:
    """Refuse an output directory that cannot be one, before any long work."""
    from pathlib import Path

    where = Path(out)
    if where.exists() and not where.is_dir():
        raise click.UsageError(f"{option} {out} exists and is not a directory; nothing was written")


def _check_lens_out(out: str, overwrite: bool, resume: bool) -> None:
    from pathlib import Path

    from lenscache.fit.lens import CONFIG_FILE

    _check_out_dir(out)
    where = Path(out)
    if (where / CONFIG_FILE).exists() and not (overwrite or resume):
        raise click.UsageError(f"--out {out} already holds a lens; pass --overwrite to replace it")
    if where.is_dir() and any(where.iterdir()) and not (where / CONFIG_FILE).exists() and not resume:
        if not (where / "checkpoint").exists():
            raise click.UsageError(f"--out {out} exists, is not empty and holds no lens; nothing was written")


@cli.command()
@click.argument("store")
@click.option("--out", required=True, help="Lens directory to write (lens.safetensors + lens.json).")
@click.option(
    "--lens",
    "kind",
    default="tuned",
    show_default=True,
    type=click.Choice(["tuned", "affine", "logit"]),
    help="tuned: KL-trained (Belrose et al.); affine: closed-form least squares; logit: no fit.",
)
@click.option(
    "--init",
    default="identity",
    show_default=True,
    type=click.Choice(["identity", "affine"]),
    help="Start a tuned lens from the identity (the paper) or from the closed-form affine lens.",
)
@click.option("--layers", default=None, help="Boundaries to fit (default: all but the last).")
@click.option("--max-tokens", default=None, type=int, help="Train on at most this many tokens.")
@click.option("--epochs", default=1, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--batch-tokens", default=512, show_default=True, type=int, help="Tokens per SGD step.")
@click.option("--buffer-tokens", default=16384, show_default=True, type=int, help="Shuffle buffer (memory bound).")
@click.option("--lr", default=1.0, show_default=True, type=float, help="Effective learning rate (tuned).")
@click.option("--weight-decay", default=1e-3, show_default=True, type=float)
@click.option("--loss", default="kl", show_default=True, type=click.Choice(["kl", "ce"]))
@click.option("--ridge", default=None, type=float, help="Affine: fixed relative ridge (default: chosen per layer).")
@click.option("--checkpoint-every", default=50, show_default=True, type=int, help="Steps between checkpoints.")
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda | cuda:N")
@click.option("--resume", is_flag=True, help="Continue a killed fit from its last checkpoint in --out.")
@click.option("--overwrite", is_flag=True, help="Replace a lens already in --out.")
@click.option("--no-progress", is_flag=True)
def fit(store: str, out: str, kind: str, init: str, **kw) -> None:
    """Fit a lens from STORE alone (no model): streamed out of core with Dask."""
    from lenscache.fit.affine import fit_affine
    from lenscache.fit.lens import Lens
    from lenscache.fit.stream import StreamSpec
    from lenscache.fit.tuned import TunedConfig, fit_tuned
    from lenscache.reader import open_store

    _check_lens_out(out, kw["overwrite"], kw["resume"])
    st = open_store(store)
    layers = parse_layers(kw["layers"])
    if kind == "logit":
        layers = layers or [b for b in st.layers if b != st.meta.n_layers]
        lens = Lens.identity(st, layers, kind="logit", method="logit")
    elif kind == "affine":
        lens = fit_affine(st, layers, ridge=kw["ridge"], progress=not kw["no_progress"])
    else:
        start = fit_affine(st, layers, ridge=kw["ridge"], progress=not kw["no_progress"]) if init == "affine" else None
        spec = StreamSpec(
            layers=layers,
            batch_tokens=kw["batch_tokens"],
            buffer_tokens=kw["buffer_tokens"],
            seed=kw["seed"],
            epochs=kw["epochs"],
            max_tokens=kw["max_tokens"],
        )
        cfg = TunedConfig(
            lr=kw["lr"],
            weight_decay=kw["weight_decay"],
            loss=kw["loss"],
            checkpoint_every=kw["checkpoint_every"],
            device=kw["device"],
        )
        lens = fit_tuned(st, out, spec, cfg, init=start, resume=kw["resume"], progress=not kw["no_progress"])
    if kind != "tuned":  # fit_tuned saves its own lens (and removes its checkpoint)
        lens.save(out)
    info = lens.config.fit
    click.echo(
        f"wrote {kind} lens for {len(lens.layers)} layers to {out}"
        + (f" ({info['tokens']:,} tokens" if "tokens" in info else " (")
        + (f", {info['seconds']:.1f} s)" if "seconds" in info else ")")
    )


def _lens_args(items: tuple[str, ...]) -> dict[str, str]:
    """'DIR' or 'NAME=DIR' -> {name: dir}."""
    from pathlib import Path

    named: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item.rstrip("/")).name, item
        if name in named or name == "logit":
            raise click.BadParameter(f"lens name {name!r} is used twice; name them NAME=DIR")
        named[name] = path
    return named


@cli.command(name="eval")
@click.argument("store")
@click.option("--lens", "lens_dirs", multiple=True, help="Lens directory, or NAME=DIR; repeatable.")
@click.option("--out", required=True, help="Report directory: metrics.json, metrics.md, metrics.png.")
@click.option("--split", default="held_out", show_default=True, type=click.Choice(["held_out", "train", "all"]))
@click.option("--layers", default=None, help="Boundaries to evaluate (default: all but the last).")
@click.option("--max-tokens", default=None, type=int, help="Evaluate on at most this many tokens.")
@click.option("--batch-tokens", default=256, show_default=True, type=int)
@click.option(
    "--tokenizer",
    default="auto",
    show_default=True,
    help="For bits per byte: 'auto' uses the store's own; 'none' skips; or, for a store built without "
    "one, the model's tokenizer directory, .gguf file or hub id.",
)
@click.option("--device", default="cpu", show_default=True)
@click.option("--no-plot", is_flag=True)
@click.option("--no-progress", is_flag=True)
def evaluate_cmd(store: str, lens_dirs: tuple[str, ...], out: str, **kw) -> None:
    """Per-layer KL, cross-entropy, entropy and top-1 agreement of the logit lens and each --lens."""
    from lenscache.analysis.evaluate import evaluate
    from lenscache.analysis.report import table, write_report
    from lenscache.fit.lens import Lens
    from lenscache.reader import open_store

    _check_out_dir(out)
    st = open_store(store)
    lenses = {name: Lens.load(path) for name, path in _lens_args(lens_dirs).items()}
    report = evaluate(
        st,
        lenses,
        layers=parse_layers(kw["layers"]),
        split=kw["split"],
        max_tokens=kw["max_tokens"],
        batch_tokens=kw["batch_tokens"],
        tokenizer=_tokenizer(st, kw["tokenizer"]),
        device=kw["device"],
        progress=not kw["no_progress"],
    )
    write_report(report, out, with_plot=not kw["no_plot"])
    click.echo(table(report, "kl"))
    click.echo(f"KL in nats per token; full report in {out}/metrics.md")


def _tokenizer(st, choice: str):
    """The tokenizer for counting bytes, or None (with a note saying what to pass) when the store has none."""
    if choice == "none":
        return None
    from lenscache.tokenizer import MissingTokenizer, store_tokenizer

    try:
        return store_tokenizer(st, None if choice == "auto" else choice)
    except MissingTokenizer as exc:
        click.echo(f"note: {exc}; bits per byte are omitted", err=True)
        return None


@cli.group()
def lens() -> None:
    """Move lenses between lenscache and the tuned-lens library's format."""


@lens.command(name="export")
@click.argument("lens_dir")
@click.option("--to", "to", required=True, help="Directory to write config.json + params.pt into.")
def lens_export(lens_dir: str, to: str) -> None:
    """Write LENS_DIR in the tuned-lens format."""
    from lenscache.fit.lens import Lens
    from lenscache.fit.tuned_lens_format import export_tuned_lens

    _check_out_dir(to, "--to")
    click.echo(f"wrote {export_tuned_lens(Lens.load(lens_dir), to)}")


@lens.command(name="import")
@click.argument("tuned_lens_dir")
@click.option("--store", required=True, help="A store of the lens's model (its identity is checked).")
@click.option("--out", required=True, help="lenscache lens directory to write.")
def lens_import(tuned_lens_dir: str, store: str, out: str) -> None:
    """Read a tuned-lens directory (config.json + params.pt) as a lenscache lens."""
    from lenscache.fit.tuned_lens_format import import_tuned_lens
    from lenscache.reader import open_store

    click.echo(f"wrote {import_tuned_lens(tuned_lens_dir, open_store(store)).save(out)}")


for command in (cbe, trajectory, depth, anomaly, linrep, copy_cmd, report):
    cli.add_command(command)

INTERRUPTED = "interrupted; an interrupted build continues with --resume"


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; every expected error becomes one line on stderr and a non-zero exit, never a traceback."""
    try:
        cli.main(args=argv, prog_name="lenscache", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo(INTERRUPTED, err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except LensCacheError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:  # a path that cannot be read or written, a full disk: the user's to fix
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) not in str(exc) else ""
        click.echo(f"error: {exc}{where}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo(INTERRUPTED, err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
