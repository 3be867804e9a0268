"""Benchmark `lenscache build` against the bare forward pass of the same model, batch and tokens.

    python -m lenscache.tools.bench_build [--tokens 16384] [--rounds 6] [--glibc-default-malloc] [--seq-len 512] [--out bench-results/build.json]

Prints and writes (JSON):
- throughput ratio = build tokens/s ÷ bare forward tokens/s over the same tokens and batches,
  measured in this one run: rounds of (bare forward, build) alternating which goes first, so
  drift and noise from other tenants of a shared machine fall on both; ratio of summed times;
- peak RSS of a build of N tokens and of 4N tokens, each in a fresh child process;
- stored bytes per token per layer and the residual compression ratio.
Data: ../shared/data/wikitext-2-raw/wiki.test.raw when present, else the built-in corpus.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lenscache.cache.build import DEFAULT_TOKENS_PER_BATCH, BuildConfig, build_store, writes_between_passes
from lenscache.cache.host_memory import keep_freed_memory
from lenscache.cache.model import ModelSpec, load_model
from lenscache.cache.text import DataSpec, pack_tokens
from lenscache.tools.inspect_store import describe

WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def data_spec() -> DataSpec:
    if WIKITEXT.exists():
        return DataSpec(str(WIKITEXT), doc_regex=r"^ = [^=]")
    return DataSpec("builtin:stdlib-docstrings")


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


def child_build(tokens: int, seq_len: int, out: str) -> dict:
    """Run in a fresh process: one build, reporting its own peak RSS."""
    summary = build_store(
        BuildConfig(
            out=out, data=data_spec(), seq_len=seq_len, max_tokens=tokens, progress=False, overwrite=True
        )
    )
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "tokens": summary.n_tokens,
        "peak_rss_mib": peak_kib / 1024,
        "tokens_per_second": summary.tokens_per_second,
    }


def run_child(tokens: int, seq_len: int, out: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "lenscache.tools.bench_build", "--child", "--tokens", str(tokens),
           "--seq-len", str(seq_len), "--store", out, *extra]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per round of the throughput comparison")
    ap.add_argument(
        "--rounds", type=int, default=6, help="rounds of (bare forward, build), alternating order"
    )
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rss-tokens", type=int, default=4096, help="N for the memory comparison (N vs 4N)")
    ap.add_argument("--out", default="bench-results/build.json")
    ap.add_argument(
        "--glibc-default-malloc",
        action="store_true",
        help="skip keep_freed_memory() (what `lenscache build` applies), to measure its effect",
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    # As `lenscache build` does, before anything is timed: both sides run with the same allocator.
    allocator_tuned = False if args.glibc_default_malloc else keep_freed_memory()
    if args.child:
        print(json.dumps(child_build(args.tokens, args.seq_len, args.store)))
        return

    work = Path(tempfile.mkdtemp(prefix="lenscache-bench-"))
    loaded = load_model(ModelSpec())
    batch = max(1, DEFAULT_TOKENS_PER_BATCH // args.seq_len)
    tokens = pack_tokens(data_spec(), loaded.tokenizer, args.seq_len, args.tokens).tokens
    n_tokens = tokens.size
    bare_forward(loaded.model, tokens[:batch], batch)  # warm-up
    store = str(work / "throughput.zarr")
    # Rounds alternate which goes first, so slow drift and bursts of noise from other tenants of
    # the machine fall on both sides; the ratio is of the summed times.
    bare_s, build_s = [], []
    for r in range(args.rounds):
        for step in ("bare", "build") if r % 2 == 0 else ("build", "bare"):
            if step == "bare":
                bare_s.append(bare_forward(loaded.model, tokens, batch))
                continue
            summary = build_store(
                BuildConfig(
                    out=store,
                    data=data_spec(),
                    seq_len=args.seq_len,
                    max_tokens=args.tokens,
                    progress=False,
                    overwrite=True,
                )
            )
            build_s.append(summary.seconds)
    forward_tps = n_tokens * args.rounds / sum(bare_s)
    build_tps = n_tokens * args.rounds / sum(build_s)
    info = describe(store)
    rows_written = "between forward passes" if writes_between_passes(loaded.device) else "by a writer thread"
    del loaded

    extra = ["--glibc-default-malloc"] if args.glibc_default_malloc else []
    small = run_child(args.rss_tokens, args.seq_len, str(work / "rss-small.zarr"), extra)
    large = run_child(4 * args.rss_tokens, args.seq_len, str(work / "rss-large.zarr"), extra)
    result = {
        "benchmark": "build_vs_forward",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "keep_freed_memory": allocator_tuned,
        "rows_written": rows_written,
        "model": "SmolLM2-135M-Instruct (embedded default)",
        "data": data_spec().source,
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
        "rss_small": small,
        "rss_large": large,
        "rss_growth_4x_tokens": large["peak_rss_mib"] / small["peak_rss_mib"] - 1,
        "target_rss_growth": 0.10,
        "bytes_per_token_per_layer": info["bytes_per_token_per_layer"],
        "raw_bytes_per_token_per_layer": info["raw_bytes_per_token_per_layer"],
        "compression_ratio_resid": info["compression_ratio_resid"],
        "final_distribution_bytes_per_token": info["final_distribution_bytes_per_token"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(
        f"build {result['build_tokens_per_second']:.0f} tok/s vs bare forward {forward_tps:.0f} tok/s: "
        f"ratio {result['throughput_ratio']:.3f} (target >= 0.90; per round "
        f"{', '.join(f'{x:.3f}' for x in result['ratio_per_round'])})\n"
        f"peak RSS {small['peak_rss_mib']:.0f} MiB at {small['tokens']} tokens, {large['peak_rss_mib']:.0f} MiB at "
        f"{large['tokens']} tokens: growth {100 * result['rss_growth_4x_tokens']:+.1f}% (target < 10%)\n"
        f"residual {result['bytes_per_token_per_layer']:.0f} B/token/layer stored "
        f"({result['raw_bytes_per_token_per_layer']} raw, {result['compression_ratio_resid']:.2f}x); "
        f"final distribution {result['final_distribution_bytes_per_token']:.0f} B/token\n"
        f"wrote {out}"
    )


if __name__ == "__main__":
    main()
