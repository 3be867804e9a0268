"""The `lenscache` command line."""

from __future__ import annotations

import json
import sys

import click

from lenscache import __version__
from lenscache.encoding import DEFAULT_PRESET, PRESETS
from lenscache.errors import LensCacheError


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
@click.option("--resume", is_flag=True, help="Continue an interrupted build of the same store.")
@click.option("--overwrite", is_flag=True, help="Replace an existing lenscache store at --out.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def build(**kw) -> None:
    """Run the model once over the data and write a Zarr v3 activation store."""
    from lenscache.cache.build import BuildConfig, build_store
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
        resume=kw["resume"],
        overwrite=kw["overwrite"],
        progress=not kw["no_progress"],
    )
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
    if kw["as_json"]:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(
            f"built {s.url}: {s.n_sequences:,} sequences, {s.n_tokens:,} tokens "
            f"({s.tokens_built:,} this run{f', resumed at sequence {s.resumed_from}' if s.resumed_from else ''}) "
            f"in {s.seconds:,.1f} s = {s.tokens_per_second:,.0f} tokens/s; wrote {s.bytes_written / 2**20:,.1f} MiB, "
            f"compression {s.compression_ratio:.2f}x; head check max |Δlogit| {s.head_max_abs_error:.2e}"
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


def main() -> None:
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted; an interrupted build continues with --resume", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except LensCacheError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted; an interrupted build continues with --resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
