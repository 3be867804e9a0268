"""Object-storage benchmark: the streaming fit fed from S3 ÷ fed from local disk, one run, JSON out.

The S3 side is a real S3 API server on loopback (`lenscache.tools.s3_loopback`: moto's server in a
child process on 127.0.0.1; it keeps objects in memory), so the ratio measures what object storage
costs the reader in requests and protocol (HTTP, signing, one GET per chunk, no page cache), not a
network's bandwidth or latency: a real service adds those on top.

1. The local store (--store) is copied into the server with `lenscache copy` (timed, requests counted).
2. For each read setting in SETTINGS (Dask threads per block read = `StreamSpec.workers`, blocks read
   ahead = `StreamSpec.read_ahead`, zarr's ``async.concurrency`` = chunk requests in flight per read):
   the same tuned-lens fit as tools/bench_stream.py (same seed, same minibatches; by default one pass
   over the train split, so every block is read inside the fit) fed from the local store and from
   the S3 copy, alternating over --rounds rounds. Reported: throughput ratio S3 ÷ local (pooled, and
   per round for the spread; target >= 0.80), whether both lenses are bit-identical, the seconds
   inside block reads, and the requests the S3 fits sent (requests/s, MB/s).
3. A pass of the stream alone (no compute, bench_stream's `pass_rss`, each in a fresh process):
   read throughput and peak RSS from local disk and from S3.
4. The closed-form affine fit (`lenscache.fit.affine`, read-bound: a d x d product per token) from
   local disk and from S3, alternating: the ratio where reading is nearly all the work.
5. `--workers-build`: also the multi-worker build figures of `lenscache.tools.bench_workers`.

    python -m lenscache.tools.bench_remote --store /tmp/remote-store.zarr --out bench-results/remote.json

`--smoke`: the same steps on a tiny store built for the run (a tiny random model, or --model); seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import zarr

from lenscache.fit.affine import fit_affine
from lenscache.fit.stream import ResidualStream, StreamSpec, ZarrSource
from lenscache.reader import Store, open_store
from lenscache.tools.bench_stream import TimedSource, alternating_fits
from lenscache.tools.machine import describe_machine
from lenscache.tools.s3_loopback import loopback_s3, stats_delta
from lenscache.tools.smoke import (
    SMOKE_DATA,
    add_smoke_args,
    run_in_child,
    scratch_dir,
    smoke_model,
    smoke_store,
    write_result,
)

BUCKET = "lenscache-bench"
TARGET = 0.80
# read settings, least concurrency first: Dask threads per block read, blocks read ahead, zarr's
# async.concurrency, and s3fs's max_concurrency (above 1, s3fs sends a HEAD before every whole-object
# GET to decide whether to split it into ranged GETs: objects over default_block_size, 50 MiB, which
# no chunk is; at 1 that HEAD is skipped). "default" is what `lenscache fit` uses (StreamSpec's, zarr's
# and s3fs's defaults).
SETTINGS: dict[str, dict[str, int]] = {
    "serial": {"workers": 1, "read_ahead": 1, "async_concurrency": 1, "s3fs_max_concurrency": 1},
    "default": {"workers": 2, "read_ahead": 2, "async_concurrency": 10, "s3fs_max_concurrency": 10},
    "default_no_head": {"workers": 2, "read_ahead": 2, "async_concurrency": 10, "s3fs_max_concurrency": 1},
    "wide": {"workers": 4, "read_ahead": 4, "async_concurrency": 32, "s3fs_max_concurrency": 10},
}
REAL = {"batch_tokens": 512, "buffer_tokens": 4096, "rss_buffer_tokens": 4096, "rounds": 3}
SMOKE = {"batch_tokens": 32, "buffer_tokens": 128, "rss_buffer_tokens": 128, "rounds": 1}
SMOKE_SEQS = 16


def copy_into(server, src: str, dst: str) -> dict:
    """`lenscache copy SRC DST` into the server, in a child process (as a user runs it): seconds, requests."""
    import subprocess
    import sys

    before = server.stats()
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lenscache.tools.cli", "copy", src, dst, "--no-progress"], check=True,
                   env=server.env(), capture_output=True, text=True)  # fmt: skip
    seconds = time.perf_counter() - t
    delta = stats_delta(server.stats(), before)
    return {"seconds": round(seconds, 2), **delta, "MB_uploaded": round(delta["bytes_in"] / 1e6, 1)}


def open_s3(url: str, max_concurrency: int | None) -> Store:
    """The store at `url`, its s3fs filesystem made with `max_concurrency` (None: s3fs's default), its
    head loaded (cached on the store, so that no timed fit reads it)."""
    import fsspec
    import s3fs

    conf = fsspec.config.conf.setdefault("s3", {})
    if max_concurrency is None:
        conf.pop("max_concurrency", None)
    else:
        conf["max_concurrency"] = max_concurrency
    s3fs.S3FileSystem.clear_instance_cache()  # a cached filesystem keeps the options it was made with
    store = open_store(url)
    store.unembed  # noqa: B018
    return store


def fit_rounds(server, stores: dict, spec: StreamSpec, setting: dict, rounds: int) -> dict:
    """The same tuned-lens fit from each store, alternating local/s3, under one read setting."""
    sources = {name: TimedSource(ZarrSource(store, spec.workers)) for name, store in stores.items()}
    requests = {"requests": 0, "by_method": {}, "bytes_in": 0, "bytes_out": 0}

    @contextmanager
    def counted(name: str) -> Iterator[None]:
        before = server.stats() if name == "s3" else None
        yield
        if before is not None:
            delta = stats_delta(server.stats(), before)
            for key in ("requests", "bytes_in", "bytes_out"):
                requests[key] += delta[key]
            for m, n in delta["by_method"].items():
                requests["by_method"][m] = requests["by_method"].get(m, 0) + n

    runs = {name: (stores[name], sources[name]) for name in ("local", "s3")}
    with zarr.config.set({"async.concurrency": setting["async_concurrency"]}):
        per_round, same = alternating_fits(runs, spec, rounds, counted)
    local, s3 = sum(per_round["local"]), sum(per_round["s3"])
    ratios = [a / b for a, b in zip(per_round["local"], per_round["s3"], strict=True)]
    return {
        **setting,
        "seconds_local": round(local, 2),
        "seconds_s3": round(s3, 2),
        "seconds_per_round_local": [round(x, 2) for x in per_round["local"]],
        "seconds_per_round_s3": [round(x, 2) for x in per_round["s3"]],
        "throughput_ratio_s3_over_local": round(local / s3, 4),
        "ratio_per_round": [round(x, 4) for x in ratios],
        "ratio_spread": round(max(ratios) - min(ratios), 4),
        "read_seconds_local": round(sources["local"].seconds, 3),
        "read_seconds_s3": round(sources["s3"].seconds, 3),
        "blocks_read_s3": sources["s3"].blocks,
        "same_result": same,
        "s3_requests": requests["requests"],
        "s3_requests_by_method": requests["by_method"],
        "s3_requests_per_s_of_fit": round(requests["requests"] / s3, 1),
        "s3_MB_per_s_of_fit": round(requests["bytes_out"] / s3 / 1e6, 2),
        "s3_requests_per_s_of_read": round(requests["requests"] / max(sources["s3"].seconds, 1e-9), 1),
    }


def affine_rounds(server, stores: dict, rounds: int) -> dict:
    """The closed-form affine fit from each store, alternating: seconds, ratio, requests."""
    per_round: dict[str, list[float]] = {name: [] for name in stores}
    requests, same = 0, True
    for r in range(rounds):
        order = ["local", "s3"] if r % 2 == 0 else ["s3", "local"]
        weights = {}
        for name in order:
            before = server.stats()
            t = time.perf_counter()
            weights[name] = fit_affine(stores[name]).weight.detach()
            per_round[name].append(time.perf_counter() - t)
            if name == "s3":
                requests += stats_delta(server.stats(), before)["requests"]
        same = same and bool(torch.equal(weights["local"], weights["s3"]))
    local, s3 = sum(per_round["local"]), sum(per_round["s3"])
    ratios = [a / b for a, b in zip(per_round["local"], per_round["s3"], strict=True)]
    return {
        "rounds": rounds,
        "seconds_local": round(local, 2),
        "seconds_s3": round(s3, 2),
        "throughput_ratio_s3_over_local": round(local / s3, 4),
        "ratio_per_round": [round(x, 4) for x in ratios],
        "same_result": same,
        "s3_requests": requests,
        "s3_requests_per_s": round(requests / s3, 1),
    }


def workers_build(args) -> dict:
    """The multi-worker build figures (another benchmark's function), or why they are missing."""
    try:
        from lenscache.tools.bench_workers import measure_workers
    except ImportError as exc:
        return {"error": f"lenscache.tools.bench_workers.measure_workers is not available here ({exc})"}
    if args.smoke:  # the smoke run's tiny model (measure_workers' data is its own)
        return measure_workers(model=args.model, max_tokens=256, seq_len=32, workers=2, data=SMOKE_DATA)
    return measure_workers()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=None, help="a local store (copied into the loopback S3 server)")
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="tuned-lens steps per fit (default: one pass over the train split)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="fits per source and setting, alternating local/s3 (3; smoke 1)",
    )
    ap.add_argument(
        "--settings", default=",".join(SETTINGS), help=f"read settings to measure ({', '.join(SETTINGS)})"
    )
    ap.add_argument("--batch-tokens", type=int, default=None, help=f"default {REAL['batch_tokens']}")
    ap.add_argument(
        "--buffer-tokens", type=int, default=None, help=f"shuffle buffer ({REAL['buffer_tokens']})"
    )
    ap.add_argument("--rss-buffer-tokens", type=int, default=None, help="shuffle buffer of the read passes")
    ap.add_argument("--workers-build", action="store_true", help="also run bench_workers' multi-worker build")
    ap.add_argument(
        "--out", "--json-out", dest="out", default=None, help="JSON output (bench-results/remote.json)"
    )
    add_smoke_args(ap)
    args = ap.parse_args(argv)
    for key, value in (SMOKE if args.smoke else REAL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown or not names:
        ap.error(f"--settings: unknown {unknown}; choose from {', '.join(SETTINGS)}")
    work = scratch_dir("bench-remote")
    if args.smoke and args.store is None:
        args.model = smoke_model(args.model, work)
        args.store = smoke_store(work / "small.zarr", args.model, SMOKE_SEQS)
    if args.store is None:
        ap.error("--store is required (or --smoke)")

    # the first torch.optim optimiser imports torch._dynamo (~4 s): pay that before any timing
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    url = f"s3://{BUCKET}/store.zarr"
    with loopback_s3(BUCKET) as server, server.active():
        result: dict = {
            "benchmark": "remote",
            "smoke": args.smoke,
            "machine": describe_machine(),
            "store": args.store,
            "s3_url": url,
            "server": "moto (objects in memory) in a child process on 127.0.0.1; tools/s3_loopback.py",
        }
        print(f"copying {args.store} into {url} ...", flush=True)
        result["copy"] = copy_into(server, args.store, url)
        stores = {"local": open_store(args.store), "s3": open_s3(url, None)}
        stores["local"].unembed  # noqa: B018  (loaded once, cached on the store, outside the timed fits)
        meta = stores["local"].meta
        result["model"] = meta.model.get("id")

        probe = ResidualStream(stores["local"], StreamSpec())
        steps = args.steps or -(-probe.tokens_per_epoch() // args.batch_tokens)
        fit: dict = {
            "rounds": args.rounds,
            "steps_per_fit": steps,
            "batch_tokens": args.batch_tokens,
            "buffer_tokens": args.buffer_tokens,
            "layers": len(probe.layers),
            "block_tokens": meta.build.seqs_per_chunk * meta.seq_len,
            "settings": {},
        }
        for name in names:
            setting = SETTINGS[name]
            spec = StreamSpec(batch_tokens=args.batch_tokens, buffer_tokens=args.buffer_tokens,
                              max_tokens=steps * args.batch_tokens, workers=setting["workers"],
                              read_ahead=setting["read_ahead"])  # fmt: skip
            fit["tokens_per_fit"] = ResidualStream(stores["local"], spec).total_tokens()
            print(f"tuned-lens fit, setting {name} {setting}:", flush=True)
            stores["s3"] = open_s3(url, setting["s3fs_max_concurrency"])
            fit["settings"][name] = fit_rounds(server, stores, spec, setting, args.rounds)
        stores["s3"] = open_s3(url, None)  # s3fs's defaults again for what follows
        pooled = fit["settings"].get("default") or next(iter(fit["settings"].values()))
        fit["throughput_ratio_s3_over_local"] = pooled["throughput_ratio_s3_over_local"]
        reaching = [n for n in names if fit["settings"][n]["throughput_ratio_s3_over_local"] >= TARGET]
        fit["least_setting_reaching_target"] = reaching[0] if reaching else None
        result["fit"] = fit

        print("stream passes (no compute), each in a fresh process ...", flush=True)
        local = run_in_child(
            "bench_stream", "pass_rss", args.store, args.rss_buffer_tokens, 1, args.batch_tokens
        )
        before = server.stats()
        s3 = run_in_child("bench_stream", "pass_rss", url, args.rss_buffer_tokens, 1, args.batch_tokens)
        s3_requests = stats_delta(server.stats(), before)["requests"]
        result["read"] = {
            "local": local,
            "s3": {**s3, "requests": s3_requests, "requests_per_s": round(s3_requests / s3["seconds"], 1)},
            "throughput_ratio_s3_over_local": round(
                s3["decompressed_MB_per_s"] / local["decompressed_MB_per_s"], 4
            ),
        }
        print("affine fits ...", flush=True)
        result["affine"] = affine_rounds(server, stores, args.rounds)

    if args.workers_build:
        result["workers_build"] = workers_build(args)
    result["checks"] = {
        "fit_ratio_at_least_0_80_default_setting": fit["throughput_ratio_s3_over_local"] >= TARGET,
        "same_lenses_from_s3_and_local": all(s["same_result"] for s in fit["settings"].values())
        and result["affine"]["same_result"],
    }
    out = write_result(result, args.out, "remote", args.smoke)
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
