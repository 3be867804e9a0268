"""Benchmark a distributed build (``lenscache build --workers N``) against the one-process build of the
same model, data and settings: throughput, overhead per row, and whether the stores are identical.

    python -m lenscache.tools.bench_workers [--model default] [--max-tokens 16384] [--seq-len 512] [--workers 2]
                                            [--layers all] [--json-out bench-results/workers.json] [--smoke]

Both builds run in this process, one after the other, into fresh stores (the N-worker one starts its own
LocalCluster of N processes of one thread each). Throughput is `BuildSummary.tokens_per_second`: tokens
over the seconds of the passes. For the N-worker build those run from the first row submitted to the last
commit; the workers load their model copies before (while this process loads its own and lays out the
store, then waits for the last of them), so that cost, and the cluster's start-up, fall in `wall_seconds`.
On a machine whose cores the one-process build already uses, N workers share those same cores, so the
ratio cannot pass 1; what the run shows is the cost of distributing:

- ``overhead_s_per_row`` = (seconds_N - seconds_1) / rows, rows being the rows of `seqs_per_chunk`
  sequences (one task each): what the distributed passes cost beyond the one-process ones, per row
  (scheduling, each task reopening nothing but checking the lock, the driver writing the small arrays,
  one thread per worker instead of two per pass, and an uneven last round when rows % N != 0);
- ``startup_overhead_s`` = (wall_N - seconds_N) - (wall_1 - seconds_1): the once-per-build cost
  (starting the cluster, worker model loads not hidden behind this process's setup, closing it).

``identical``: every file of the two stores is byte for byte the same (the root metadata without its
timestamps). Data: ../shared/data/wikitext-2-raw/wiki.test.raw when present, else the built-in corpus.
`--smoke`: a tiny random model (or --model), the built-in corpus, tiny sizes; seconds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from lenscache.cache.build import BuildConfig, BuildSummary, build_store
from lenscache.cache.host_memory import keep_freed_memory
from lenscache.cache.model import ModelSpec
from lenscache.tools.bench_build import data_spec
from lenscache.tools.smoke import SMOKE_DATA, add_smoke_args, scratch_dir, smoke_model, write_result

REAL = {"max_tokens": 16384, "seq_len": 512}
SMOKE = {"max_tokens": 32 * 12, "seq_len": 32, "seqs_per_chunk": 4}


def store_files(root: Path) -> dict[str, bytes]:
    """Every file of a local store, byte for byte; the root metadata without its timestamps (and no
    ``*.partial`` file: a write in progress, never part of the store)."""
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
             if p.is_file() and not p.name.endswith(".partial")}  # fmt: skip
    meta = json.loads(files.pop("zarr.json"))
    info = meta["attributes"]["lenscache"]
    info.pop("created", None)
    for key in ("started", "finished"):
        info["build"].pop(key, None)
    files["zarr.json"] = json.dumps(meta, sort_keys=True).encode()
    return files


def differing_files(a: Path, b: Path) -> list[str]:
    """Files that one store has and the other lacks, or that differ in a byte."""
    x, y = store_files(a), store_files(b)
    return sorted(name for name in x.keys() | y.keys() if x.get(name) != y.get(name))


def _timed(cfg: BuildConfig) -> tuple[BuildSummary, float]:
    t0 = time.perf_counter()
    summary = build_store(cfg)
    return summary, time.perf_counter() - t0


def measure_workers(
    model: str = "default",
    max_tokens: int = 4096,
    seq_len: int = 512,
    workers: int = 2,
    out_dir: str | None = None,
    *,
    data: str | None = None,
    layers: list[int] | None = None,
    seqs_per_chunk: int | None = None,
) -> dict:
    """Build the same store in this process and with `workers` Dask workers; their throughputs, the
    distributed overhead per row, and whether the two stores are identical (see the module docstring).

    Stores go under `out_dir` (kept) or a temporary directory (removed). Applies `keep_freed_memory`
    to this process, as ``lenscache build`` does (the workers of the local cluster do it themselves).
    """
    keep_freed_memory()
    work = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="lenscache-bench-workers-"))
    work.mkdir(parents=True, exist_ok=True)
    spec = data_spec(data)
    common = dict(model=ModelSpec(model), data=spec, seq_len=seq_len, max_tokens=max_tokens, layers=layers,
                  seqs_per_chunk=seqs_per_chunk, progress=False, overwrite=True)  # fmt: skip
    try:
        one, wall_1 = _timed(BuildConfig(out=str(work / "one.zarr"), **common))
        many, wall_n = _timed(
            BuildConfig(out=str(work / f"workers-{workers}.zarr"), workers=workers, **common)
        )
        diffs = differing_files(work / "one.zarr", work / f"workers-{workers}.zarr")
    finally:
        if out_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    info = many.workers or {}
    rows = int(info.get("tasks", 0))
    # the workers load their copies while this process lays out the store (preloads), or in a first task
    loads = [
        *info.get("preload_seconds", []),
        *(w["load_seconds"] for w in info.get("per_worker", {}).values()),
    ]
    extra = many.seconds - one.seconds
    return {
        "model": model,
        "data": spec.source,
        "seq_len": seq_len,
        "tokens": one.n_tokens,
        "layers": "all" if layers is None else layers,
        "workers": workers,
        "rows": rows,
        "sequences_per_row": -(-one.n_sequences // rows) if rows else None,
        "tokens_per_s_1": one.tokens_per_second,
        "tokens_per_s_2": many.tokens_per_second,
        "ratio_2_over_1": many.tokens_per_second / one.tokens_per_second,
        "identical": not diffs,
        "differing_files": diffs[:20],
        "overhead_s_per_row": extra / rows if rows else None,
        "startup_overhead_s": (wall_n - many.seconds) - (wall_1 - one.seconds),
        "seconds_1": one.seconds,
        "seconds_2": many.seconds,
        "wall_seconds_1": wall_1,  # model load, tokenization, head check, layout, passes
        "wall_seconds_2": wall_n,  # the same, plus starting and closing the local cluster
        "worker_model_load_seconds": [x for x in loads if x > 0],
        "per_worker": info.get("per_worker", {}),
        "bytes_written_1": one.bytes_written,
        "bytes_written_2": many.bytes_written,
    }


def main(argv: list[str] | None = None) -> dict:
    from lenscache.tools.cli import parse_layers
    from lenscache.tools.machine import describe_machine

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=None, help=f"(real: {REAL['max_tokens']})")
    ap.add_argument("--seq-len", type=int, default=None, help=f"(real: {REAL['seq_len']})")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--layers", default=None, help="all | 0,4,8 | 0-10 | 0-30:5 (default all)")
    ap.add_argument(
        "--seqs-per-chunk", type=int, default=None, help="sequences per row (default: the build's)"
    )
    ap.add_argument("--data", default=None, help="text data (default: WikiText-2 test when present)")
    ap.add_argument("--keep", default=None, help="keep the two stores in this directory")
    ap.add_argument(
        "--out", "--json-out", dest="out", default=None, help="JSON (default bench-results/workers.json)"
    )
    add_smoke_args(ap)
    args = ap.parse_args(argv)
    sizes = dict(SMOKE if args.smoke else REAL)
    for key in ("max_tokens", "seq_len", "seqs_per_chunk"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    work = scratch_dir("bench-workers-model")
    model = smoke_model(args.model, work) if args.smoke else (args.model or "default")
    data = SMOKE_DATA if args.smoke else args.data
    result = measure_workers(model, sizes["max_tokens"], sizes["seq_len"], args.workers, args.keep, data=data,
                             layers=parse_layers(args.layers), seqs_per_chunk=sizes.get("seqs_per_chunk"))  # fmt: skip
    result = {"benchmark": "workers", "smoke": bool(args.smoke), "machine": describe_machine(), **result}
    if args.smoke:
        result["model"] = "tiny random llama" if args.model is None else args.model
    out = write_result(result, args.out, "workers", args.smoke)
    print(
        f"{args.workers} workers / 1 process: {result['tokens_per_s_2']:,.0f} / {result['tokens_per_s_1']:,.0f} "
        f"tokens/s = ratio {result['ratio_2_over_1']:.3f}; overhead {result['overhead_s_per_row']:.2f} s per row "
        f"of {result['rows']}, {result['startup_overhead_s']:.1f} s once (cluster, model loads); "
        f"identical: {result['identical']}"
    )
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
