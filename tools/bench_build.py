"""Benchmark `lenscache build` against the bare forward pass of the same model, batch and tokens.

    python -m lenscache.tools.bench_build [--tokens 16384] [--rounds 6] [--glibc-default-malloc] [--seq-len 512]
                                          [--model M] [--data D] [--out bench-results/build.json] [--smoke]

Prints and writes (JSON):
- throughput ratio = build tokens/s ÷ bare forward tokens/s over the same tokens and batches,
  measured in this one run: rounds of (bare forward, build) alternating which goes first, so
  drift and noise from other tenants of a shared machine fall on both; ratio of summed times.
  The build side is the passes (forward, reductions, encoding, writes: `BuildSummary.seconds`);
- what a user waits for: a build of --tokens in a fresh process, timed from launch to exit and
  split into interpreter start-up and imports, setup (model load, tokenization, head check, store
  layout), the passes, and the finish; the in-process rounds' setup is reported too;
- peak RSS of a build of N tokens and of 4N tokens, each in a fresh child process;
- stored bytes per token per layer and the residual compression ratio.
Data: ../shared/data/wikitext-2-raw/wiki.test.raw when present, else the built-in corpus.
`--smoke`: a tiny random model (or --model), the built-in corpus, tiny sizes; seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import torch

from lenscache.cache import build as build_module
from lenscache.cache.build import (
    DEFAULT_TOKENS_PER_BATCH,
    BuildConfig,
    BuildSummary,
    build_store,
    writes_between_passes,
)
from lenscache.cache.host_memory import keep_freed_memory
from lenscache.cache.model import ModelSpec, load_model
from lenscache.cache.text import DataSpec, pack_tokens
from lenscache.tools.inspect_store import describe
from lenscache.tools.machine import describe_machine
from lenscache.tools.smoke import SMOKE_DATA, add_smoke_args, scratch_dir, smoke_model, write_result

WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


# the real run's sizes, and the smoke run's (seconds on a tiny model)
REAL = {"tokens": 16384, "rounds": 6, "seq_len": 512, "rss_tokens": 4096}
SMOKE = {"tokens": 512, "rounds": 2, "seq_len": 32, "rss_tokens": 128}
# setup phases: functions `build_store` calls, timed by wrapping them (they still run as they are)
PHASES = {"load_model": "model_load", "pack_tokens": "tokenize", "_check_head": "head_check", "_run": "run"}


def data_spec(data: str | None = None, doc_regex: str | None = None) -> DataSpec:
    if data is not None:
        return DataSpec(data, doc_regex=doc_regex)
    if WIKITEXT.exists():
        return DataSpec(str(WIKITEXT), doc_regex=r"^ = [^=]")
    return DataSpec("builtin:stdlib-docstrings")


@contextlib.contextmanager
def phase_timer() -> Iterator[dict[str, float]]:
    """Record (start, end) of each of `build_store`'s PHASES while the context is open."""
    marks: dict[str, float] = {}
    originals = {name: getattr(build_module, name) for name in PHASES}

    def timed(name: str, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            marks[f"{name}_start"] = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                marks[f"{name}_end"] = time.perf_counter()

        return wrapper

    for name, fn in originals.items():
        setattr(build_module, name, timed(name, fn))
    try:
        yield marks
    finally:
        for name, fn in originals.items():
            setattr(build_module, name, fn)


def timed_build(cfg: BuildConfig) -> tuple[BuildSummary, dict[str, float]]:
    """`build_store(cfg)` and its wall time split into setup (by phase), passes and finish."""
    with phase_timer() as marks:
        t0 = time.perf_counter()
        summary = build_store(cfg)
        wall = time.perf_counter() - t0
    setup = marks["_run_start"] - t0
    phases = {PHASES[n]: marks[f"{n}_end"] - marks[f"{n}_start"] for n in PHASES if n != "_run"}
    times = {
        "wall_seconds": wall,
        "setup_seconds": setup,
        **{f"setup_{k}_seconds": v for k, v in phases.items()},
        # store layout (creating the arrays, writing the tokens and head), head extraction, checks
        "setup_layout_and_other_seconds": setup - sum(phases.values()),
        "passes_seconds": summary.seconds,
        "finish_seconds": wall - setup - summary.seconds,
    }
    return summary, times


def bare_forward(model, tokens: np.ndarray, batch: int) -> float:
    """Seconds for plain forward passes (logits included, no hooks) over `tokens`."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b0 in range(0, len(tokens), batch):
            ids = torch.from_numpy(tokens[b0 : b0 + batch].astype(np.int64)).to(model.device)
            model(input_ids=ids, use_cache=False).logits.float()
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def child_build(cfg: BuildConfig) -> dict:
    """Run in a fresh process: one build, reporting its own peak RSS and where its time went."""
    # process start to here: interpreter start-up and imports, which a user of the CLI waits for too
    startup = time.time() - psutil.Process().create_time()
    summary, times = timed_build(cfg)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "tokens": summary.n_tokens,
        "peak_rss_mib": peak_kib / 1024,
        "tokens_per_second": summary.tokens_per_second,
        "startup_and_imports_seconds": startup,
        **times,
    }


def run_child(tokens: int, seq_len: int, out: str, extra: list[str]) -> dict:
    """`child_build` in a fresh process, plus its wall time from launch to exit."""
    cmd = [sys.executable, "-m", "lenscache.tools.bench_build", "--child", "--tokens", str(tokens),
           "--seq-len", str(seq_len), "--store", out, *extra]  # fmt: skip
    t0 = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    process_wall = time.perf_counter() - t0
    if result.returncode != 0:
        raise RuntimeError(f"child build failed ({' '.join(cmd)}):\n{result.stderr[-3000:]}")
    out_ = json.loads(result.stdout.strip().splitlines()[-1])
    out_["process_wall_seconds"] = process_wall
    return out_


def user_wait(child: dict) -> dict:
    """What a user of `lenscache build` waits for, from a fresh process's timings."""
    keys = ("process_wall_seconds", "startup_and_imports_seconds", "setup_seconds")
    phases = {k: v for k, v in child.items() if k.startswith("setup_") and k != "setup_seconds"}
    rest = child["process_wall_seconds"] - child["startup_and_imports_seconds"] - child["wall_seconds"]
    return {
        "tokens": child["tokens"],
        **{k: round(child[k], 3) for k in keys},
        **{k: round(v, 3) for k, v in phases.items()},
        "passes_seconds": round(child["passes_seconds"], 3),
        "finish_seconds": round(child["finish_seconds"], 3),
        "exit_seconds": round(rest, 3),  # interpreter shutdown, and launch before the clock started
        "wall_tokens_per_second": child["tokens"] / child["process_wall_seconds"],
        "passes_share_of_wall": child["passes_seconds"] / child["process_wall_seconds"],
    }


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=None, help=f"tokens per round (default {REAL['tokens']})")
    ap.add_argument(
        "--rounds", type=int, default=None, help=f"rounds of (bare forward, build), alternating order "
        f"(default {REAL['rounds']})"
    )  # fmt: skip
    ap.add_argument("--seq-len", type=int, default=None, help=f"default {REAL['seq_len']}")
    ap.add_argument(
        "--rss-tokens", type=int, default=None, help=f"N for the memory comparison (N vs 4N; {REAL['rss_tokens']})"
    )
    ap.add_argument("--data", default=None, help="data spec (default: WikiText-2 test when present, else the built-in corpus)")
    ap.add_argument("--doc-regex", default=None, help="with --data: the document separator")
    ap.add_argument("--out", default=None, help="JSON output (default bench-results/build.json)")
    ap.add_argument(
        "--glibc-default-malloc",
        action="store_true",
        help="skip keep_freed_memory() (what `lenscache build` applies), to measure its effect",
    )
    add_smoke_args(ap)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for key, value in (SMOKE if args.smoke else REAL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.smoke and args.data is None:
        args.data = SMOKE_DATA
    # As `lenscache build` does, before anything is timed: both sides run with the same allocator.
    allocator_tuned = False if args.glibc_default_malloc else keep_freed_memory()
    model_name = args.model or "default"

    def config(out: str, tokens: int, fsync: bool = True) -> BuildConfig:
        return BuildConfig(
            out=out,
            model=ModelSpec(model_name),
            data=data_spec(args.data, args.doc_regex),
            seq_len=args.seq_len,
            max_tokens=tokens,
            progress=False,
            overwrite=True,
            fsync=fsync,
        )

    if args.child:
        print(json.dumps(child_build(config(args.store, args.tokens))))
        return None

    work = scratch_dir("bench-build")
    if args.smoke:
        model_name = smoke_model(args.model, work)
    loaded = load_model(ModelSpec(model_name))
    batch = max(1, DEFAULT_TOKENS_PER_BATCH // args.seq_len)
    tokens = pack_tokens(data_spec(args.data, args.doc_regex), loaded.tokenizer, args.seq_len, args.tokens).tokens
    n_tokens = tokens.size
    bare_forward(loaded.model, tokens[:batch], batch)  # warm-up
    store = str(work / "throughput.zarr")
    # Rounds alternate which goes first, so slow drift and bursts of noise from other tenants of
    # the machine fall on both sides; the ratio is of the summed times.
    # A third step per round builds without fsync (`--no-fsync`): what the durable commits cost.
    bare_s, build_s, build_times, no_fsync_s = [], [], [], []
    steps = ("bare", "build", "no-fsync")
    for r in range(args.rounds):
        for step in steps[r % 3 :] + steps[: r % 3]:
            if step == "bare":
                bare_s.append(bare_forward(loaded.model, tokens, batch))
            elif step == "no-fsync":
                no_fsync_s.append(timed_build(config(store, args.tokens, fsync=False))[0].seconds)
            else:
                summary, times = timed_build(config(store, args.tokens))
                build_s.append(summary.seconds)
                build_times.append(times)
    forward_tps = n_tokens * args.rounds / sum(bare_s)
    build_tps = n_tokens * args.rounds / sum(build_s)
    info = describe(store)
    rows_written = "between forward passes" if writes_between_passes(loaded.device) else "by a writer thread"
    del loaded

    extra = ["--model", model_name, "--data", data_spec(args.data, args.doc_regex).source]
    if args.doc_regex or args.data is None and WIKITEXT.exists():
        extra += ["--doc-regex", data_spec(args.data, args.doc_regex).doc_regex]
    if args.glibc_default_malloc:
        extra.append("--glibc-default-malloc")
    small = run_child(args.rss_tokens, args.seq_len, str(work / "rss-small.zarr"), extra)
    large = run_child(4 * args.rss_tokens, args.seq_len, str(work / "rss-large.zarr"), extra)
    # a fresh process building one round's tokens, as `lenscache build` would (the larger RSS child
    # is one when the sizes agree, as they do by default)
    cold = large if large["tokens"] == n_tokens else run_child(args.tokens, args.seq_len, str(work / "cold.zarr"), extra)
    result = {
        "benchmark": "build_vs_forward",
        "smoke": args.smoke,
        "machine": describe_machine(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "keep_freed_memory": allocator_tuned,
        "rows_written": rows_written,
        "model": "SmolLM2-135M-Instruct (embedded default)" if model_name == "default" else model_name,
        "data": data_spec(args.data, args.doc_regex).source,
        "seq_len": args.seq_len,
        "batch_sequences": batch,
        "tokens": int(n_tokens),
        "rounds": args.rounds,
        "forward_seconds_per_round": bare_s,
        "build_seconds_per_round": build_s,
        "ratio_per_round": [b / d for b, d in zip(bare_s, build_s, strict=True)],
        "forward_tokens_per_second": forward_tps,
        "build_tokens_per_second": build_tps,
        "throughput_ratio": build_tps / forward_tps,
        "target_throughput_ratio": 0.90,
        # build with fsync'ed commits (the default) / build without: the cost of durability
        "no_fsync_build_seconds_per_round": no_fsync_s,
        "fsync_throughput_ratio": sum(no_fsync_s) / sum(build_s),
        "fsync_ratio_per_round": [n / b for n, b in zip(no_fsync_s, build_s, strict=True)],
        # the same rounds' builds timed whole: setup (model load, tokenization, ...) + passes + finish
        "build_wall_seconds_per_round": [t["wall_seconds"] for t in build_times],
        "build_setup_seconds_per_round": [t["setup_seconds"] for t in build_times],
        "user_wait": user_wait(cold),
        "rss_small": small,
        "rss_large": large,
        "rss_growth_4x_tokens": large["peak_rss_mib"] / small["peak_rss_mib"] - 1,
        "target_rss_growth": 0.10,
        "bytes_per_token_per_layer": info["bytes_per_token_per_layer"],
        "raw_bytes_per_token_per_layer": info["raw_bytes_per_token_per_layer"],
        "compression_ratio_resid": info["compression_ratio_resid"],
        "final_distribution_bytes_per_token": info["final_distribution_bytes_per_token"],
    }
    out = write_result(result, args.out, "build", args.smoke)
    wait = result["user_wait"]
    print(
        f"build {result['build_tokens_per_second']:.0f} tok/s vs bare forward {forward_tps:.0f} tok/s: "
        f"ratio {result['throughput_ratio']:.3f} (target >= 0.90; per round "
        f"{', '.join(f'{x:.3f}' for x in result['ratio_per_round'])})\n"
        f"fsync'ed commits: build throughput {result['fsync_throughput_ratio']:.3f} of a build without fsync "
        f"(per round {', '.join(f'{x:.3f}' for x in result['fsync_ratio_per_round'])})\n"
        f"a fresh `build` of {wait['tokens']} tokens: {wait['process_wall_seconds']:.1f} s from launch to exit = "
        f"{wait['startup_and_imports_seconds']:.1f} start-up and imports + {wait['setup_seconds']:.1f} setup "
        f"(model {wait['setup_model_load_seconds']:.1f}, tokenize {wait['setup_tokenize_seconds']:.1f}, "
        f"head check {wait['setup_head_check_seconds']:.1f}, layout and other "
        f"{wait['setup_layout_and_other_seconds']:.1f}) + {wait['passes_seconds']:.1f} passes + "
        f"{wait['finish_seconds'] + wait['exit_seconds']:.1f} finish and exit\n"
        f"peak RSS {small['peak_rss_mib']:.0f} MiB at {small['tokens']} tokens, {large['peak_rss_mib']:.0f} MiB at "
        f"{large['tokens']} tokens: growth {100 * result['rss_growth_4x_tokens']:+.1f}% (target < 10%)\n"
        f"residual {result['bytes_per_token_per_layer']:.0f} B/token/layer stored "
        f"({result['raw_bytes_per_token_per_layer']} raw, {result['compression_ratio_resid']:.2f}x); "
        f"final distribution {result['final_distribution_bytes_per_token']:.0f} B/token\n"
        f"wrote {out}"
    )
    return result


if __name__ == "__main__":
    main()
