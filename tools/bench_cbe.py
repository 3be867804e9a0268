"""Streamed CBE vs the reference's full-batch L-BFGS CBE, on the same tokens; memory as tokens grow.

    python -m lenscache.tools.bench_cbe --store STORE --lens LENS_DIR   # SmolLM2 store + affine lens
    python -m lenscache.tools.bench_cbe --smoke                          # tiny model, seconds

Both fitters see the same train tokens (the first --tokens of the train split, whole sequences) and
their bases are scored by the same held-out estimate (`estimate_energies`, --eval-tokens). The streamed
fit runs with each method (`fit_cbe`'s deflation, CBE as defined, and subspace, which maximises the
sum of the k energies), with the same steps and tokens. Reported per method and layer: the energies,
the ratio of the streamed energies' sum to the full-batch sum (target >= 0.98) and of the first
(largest) energies; the wall time of each fit; the peak RSS of the streamed fit at --tokens and 4x as
many (each in a fresh child process, ru_maxrss; target within +10%), with the same steps and
minibatch, so only the number of tokens differs.
"""

from __future__ import annotations

import argparse
import json
import time

from lenscache.tools.smoke import peak_rss_mib, run_in_child

REAL = {"layers": "6,14,22", "k": 8, "tokens": 1024, "steps": 30, "batch_tokens": 256, "eval_tokens": 1024,
        "max_iter": 10, "rss_steps": 2, "rss_k": 2}  # fmt: skip
SMOKE = {"layers": "1,2", "k": 2, "tokens": 256, "steps": 20, "batch_tokens": 64, "eval_tokens": 128,
         "max_iter": 5, "rss_steps": 2, "rss_k": 2}  # fmt: skip


def _load_lens(lens: str):
    from lenscache.fit.lens import Lens

    return None if lens == "logit" else Lens.load(lens)


def rss_run(store: str, lens: str, layers: list[int], k: int, tokens: int, steps: int, batch_tokens: int,
            eval_tokens: int) -> dict:  # fmt: skip
    """One streamed CBE fit in this process; its peak RSS (run in a child, see `run_in_child`)."""
    from lenscache.fit.cbe import fit_cbe
    from lenscache.fit.stream import StreamSpec
    from lenscache.reader import open_store

    st = open_store(store)
    spec = StreamSpec(batch_tokens=batch_tokens, buffer_tokens=4 * batch_tokens, max_tokens=tokens)
    started = time.perf_counter()
    basis = fit_cbe(st, _load_lens(lens), layers, k=k, spec=spec, steps=steps, progress=False, eval_tokens=eval_tokens)
    return {
        "tokens": basis.config.tokens["train_tokens"],
        "seconds": round(time.perf_counter() - started, 2),
        "peak_rss_MiB": round(peak_rss_mib(), 1),
    }


def main(argv: list[str] | None = None) -> dict:
    from lenscache.tools.smoke import add_smoke_args, scratch_dir, smoke_model, smoke_store, write_result

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", help="a store of the model (real run)")
    ap.add_argument("--lens", default="logit", help="lens directory, or 'logit'")
    for name, value in REAL.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None, help=f"(real: {value})")
    ap.add_argument("--out", default=None, help="JSON (default bench-results/cbe.json)")
    add_smoke_args(ap)
    args = ap.parse_args(argv)
    sizes = {**(SMOKE if args.smoke else REAL)}
    sizes.update({k: getattr(args, k) for k in REAL if getattr(args, k) is not None})

    from lenscache.fit.cbe import METHODS, fit_cbe, fit_cbe_full_batch
    from lenscache.fit.stream import StreamSpec
    from lenscache.reader import open_store
    from lenscache.tools.cli import parse_layers
    from lenscache.tools.machine import describe_machine

    work = scratch_dir("bench-cbe")
    if args.smoke:
        model = smoke_model(args.model, work)
        store_url = smoke_store(work / "smoke.zarr", model, seqs=48, seq_len=32)
        lens = "logit"
    else:
        if not args.store:
            ap.error("--store is needed (or --smoke)")
        store_url, lens = args.store, args.lens
    st = open_store(store_url)
    layers = parse_layers(sizes["layers"])
    tokens, k = sizes["tokens"], sizes["k"]

    started = time.perf_counter()
    full = fit_cbe_full_batch(st, _load_lens(lens), layers, k=k, max_tokens=tokens, max_iter=sizes["max_iter"],
                              eval_tokens=sizes["eval_tokens"], chunk_tokens=sizes["batch_tokens"])  # fmt: skip
    full_s = time.perf_counter() - started
    spec = StreamSpec(batch_tokens=sizes["batch_tokens"], max_tokens=tokens)
    per_layer = {str(layer): {"full_batch_energies": [round(x, 6) for x in full.energies[i].tolist()],
                              "full_batch_sum": round(float(full.energies[i].sum()), 6)}
                 for i, layer in enumerate(layers)}  # fmt: skip
    ratios, first, walls = {}, {}, {"full_batch": round(full_s, 2)}
    for method in METHODS:
        started = time.perf_counter()
        streamed = fit_cbe(st, _load_lens(lens), layers, k=k, spec=spec, steps=sizes["steps"], progress=False,
                           eval_tokens=sizes["eval_tokens"], method=method)  # fmt: skip
        walls[method] = round(time.perf_counter() - started, 2)
        assert full.config.tokens["train_tokens"] == streamed.config.tokens["train_tokens"]
        ratios[method], first[method] = {}, {}
        for i, layer in enumerate(layers):
            row = per_layer[str(layer)]
            row[f"{method}_energies"] = [round(x, 6) for x in streamed.energies[i].tolist()]
            row[f"{method}_stderr"] = [round(x, 6) for x in streamed.stderr[i].tolist()]
            row[f"{method}_sum"] = round(float(streamed.energies[i].sum()), 6)
            ratios[method][str(layer)] = round(row[f"{method}_sum"] / row["full_batch_sum"], 4)
            first[method][str(layer)] = round(float(streamed.energies[i, 0] / full.energies[i, 0]), 4)

    rss_args = (store_url, lens, layers, sizes["rss_k"])
    small = run_in_child("bench_cbe", "rss_run", *rss_args, tokens, sizes["rss_steps"], sizes["batch_tokens"], sizes["eval_tokens"])
    big = run_in_child("bench_cbe", "rss_run", *rss_args, 4 * tokens, sizes["rss_steps"], sizes["batch_tokens"], sizes["eval_tokens"])
    result = {
        "smoke": bool(args.smoke),
        "machine": describe_machine(),
        "store": store_url if not args.smoke else "smoke",
        "lens": lens if not args.smoke else "logit",
        "settings": sizes,
        "train_tokens": streamed.config.tokens["train_tokens"],
        "held_out_tokens": streamed.config.tokens["held_out_tokens"],
        "layers": per_layer,
        "energy_ratio_streamed_over_full_batch": ratios,
        "first_energy_ratio_streamed_over_full_batch": first,
        "min_energy_ratio": {method: min(r.values()) for method, r in ratios.items()},
        "energy_ratio_at_least_0.98": {method: min(r.values()) >= 0.98 for method, r in ratios.items()},
        "wall_seconds": walls,
        "rss": {
            "small": small,
            "big": big,
            "peak_rss_growth_4x_tokens": round(big["peak_rss_MiB"] / small["peak_rss_MiB"] - 1, 4),
        },
    }
    out = write_result(result, args.out, "cbe", args.smoke)
    print(json.dumps({k: result[k] for k in ("energy_ratio_streamed_over_full_batch", "wall_seconds", "rss")}, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
