"""Every subcommand on bad input: a non-zero exit, one line naming the problem, no traceback, nothing written.

The cases run in-process through `lenscache.tools.cli.main` (the console script's entry point), so an
exception that escapes its handlers fails the test with that exception; two run as real processes to
check what a shell sees.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import TRAIN_TEXT

import lenscache.cache.build as build_module
import lenscache.cache.host_memory as host_memory
from lenscache.cache.build import BuildConfig, build_store
from lenscache.cache.model import ModelSpec
from lenscache.cache.text import DataSpec
from lenscache.fit.affine import fit_affine
from lenscache.reader import open_store
from lenscache.tools.cli import main


@pytest.fixture(scope="module")
def world(tmp_path_factory, llama_dir, tiny_model_factory) -> dict[str, Path]:
    """A Llama store with a 2-layer affine lens, a GPT-2 store with its own lens, a text file."""
    root = tmp_path_factory.mktemp("bad_input")
    text = root / "t.txt"
    text.write_text("\n".join(TRAIN_TEXT * 8), encoding="utf-8")
    paths = {"root": root, "text": text, "llama": llama_dir}
    for name, model in (("store", llama_dir), ("gpt2_store", tiny_model_factory("gpt2"))):
        out = root / f"{name}.zarr"
        build_store(BuildConfig(out=str(out), model=ModelSpec(str(model)), data=DataSpec(str(text)),
                                seq_len=16, max_tokens=256, progress=False))  # fmt: skip
        paths[name] = out
    fit_affine(open_store(paths["store"]), [0, 1]).save(root / "lens_01")
    fit_affine(open_store(paths["gpt2_store"])).save(root / "gpt2_lens")
    (root / "empty.txt").write_text("  \n\n ")
    (root / "fields.jsonl").write_text('{"body": "no text field here"}\n')
    return paths


def run_main(argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: False)  # not in the test process
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out = capsys.readouterr()
    return exit_info.value.code, out.out + out.err


# (arguments with {placeholders}, words the message must contain)
BAD = [
    # build
    ("build --model {llama} --data {root}/missing.txt --out {new}", "data source not found"),
    ("build --model {llama} --data {root}/empty.txt --out {new} --seq-len 8", "no documents"),
    ("build --model {llama} --data {root}/fields.jsonl --out {new} --seq-len 8", "no field 'text'"),
    ("build --model {llama} --data {text} --out {new} --seq-len 0", "seq_len must be at least 2"),
    ("build --model {llama} --data {text} --out {new} --seq-len 8 --max-tokens 4", "smaller than one sequence"),
    ("build --model {llama} --data {text} --out {new} --seq-len 8 --batch-size 0", "batch_size (--batch-size)"),
    ("build --model {llama} --data {text} --out {new} --seq-len 8 --seqs-per-chunk 0", "seqs_per_chunk"),
    ("build --model {llama} --data {text} --out {new} --seq-len 8 --topk -1", "topk (--topk)"),
    ("build --model {llama} --data {text} --out {new} --seq-len 8 --layers 99", "outside 0..3"),
    ("build --model {llama} --data {text} --out {new} --seq-len 8 --layers 5-2", "selects no layer"),
    ("build --model {llama} --data {text} --out {new} --seq-len 8 --layers x", "cannot parse"),
    ("build --model {llama} --data {text} --out {new} --seq-len 8 --dtype int8", "unknown dtype"),
    ("build --model {llama} --data {text} --out {new} --seq-len 8 --device tpu", "unknown device"),
    ("build --model {llama} --data {text} --out {new} --seq-len 8 --doc-regex (", "not a valid regular"),
    ("build --model {llama} --data {text} --out {new} --seq-len 8 --separator @@@@", "not a token"),
    ("build --model {llama} --data {text} --out {new} --seq-len 4096", "larger than the model's context"),
    ("build --model {root}/none --data {text} --out {new}", "no such model path"),
    ("build --model {text} --data {text} --out {new}", "is a file, not a model"),
    ("build --model {root}/x.gguf --data {text} --out {new}", "GGUF file"),
    ("build --model {llama} --data {text} --out {text} --seq-len 8", "not a lenscache store"),
    ("build --model {llama} --data {text} --out {store} --seq-len 8", "already holds a store"),
    ("build --model {llama} --data {text} --out {store} --seq-len 8 --resume", "different settings"),
    ("build --model {llama} --data {text} --out {new} --resume --overwrite", "exclude each other"),
    # info, verify
    ("info {root}/nope.zarr", "no store at"),
    ("info {text}", "not a lenscache store"),
    ("info {llama}", "not a lenscache store"),
    ("verify {root}/nope.zarr", "no store at"),
    ("verify {llama}", "not a lenscache store"),
    # fit
    ("fit {root}/nope.zarr --out {new}", "no store at"),
    ("fit {llama} --out {new}", "not a lenscache store"),
    ("fit {store} --out {new} --layers 50", "layer 50 is not in this store"),
    ("fit {store} --out {new} --lens affine --layers 50", "layer 50 is not in this store"),
    ("fit {store} --out {new} --lens logit --layers 50", "layer 50 is not in this store"),
    ("fit {store} --out {new} --max-tokens 0", "max_tokens (--max-tokens)"),
    ("fit {store} --out {new} --batch-tokens 0", "batch_tokens (--batch-tokens)"),
    ("fit {store} --out {new} --epochs 0", "epochs (--epochs)"),
    ("fit {store} --out {new} --lr -1", "lr (--lr) must be > 0"),
    ("fit {store} --out {new} --device cuda:7", "cuda"),
    ("fit {store} --out {text}", "not a directory"),
    ("fit {store} --out {root}/lens_01", "already holds a lens"),
    # eval
    ("eval {store} --lens {root}/gpt2_lens --out {new}", "fitted on model"),
    ("eval {store} --lens {root}/lens_01 --out {new}", "has no translator for layers [2]"),
    ("eval {store} --lens {root}/nope --out {new}", "not a lens directory"),
    ("eval {store} --lens {llama} --out {new}", "not a lens directory"),
    ("eval {store} --lens a={root}/lens_01 --lens a={root}/lens_01 --out {new}", "used twice"),
    ("eval {store} --out {new} --layers 50", "layer 50 is not in this store"),
    ("eval {store} --out {new} --max-tokens 0", "max_tokens (--max-tokens)"),
    ("eval {store} --out {new} --device cuda:7", "cuda"),
    ("eval {store} --out {text}", "not a directory"),
    ("eval {root}/nope.zarr --out {new}", "no store at"),
    # cbe
    ("cbe {store} --lens logit --out {new} --k 65", "k (--k) must be between 1 and d_model = 64"),
    ("cbe {store} --lens {root}/lens_01 --out {new} --layers 2", "no translator for layer 2"),
    ("cbe {store} --lens {root}/gpt2_lens --out {new}", "fitted on model"),
    ("cbe {root}/nope.zarr --lens logit --out {new}", "no store at"),
    ("cbe {store} --lens logit --out {new} --mode nope", "Invalid value for '--mode'"),
    # lens export / import
    ("lens export {root}/nope --to {new}", "not a lens directory"),
    ("lens export {root}/lens_01 --to {text}", "not a directory"),
    ("lens export {root}/lens_01 --to {new}", "needs translators for layers"),
    ("lens import {root}/nope --store {store} --out {new}", "not a tuned-lens directory"),
    ("lens import {root}/lens_01 --store {store} --out {new}", "not a tuned-lens directory"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[a.split(" --")[0][:40] + " | " + m for a, m in BAD])
def test_bad_input_gets_one_clear_line_and_a_nonzero_exit(world, args, message, capsys, monkeypatch, tmp_path):
    new = tmp_path / "new"
    before = sorted(p.relative_to(world["root"]) for p in world["root"].rglob("*"))
    argv = args.format(new=new, **{k: str(v) for k, v in world.items()}).split()
    code, output = run_main(argv, capsys, monkeypatch)
    assert code not in (0, None), output
    assert message in output, output
    assert "Traceback" not in output
    assert not new.exists(), f"{new} was written"
    assert sorted(p.relative_to(world["root"]) for p in world["root"].rglob("*")) == before


@pytest.mark.parametrize(
    "args",
    [
        "build --data {root}/missing.txt --out {new} --seq-len 8",
        "build --data {text} --out {new} --seq-len 0",
        "build --data {text} --out {new} --batch-size 0",
        "build --data {text} --out {new} --device tpu",
        "build --data {text} --out {store} --seq-len 8",
    ],
)
def test_cheap_build_errors_come_before_the_model_loads(world, args, capsys, monkeypatch, tmp_path):
    """The default model takes 30 s to load (larger ones minutes): a bad option must not wait for it."""

    def no_model(spec):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(build_module, "load_model", no_model)
    argv = args.format(new=tmp_path / "new", **{k: str(v) for k, v in world.items()}).split()
    code, output = run_main(argv, capsys, monkeypatch)
    assert code == 2 and output.startswith("error: "), output


def test_a_shell_sees_exit_2_and_one_line(world, tmp_path):
    cli = [sys.executable, "-m", "lenscache.tools.cli"]
    r = subprocess.run([*cli, "eval", str(world["store"]), "--lens", str(world["root"] / "lens_01"),
                        "--out", str(tmp_path / "r")], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: lens 'lens_01' has no translator for layers [2] of this store; "
        "choose layers it has (layers=…, --layers): [0, 1]"
    ]
    r = subprocess.run([*cli, "fit", str(world["store"]), "--out", str(tmp_path / "l"), "--lr", "-1"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr and "lr (--lr)" in r.stderr
