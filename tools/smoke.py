"""What every benchmark's ``--smoke`` mode shares: a tiny model, the built-in corpus, tiny stores.

A smoke run takes seconds, needs no network and no ../shared data, and goes through the same code
as the real run with tiny sizes, so a benchmark that no longer runs fails in the tests
(tests/test_benchmarks.py) instead of when someone next reproduces its figures.
"""

from __future__ import annotations

import argparse
import atexit
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from lenscache.cache.build import BuildConfig, build_store
from lenscache.cache.model import ModelSpec
from lenscache.cache.text import DataSpec

SMOKE_DATA = "builtin:stdlib-docstrings"  # on every machine, no download


def add_smoke_args(ap: argparse.ArgumentParser) -> None:
    """`--smoke` and `--model`, the same on every benchmark."""
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, a tiny random model (or --model), the built-in corpus: seconds, offline; "
        "writes --out (default: a temporary directory, never bench-results/)",
    )
    ap.add_argument("--model", default=None, help="model directory (smoke default: a tiny random Llama)")


def out_path(out: str | None, name: str, smoke: bool) -> Path:
    """Where the JSON goes: --out, else bench-results/NAME.json, else (smoke) a temporary file."""
    if out is not None:
        return Path(out)
    if smoke:  # a smoke run must never replace the figures of a real one
        return Path(tempfile.gettempdir()) / "lenscache-smoke" / f"{name}.json"
    return Path("bench-results") / f"{name}.json"


def scratch_dir(name: str) -> Path:
    """A fresh temporary directory for a benchmark's stores, removed when the process exits (also on an
    error): a real run's stores are hundreds of MB and are not worth keeping by accident."""
    path = Path(tempfile.mkdtemp(prefix=f"lenscache-{name}-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def write_result(result: dict, out: str | None, name: str, smoke: bool) -> Path:
    """Write a benchmark's JSON where `out_path` says; the path written."""
    path = out_path(out, name, smoke)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path


def tiny_model(work: Path) -> str:
    """A tiny random Llama with its tokenizer, saved under `work` (the test suite's own maker)."""
    from lenscache.tools.tiny_models import make_tiny_model  # transformers' model classes: only when needed

    return str(make_tiny_model(work / "tiny-llama", "llama"))


def smoke_model(model: str | None, work: Path) -> str:
    """`model` if given, else a fresh tiny random model."""
    return model if model is not None else tiny_model(work)


def smoke_store(out: Path, model: str, seqs: int, seq_len: int = 32, seqs_per_chunk: int = 4) -> str:
    """A store of `seqs` sequences of the built-in corpus, built by `build_store` as any store is."""
    build_store(
        BuildConfig(
            out=str(out),
            model=ModelSpec(model),
            data=DataSpec(SMOKE_DATA),
            seq_len=seq_len,
            max_tokens=seqs * seq_len,
            seqs_per_chunk=seqs_per_chunk,
            progress=False,
            overwrite=True,
        )
    )
    return str(out)


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_in_child(module: str, function: str, *args) -> dict:
    """`lenscache.tools.<module>.<function>(*args)` in a fresh interpreter, so that its peak RSS is its own;
    the JSON-able dict it returns."""
    code = (
        f"import json; from lenscache.tools.{module} import {function}; "
        f"print('RESULT ' + json.dumps({function}(*{list(args)!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])
