"""Streamed prediction depth: peak memory at N and 4N tokens, and the figures of a real run.

    python -m lenscache.tools.bench_depth --store STORE --lens LENS_DIR --tokens 16384   # a SmolLM2 store
    python -m lenscache.tools.bench_depth --smoke                                        # tiny model, seconds

Each size runs `write_depth` (logit lens + --lens, Parquet + JSON + PNG) in a fresh child process
and reports its peak RSS (ru_maxrss), wall time and summary; only the number of tokens differs
(same store, layers, batch). The promise: peak_rss(4N) / peak_rss(N) <= 1.10, because memory is
bounded by a minibatch of the stream, not by the store. The 4N run's summary (histogram, Spearman ρ
of depth with the final loss and with token frequency) is the real run's result.
"""

from __future__ import annotations

import argparse
import json
import time

from lenscache.tools.smoke import peak_rss_mib, run_in_child

REAL = {"tokens": 16384, "batch_tokens": 512}
SMOKE = {"tokens": 256, "batch_tokens": 64}


def rss_run(store: str, lens: str, tokens: int, batch_tokens: int, out: str) -> dict:
    """One streamed depth pass in this process (run in a child, see `run_in_child`)."""
    from lenscache.analysis.depth import write_depth
    from lenscache.fit.lens import Lens
    from lenscache.reader import open_store

    st = open_store(store)
    lenses = {"logit": None, **({} if lens == "logit" else {"lens": Lens.load(lens)})}
    started = time.perf_counter()
    summary = write_depth(st, lenses, out, max_tokens=tokens, batch_tokens=batch_tokens, progress=False)
    return {
        "tokens": summary.tokens,
        "seconds": round(time.perf_counter() - started, 2),
        "peak_rss_MiB": round(peak_rss_mib(), 1),
        "summary": summary.to_dict(),
    }


def main(argv: list[str] | None = None) -> dict:
    from lenscache.tools.smoke import add_smoke_args, scratch_dir, smoke_model, smoke_store, write_result

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", help="a store of the model (real run)")
    ap.add_argument("--lens", default="logit", help="lens directory, or 'logit' (the logit lens is always included)")
    for name, value in REAL.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"(real: {value})")
    ap.add_argument("--out", default=None, help="JSON (default bench-results/depth.json)")
    add_smoke_args(ap)
    args = ap.parse_args(argv)
    sizes = {**(SMOKE if args.smoke else REAL)}
    sizes.update({k: getattr(args, k) for k in REAL if getattr(args, k) is not None})

    from lenscache.reader import open_store
    from lenscache.tools.machine import describe_machine

    work = scratch_dir("bench-depth")
    if args.smoke:
        model = smoke_model(args.model, work)
        store_url = smoke_store(work / "smoke.zarr", model, seqs=4 * sizes["tokens"] // 32, seq_len=32)
        lens = "logit"
    else:
        if not args.store:
            ap.error("--store is needed (or --smoke)")
        store_url, lens = args.store, args.lens
    st = open_store(store_url)
    tokens = sizes["tokens"]
    available = st.n_sequences * st.seq_len
    if 4 * tokens > available:
        ap.error(f"--tokens {tokens}: 4x that is more than the store's {available:,} tokens")
    small = run_in_child("bench_depth", "rss_run", store_url, lens, tokens, sizes["batch_tokens"], str(work / "small"))
    big = run_in_child("bench_depth", "rss_run", store_url, lens, 4 * tokens, sizes["batch_tokens"], str(work / "big"))
    ratio = big["peak_rss_MiB"] / small["peak_rss_MiB"]
    result = {
        "smoke": bool(args.smoke),
        "machine": describe_machine(),
        "store": store_url if not args.smoke else "smoke",
        "lens": lens if not args.smoke else "logit",
        "settings": sizes,
        "rss": {
            "small": {k: v for k, v in small.items() if k != "summary"},
            "big": {k: v for k, v in big.items() if k != "summary"},
            "peak_rss_ratio_4x_tokens": round(ratio, 4),
            "peak_rss_growth_4x_tokens": round(ratio - 1, 4),
            "within_10_percent": ratio <= 1.10,
        },
        "tokens_per_second_4x": round(big["tokens"] / big["seconds"], 1) if big["seconds"] else None,
        "summary_4x": big["summary"],
    }
    out = write_result(result, args.out, "depth", args.smoke)
    print(json.dumps({"rss": result["rss"], "tokens_per_second_4x": result["tokens_per_second_4x"]}, indent=2))
    print(f"peak RSS ratio 4N/N: {ratio:.4f}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
