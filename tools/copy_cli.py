"""`lenscache copy SRC DST`: copy, subset or re-encode a store between any two locations."""

from __future__ import annotations

import json

import click

from lenscache.encoding import PRESETS


def parse_seqs(text: str | None) -> tuple[int, int] | None:
    """'A:B' -> (A, B), sequences A..B-1 of the source's committed ones."""
    if text is None:
        return None
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(start), int(stop)
    except ValueError:
        raise click.BadParameter(f"cannot parse {text!r}; use A:B, e.g. 0:128 (sequences 0 to 127)") from None


@click.command(name="copy")
@click.argument("src")
@click.argument("dst")
@click.option("--layers", default=None, help="Layer boundaries to keep: all | 0,4,8 | 0-10 | 0-30:5 (default: all).")
@click.option("--seqs", default=None, help="Sequences A:B of the source's committed ones (default: all).")
@click.option(
    "--codec",
    default=None,
    type=click.Choice(sorted(PRESETS)),
    help="Re-encode the residual stream with this preset (default: copy the stored values as they are).",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted copy into DST.")
@click.option("--overwrite", is_flag=True, help="Replace a lenscache store at DST.")
@click.option("--break-lock", is_flag=True, help="Take over DST's writer lock even when its holder cannot be checked.")
@click.option("--no-fsync", is_flag=True, help="Local DST: do not wait for each row to reach the device.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def copy_cmd(src: str, dst: str, **kw) -> None:
    """Copy the store SRC to DST (local paths or fsspec URLs such as s3://bucket/path), checking every
    chunk's checksum as it reads; DST is a complete store only when the copy has finished."""
    from lenscache.tools.cli import parse_layers
    from lenscache.tools.copy_store import CopyConfig, copy_store, describe_summary

    cfg = CopyConfig(
        src=src,
        dst=dst,
        layers=parse_layers(kw["layers"]),
        seqs=parse_seqs(kw["seqs"]),
        codec=kw["codec"],
        resume=kw["resume"],
        overwrite=kw["overwrite"],
        break_lock=kw["break_lock"],
        fsync=not kw["no_fsync"],
        progress=not kw["no_progress"],
    )
    summary = copy_store(cfg)
    if kw["as_json"]:
        click.echo(json.dumps(summary.__dict__, indent=2))
    else:
        click.echo(describe_summary(summary))
