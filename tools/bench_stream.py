"""Streaming-reader benchmark, one run, JSON out.

1. The same tuned-lens fit (same seed, same minibatches) fed from the Zarr store and fed from the
   same data preloaded in RAM, alternating over several rounds: throughput ratio (target >= 0.90).
   By default each fit is one pass over the store's train split, so that the reader does all of
   its work inside the fit (the first fill, then every later block read ahead while the lens
   computes), with a one-block shuffle buffer; the seconds spent inside block reads are timed
   and reported next to the fit's time.
2. Read throughput of the stream alone, in MB/s of decompressed residuals.
3. Peak RSS of a full pass over a store and over a store 4x larger (target: within 10%), each in
   a fresh process. The reader holds at most the shuffle buffer plus read-ahead + 1 blocks; the
   smaller store must be larger than that for the comparison to mean anything.
4. The fit's achieved FLOP/s as a fraction of a plain matmul's FLOP/s measured in this run; the
   fit's FLOPs are counted as the unembedding forward plus its input-gradient backward,
   4 * d_model * vocab per token per layer (the translators' own d_model^2 terms are ignored).

    python -m lenscache.tools.bench_stream --store SMALL --big-store BIG --out bench-results/stream.json

`--smoke`: the same steps on two tiny stores built for the run (a tiny random model, or --model,
over the built-in corpus); seconds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from lenscache.fit.stream import BlockSource, MemorySource, ResidualStream, StreamSpec, ZarrSource
from lenscache.fit.tuned import TunedConfig, fit_tuned
from lenscache.reader import Store, open_store
from lenscache.tools.machine import describe_machine
from lenscache.tools.smoke import (
    add_smoke_args,
    peak_rss_mib,
    run_in_child,
    scratch_dir,
    smoke_model,
    smoke_store,
    write_result,
)

# the real run's sizes, and the smoke run's (seconds on two tiny stores of 4-sequence chunks)
REAL = {"rss_buffer_tokens": 4096, "batch_tokens": 512, "buffer_tokens": 4096}
SMOKE = {"rss_buffer_tokens": 128, "batch_tokens": 32, "buffer_tokens": 128}
SMOKE_SEQS = 16  # sequences of 32 tokens in the small smoke store; the big one has 4x


class TimedSource:
    """A block source that times the reads of the one it wraps (the same reads, only counted)."""

    def __init__(self, source: BlockSource):
        self.source = source
        self.storage_dtype = source.storage_dtype
        self.seconds = 0.0
        self.blocks = 0

    def read(self, seqs: range, layers: list[int], with_final: bool) -> dict:
        t0 = time.perf_counter()
        block = self.source.read(seqs, layers, with_final)
        self.seconds += time.perf_counter() - t0
        self.blocks += 1
        return block


def alternating_fits(
    runs: dict[str, tuple[Store, BlockSource]],
    spec: StreamSpec,
    rounds: int,
    around: Callable[[str], AbstractContextManager] | None = None,
) -> tuple[dict[str, list[float]], bool]:
    """The same tuned-lens fit (same seed, same minibatches) from each (store, source) of `runs`, in
    reversed order every other round so that drift hits all alike; each fit inside `around(name)` when
    given. Returns each run's seconds per round and whether every round's lenses were bit-identical."""
    per_round: dict[str, list[float]] = {name: [] for name in runs}
    same = True
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            order = list(runs) if r % 2 == 0 else list(runs)[::-1]
            weights = []
            for name in order:
                store, source = runs[name]
                with around(name) if around is not None else nullcontext():
                    t = time.perf_counter()
                    lens = fit_tuned(store, Path(tmp) / name, spec, TunedConfig(checkpoint_every=0),
                                     progress=False, source=source)  # fmt: skip
                    per_round[name].append(time.perf_counter() - t)
                weights.append(lens.weight.detach())
            same = same and all(torch.equal(weights[0], w) for w in weights[1:])
            print(f"round {r}: " + ", ".join(f"{n} {per_round[n][-1]:.1f} s" for n in runs), flush=True)
    return per_round, same


def pass_rss(url: str, buffer_tokens: int, read_ahead: int, batch_tokens: int) -> dict:
    """One full pass over the train split (no compute): tokens, seconds, MB/s, peak RSS."""
    store = open_store(url)
    spec = StreamSpec(batch_tokens=batch_tokens, buffer_tokens=buffer_tokens, read_ahead=read_ahead)
    stream = ResidualStream(store, spec)
    itemsize = {"bfloat16": 2, "float16": 2, "float32": 4}.get(store.storage_dtype, 1)
    start, n, stored, delivered = time.perf_counter(), 0, 0, 0
    for batch in stream:
        n += batch.n_tokens
        stored += batch.resid.numel() * itemsize + batch.final.numel() * 4
        delivered += batch.resid.numel() * 4 + batch.final.numel() * 4
    seconds = time.perf_counter() - start
    return {
        "store": url,
        "sequences": store.n_sequences,
        "tokens": n,
        "layers": len(stream.layers),
        "buffer_tokens": buffer_tokens,
        "read_ahead": read_ahead,
        "block_tokens": store.meta.build.seqs_per_chunk * store.seq_len,
        "seconds": round(seconds, 2),
        "decompressed_MB_per_s": round(stored / seconds / 1e6, 1),
        "float32_MB_per_s_delivered": round(delivered / seconds / 1e6, 1),
        "peak_rss_MiB": round(peak_rss_mib(), 1),
    }


def matmul_flops(d: int, vocab: int, tokens: int, repeats: int = 5) -> float:
    x, w = torch.randn(tokens, d), torch.randn(vocab, d)
    x @ w.T
    start = time.perf_counter()
    for _ in range(repeats):
        x @ w.T
    return 2 * tokens * d * vocab * repeats / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=None, help="store for the fit comparison and the small RSS pass")
    ap.add_argument("--big-store", default=None, help="a store ~4x larger, for the RSS comparison")
    ap.add_argument(
        "--steps", type=int, default=None, help="tuned-lens steps per fit (default: one pass over the train split)"
    )
    ap.add_argument("--rounds", type=int, default=2, help="fits per source, alternating zarr/memory")
    ap.add_argument(
        "--rss-buffer-tokens",
        type=int,
        default=None,
        help=f"shuffle buffer for the RSS passes: both stores must exceed buffer + (read-ahead + 1) blocks "
        f"({REAL['rss_buffer_tokens']})",
    )
    ap.add_argument("--rss-read-ahead", type=int, default=1)
    ap.add_argument("--batch-tokens", type=int, default=None, help=f"default {REAL['batch_tokens']}")
    ap.add_argument(
        "--buffer-tokens", type=int, default=None, help=f"shuffle buffer of the fits ({REAL['buffer_tokens']})"
    )
    ap.add_argument("--out", default=None, help="JSON output (default bench-results/stream.json)")
    add_smoke_args(ap)
    args = ap.parse_args(argv)
    for key, value in (SMOKE if args.smoke else REAL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    work = scratch_dir("bench-stream")
    if args.smoke and args.store is None:
        model = smoke_model(args.model, work)
        args.store = smoke_store(work / "small.zarr", model, SMOKE_SEQS)
        args.big_store = args.big_store or smoke_store(work / "big.zarr", model, 4 * SMOKE_SEQS)
    if args.store is None:
        ap.error("--store is required (or --smoke)")

    store = open_store(args.store)
    # the first torch.optim optimiser imports torch._dynamo (~4 s): pay that before any timing
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    store.unembed  # noqa: B018  (loaded once, cached on the store, shared by every timed run)
    meta = store.meta
    result: dict = {
        "benchmark": "stream",
        "smoke": args.smoke,
        "machine": describe_machine(),
        "store": args.store,
        "model": meta.model.get("id"),
    }

    # 1 + 4: the same fit from the store and from RAM, alternating so that drift hits both alike
    if args.steps is None:  # one pass over the train split: every block is read inside the fit
        train_tokens = ResidualStream(store, StreamSpec()).tokens_per_epoch()
        args.steps = -(-train_tokens // args.batch_tokens)
    spec = StreamSpec(
        batch_tokens=args.batch_tokens, buffer_tokens=args.buffer_tokens, max_tokens=args.steps * args.batch_tokens
    )
    stream = ResidualStream(store, spec)
    t = time.perf_counter()
    memory = TimedSource(MemorySource(store, stream.layers, stream.seqs))
    preload_s = time.perf_counter() - t
    # the store's reader, as `ResidualStream` makes it when given no source, with its reads timed
    zarr = TimedSource(ZarrSource(store, spec.workers))
    per_round, same = alternating_fits({"zarr": (store, zarr), "memory": (store, memory)}, spec, args.rounds)
    timings = {name: sum(seconds) for name, seconds in per_round.items()}
    tokens = args.rounds * stream.total_tokens()  # the last minibatch of a pass may be short
    n_layers = len(stream.layers)
    fit_flops = 4 * meta.d_model * meta.vocab_size * n_layers * tokens / timings["zarr"]
    mm = matmul_flops(meta.d_model, meta.vocab_size, args.batch_tokens)
    result["fit"] = {
        "rounds": args.rounds,
        "steps_per_fit": args.steps,
        "tokens_per_fit": stream.total_tokens(),
        "batch_tokens": args.batch_tokens,
        "layers": n_layers,
        "seconds_zarr": round(timings["zarr"], 2),
        "seconds_memory": round(timings["memory"], 2),
        "preload_seconds": round(preload_s, 2),
        "buffer_tokens": args.buffer_tokens,
        "blocks_read_zarr": zarr.blocks,
        # seconds inside block reads (decompression and decode; after the first block of each fit
        # they run on the read-ahead thread while the lens computes)
        "read_seconds_zarr": round(zarr.seconds, 3),
        "read_seconds_memory": round(memory.seconds, 3),
        "read_share_of_fit_zarr": round(zarr.seconds / timings["zarr"], 4),
        "throughput_ratio_zarr_over_memory": round(timings["memory"] / timings["zarr"], 4),
        "same_result": same,
        "fit_GFLOP_per_s": round(fit_flops / 1e9, 1),
        "matmul_GFLOP_per_s": round(mm / 1e9, 1),
        "fit_fraction_of_matmul": round(fit_flops / mm, 3),
    }
    del memory

    # 2 + 3: read throughput and peak RSS, each store in a fresh process
    small = run_in_child("bench_stream", "pass_rss", args.store, args.rss_buffer_tokens, args.rss_read_ahead, args.batch_tokens)
    result["read"] = small
    if args.big_store:
        big = run_in_child("bench_stream", "pass_rss", args.big_store, args.rss_buffer_tokens, args.rss_read_ahead, args.batch_tokens)
        result["rss"] = {
            "small": small,
            "big": big,
            "token_ratio": round(big["tokens"] / small["tokens"], 2),
            "peak_rss_growth": round(big["peak_rss_MiB"] / small["peak_rss_MiB"] - 1, 4),
        }
    result["checks"] = {
        "streaming_ratio_at_least_0_90": result["fit"]["throughput_ratio_zarr_over_memory"] >= 0.90,
        "rss_growth_under_10_percent": (abs(result["rss"]["peak_rss_growth"]) < 0.10) if args.big_store else None,
    }
    out = write_result(result, args.out, "stream", args.smoke)
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
