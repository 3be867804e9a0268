"""Held-out KL by layer versus fitting wall time: logit lens, closed-form affine lens, the tuned-lens
recipe from the identity, and the tuned-lens recipe started from the affine lens (K steps).

Every fitted lens sees the same training tokens (the first --train-seqs sequences of the train
split); all are evaluated on the same held-out tokens. One run, JSON out:

    python -m lenscache.tools.bench_lenses --store STORE --out bench-results/lenses.json \
        --plot docs/lenses_kl.png

`--smoke`: the same fits and evaluation on a tiny store built for the run (a tiny random model, or
--model, over the built-in corpus), tiny sizes; seconds.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from lenscache.analysis.evaluate import evaluate, per_layer
from lenscache.analysis.report import plot
from lenscache.fit.affine import fit_affine
from lenscache.fit.losses import FinalDist, layer_groups, log_probs
from lenscache.fit.stream import ResidualStream, StreamSpec
from lenscache.fit.tuned import TunedConfig, fit_tuned
from lenscache.reader import open_store
from lenscache.tools.machine import describe_machine
from lenscache.tools.smoke import add_smoke_args, scratch_dir, smoke_model, smoke_store, write_result

# a checkpoint interval no fit here reaches: checkpoints would be timed with the fit


# the real run's sizes, and the smoke run's (seconds on a tiny model)
REAL = {"train_seqs": 32, "batch_tokens": 256, "refine_steps": 16, "eval_tokens": 4096, "probe_tokens": 512}
SMOKE = {"train_seqs": 8, "batch_tokens": 32, "refine_steps": 2, "eval_tokens": 64, "probe_tokens": 32}
SMOKE_SEQS = 24  # sequences of 32 tokens in the smoke store (the last 10% held out)


class HeldOutProbe:
    """Mean held-out KL over layers of a lens, on a fixed held-out minibatch (cheap, for tracking)."""

    def __init__(self, store, tokens: int):
        spec = StreamSpec(split="held_out", shuffle=False, batch_tokens=tokens, max_tokens=tokens)
        self.batch = next(iter(ResidualStream(store, spec)))
        self.tokens = self.batch.n_tokens
        self.unembed = store.unembed
        self.final = FinalDist.from_logp(self.unembed.log_probs(self.batch.final))

    @torch.no_grad()
    def mean_kl(self, lens) -> float:
        layers = self.batch.layers
        total = 0.0
        for g in layer_groups(len(layers), self.tokens, self.unembed.vocab_size):
            h = lens.translate_all(self.batch.resid[g], layers[g])
            total += float(self.final.kl(log_probs(self.unembed(h))).mean(-1).sum())
        return total / len(layers)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=None, help="the store (required unless --smoke)")
    ap.add_argument("--train-seqs", type=int, default=None, help=f"training sequences for every fitted lens "
                    f"({REAL['train_seqs']})")  # fmt: skip
    ap.add_argument("--batch-tokens", type=int, default=None, help=f"tuned-lens SGD minibatch ({REAL['batch_tokens']})")
    ap.add_argument(
        "--refine-steps", type=int, default=None, help=f"K: KL steps after the affine fit ({REAL['refine_steps']})"
    )
    ap.add_argument("--eval-tokens", type=int, default=None, help=f"default {REAL['eval_tokens']}")
    ap.add_argument(
        "--probe-tokens", type=int, default=None,
        help=f"held-out tokens tracked during refinement ({REAL['probe_tokens']})",
    )  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON output (default bench-results/lenses.json)")
    ap.add_argument("--plot", default=None, help="PNG of the evaluation (all four panels)")
    add_smoke_args(ap)
    args = ap.parse_args(argv)
    for key, value in (SMOKE if args.smoke else REAL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    work = scratch_dir("bench-lenses")
    if args.smoke and args.store is None:
        args.store = smoke_store(work / "smoke.zarr", smoke_model(args.model, work), SMOKE_SEQS)
    if args.store is None:
        ap.error("--store is required (or --smoke)")

    store = open_store(args.store)
    # the first torch.optim optimiser imports torch._dynamo (~4 s): pay that before any timing
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    store.unembed  # noqa: B018  (loaded once, cached on the store, shared by every timed run)
    seq_len = store.seq_len
    train_tokens = args.train_seqs * seq_len
    spec = StreamSpec(batch_tokens=args.batch_tokens, seed=args.seed, max_sequences=args.train_seqs)
    times: dict[str, float] = {"logit": 0.0}

    t = time.perf_counter()
    affine = fit_affine(store, max_sequences=args.train_seqs)
    times["affine"] = time.perf_counter() - t
    print(f"affine: {times['affine']:.1f} s on {affine.config.fit['tokens']:,} tokens", flush=True)

    probe = HeldOutProbe(store, args.probe_tokens)
    track = {"step": [0], "mean_kl": [probe.mean_kl(affine)], "seconds": 0.0}

    def on_step(step: int, lens) -> None:  # held-out KL after every refinement step (time excluded)
        t0 = time.perf_counter()
        track["step"].append(step)
        track["mean_kl"].append(probe.mean_kl(lens))
        track["seconds"] += time.perf_counter() - t0

    t = time.perf_counter()
    refined = fit_tuned(
        store,
        work / "refined",
        StreamSpec(**{**spec.__dict__, "max_tokens": args.refine_steps * args.batch_tokens}),
        TunedConfig(checkpoint_every=0),
        init=affine,
        on_step=on_step,
    )
    times["affine+kl"] = times["affine"] + time.perf_counter() - t - track["seconds"]
    better = [s for s, v in zip(track["step"], track["mean_kl"], strict=True) if v < track["mean_kl"][0]]
    print(f"affine + {args.refine_steps} KL steps: {times['affine+kl']:.1f} s", flush=True)

    t = time.perf_counter()
    tuned = fit_tuned(store, work / "tuned", spec, TunedConfig(checkpoint_every=0))
    times["tuned"] = time.perf_counter() - t
    print(f"tuned from identity: {times['tuned']:.1f} s on {train_tokens:,} tokens", flush=True)

    lenses = {"affine": affine, "tuned": tuned, "affine+kl": refined}
    report = evaluate(store, lenses, max_tokens=args.eval_tokens)  # bits per byte: the store's tokenizer
    kl = {name: per_layer(report, name, "kl") for name in report.lenses}
    last = store.meta.n_layers - 1
    but_last = [i for i, layer in enumerate(report.layers) if layer != last]
    result = {
        "benchmark": "lenses",
        "smoke": args.smoke,
        "store": str(args.store),
        "model": store.meta.model.get("id"),
        "machine": describe_machine(),
        "train_tokens": train_tokens,
        "tuned_steps": tuned.config.fit["steps"],
        "refine_steps": refined.config.fit["steps"],
        "batch_tokens": args.batch_tokens,
        "eval_tokens": report.tokens,
        "fit_seconds": {k: round(v, 2) for k, v in times.items()},
        "affine_over_tuned_time": round(times["affine"] / times["tuned"], 4),
        "kl_per_layer": {name: dict(zip(map(str, report.layers), np.round(v, 4).tolist(), strict=True))
                         for name, v in kl.items()},
        "mean_kl": {name: round(float(v.mean()), 4) for name, v in kl.items()},
        "checks": {
            "tuned_beats_logit_at_every_layer_but_last": bool((kl["tuned"][but_last] < kl["logit"][but_last]).all()),
            "affine_beats_tuned_at_every_layer": bool((kl["affine"] < kl["tuned"]).all()),
            "affine_time_at_most_1_20_of_tuned": times["affine"] <= times["tuned"] / 20,
            "refined_beats_affine_and_tuned_at_every_layer": bool(
                ((kl["affine+kl"] < kl["affine"]) & (kl["affine+kl"] < kl["tuned"])).all()
            ),
        },
        "refine_loss_history": refined.config.fit["loss_history"],
        "refine_held_out_probe": {
            "tokens": probe.tokens,
            "step": track["step"],
            "mean_kl": [round(v, 5) for v in track["mean_kl"]],
            "first_step_better_than_affine": better[0] if better else None,
        },
        "report": report.to_dict(),
    }
    out = write_result(result, args.out, "lenses", args.smoke)
    if args.plot:
        plot(report, args.plot)
    print("layer  " + "  ".join(f"{n:>10}" for n in kl))
    for i, layer in enumerate(report.layers):
        print(f"{layer:5d}  " + "  ".join(f"{kl[n][i]:10.4f}" for n in kl))
    summary = {k: result[k] for k in ("fit_seconds", "affine_over_tuned_time", "checks", "refine_held_out_probe")}
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
