"""Codec presets on real activations: size, error, speed, and what they change downstream.

    python -m lenscache.tools.bench_codecs [--seqs 18] [--seq-len 512] [--eval-tokens 1024]
                                           [--exact-store S] [--out bench-results/codecs.json] [--smoke]

One float32 store (fp32-zstd, exact) is built from SmolLM2-135M over WikiText; every preset's store
is then written from that store's activations through the build's own encode step (`RowEncoder`)
and writer, so every store holds exactly the same activations. For each preset:

- bits per stored value of ``resid`` (scales included) and the ratio versus raw float16 (16 bits)
  and versus the measured fp16-zstd store;
- relative L2 error per layer, ``||x_hat - x|| / ||x||``, and the worst ratio of an observed
  error to the declared bound;
- encode and decode MB/s of float32 input on one core (torch and blosc limited to one thread):
  quantize + compress one chunk of ``resid``, and decompress + dequantize it;
- per-layer logit-lens KL and top-1 agreement, and per-layer affine-lens and tuned-lens KL (the
  lenses are fitted once on the exact store, then evaluated on each store; the tuned lens is the
  paper's KL recipe started from the affine lens, `--tuned-steps` steps), all on the held-out
  split, and their relative change versus the exact store.

`--smoke`: the same steps on a tiny random model (or --model) over the built-in corpus, tiny sizes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numcodecs
import numpy as np
import torch
from numcodecs import Blosc

from lenscache import quant
from lenscache.analysis.evaluate import evaluate, per_layer
from lenscache.cache.build import BuildConfig, _final_encoding, build_store
from lenscache.cache.model import ModelSpec, default_model_dir
from lenscache.cache.staging import BatchOutput, RowEncoder
from lenscache.cache.text import DataSpec
from lenscache.cache.writer import StoreWriter
from lenscache.encoding import BLOSC_BLOCKSIZE, CARRIER, PRESETS, CodecPreset, decode
from lenscache.fit.affine import fit_affine
from lenscache.fit.stream import StreamSpec, split_sequences
from lenscache.fit.tuned import TunedConfig, fit_tuned
from lenscache.reader import Store, open_store
from lenscache.schema import HEAD, QUANT_SCHEMA_VERSION, RESID, RESID_SCALE, StoreMeta
from lenscache.tokenizer import read_arrays
from lenscache.tools.machine import describe_machine
from lenscache.tools.smoke import SMOKE_DATA, add_smoke_args, out_path, scratch_dir, smoke_model

# a checkpoint interval no fit here reaches: checkpoints would be timed with the fit

WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
KL_TARGET = 0.01  # relative change of every per-layer lens KL
BITS_TARGET = 5.0


# the real run's sizes, and the smoke run's (seconds on a tiny model)
REAL = {"seqs": 18, "seq_len": 512, "eval_tokens": 1024, "tuned_steps": 8, "tuned_batch_tokens": 256}
SMOKE = {"seqs": 10, "seq_len": 32, "eval_tokens": 32, "tuned_steps": 2, "tuned_batch_tokens": 32}
REAL_DATA = "wikitext-2-raw wiki.test.raw, --doc-regex '^ = [^=]'"


def build_exact(out: str, seqs: int, seq_len: int, model: str, data: DataSpec) -> Store:
    build_store(
        BuildConfig(
            out=out,
            model=ModelSpec(model),
            data=data,
            seq_len=seq_len,
            max_tokens=seqs * seq_len,
            codec="fp32-zstd",
            progress=False,
            overwrite=True,
        )
    )
    return open_store(out)


def reencode(src: Store, url: str, preset: CodecPreset) -> Store:
    """Write `src`'s activations as a store of `preset`, through the build's encoder and writer."""
    meta = StoreMeta.from_dict(src.meta.to_dict())
    meta.storage = preset.storage_meta()
    meta.final["encoding"] = _final_encoding(preset, torch.float32, meta.layers, meta.n_layers)
    meta.schema_version = QUANT_SCHEMA_VERSION if preset.quant == "block" else 1
    meta.build.identity = {**meta.build.identity, "codec": preset.name}
    head = {p[len(HEAD) + 1 :]: src._read(p, (Ellipsis,)) for p in src.arrays if p.startswith(f"{HEAD}/")}
    # the source's own tokenizer bytes, so the copy's metadata (which records their hash) holds
    tokenizer = read_arrays(src) if src.meta.tokenizer is not None else None
    writer = StoreWriter.create(url, meta, preset, src.tokens(), head, tokenizer=tokenizer)
    encoder = RowEncoder(writer.meta, preset)
    s, n = meta.build.seqs_per_chunk, src.n_sequences
    for start in range(0, n, s):
        rows = range(start, min(start + s, n))
        states = [torch.from_numpy(src.resid(layer, rows)) for layer in meta.layers]
        ids, lps = src.topk(rows)
        batch = BatchOutput(
            states,
            torch.from_numpy(src.final_resid(rows)),
            torch.from_numpy(src.logsumexp(rows)),
            torch.from_numpy(ids),
            torch.from_numpy(lps),
            None,
        )
        writer.write_rows(start, encoder.encode_row(start, [batch]))
        writer.commit(rows.stop)
    return open_store(url)


def _blosc(preset: CodecPreset, itemsize: int) -> Blosc:
    shuffle = Blosc.SHUFFLE if itemsize > 1 else Blosc.NOSHUFFLE
    if preset.shuffle == "bit":
        shuffle = Blosc.BITSHUFFLE
    return Blosc(cname="zstd", clevel=preset.clevel, shuffle=shuffle, blocksize=BLOSC_BLOCKSIZE)


def speed(
    preset: CodecPreset, x: torch.Tensor, meta: StoreMeta, boundary: int, repeats: int = 3
) -> dict[str, float]:
    """Encode and decode MB/s (of float32 input) on one core.

    Encode is the build's own step, `RowEncoder._encode_resid` (checks, rounding or quantizing,
    into a resid carrier), then compression; decode is decompression, then the reader's decode.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    numcodecs.blosc.set_nthreads(1)
    try:
        mb = x.numel() * 4 / 1e6
        encoder = RowEncoder(meta, preset)
        carrier = np.empty(tuple(x.shape), dtype=CARRIER[preset.dtype])
        enc_t, dec_t = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            scale = encoder._encode_resid(carrier, x, boundary, 0)
            blobs = [_blosc(preset, carrier.itemsize).encode(carrier)]
            if scale is not None:
                blobs.append(_blosc(preset, scale.itemsize).encode(scale))
            enc_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            raw = np.frombuffer(_blosc(preset, carrier.itemsize).decode(blobs[0]), dtype=carrier.dtype)
            raw = raw.reshape(carrier.shape)
            if scale is not None:
                sd = np.frombuffer(_blosc(preset, scale.itemsize).decode(blobs[1]), dtype=scale.dtype)
                y = quant.block_dequantize(raw, sd.reshape(scale.shape), preset.block)
            else:
                y = decode(raw, preset.dtype)
            dec_t.append(time.perf_counter() - t0)
            if y.shape != tuple(x.shape):
                raise AssertionError(f"{preset.name}: decoded shape {y.shape} != {tuple(x.shape)}")
        return {"encode_mb_s": round(mb / min(enc_t), 1), "decode_mb_s": round(mb / min(dec_t), 1)}
    finally:
        torch.set_num_threads(threads)
        numcodecs.blosc.set_nthreads(threads)


def resid_bits(store: Store) -> float:
    sizes = store.stored_bytes()
    values = len(store.layers) * store.n_sequences * store.seq_len * store.d_model
    return 8.0 * (sizes[RESID] + sizes.get(RESID_SCALE, 0)) / values


def errors(store: Store, exact: Store, preset: CodecPreset) -> tuple[dict[str, float], float]:
    """Relative L2 error per layer (the last boundary is read exactly), and the worst error/bound."""
    rel: dict[str, float] = {}
    worst = 0.0
    eb = preset.error_bound()
    for layer in exact.layers:
        x = exact.resid(layer).astype(np.float64)
        y = store.resid(layer).astype(np.float64)
        rel[str(layer)] = float(np.linalg.norm(y - x) / np.linalg.norm(x))
        if eb["kind"] == "relative":
            if eb["value"] == 0:
                continue
            allowed = eb["value"] * np.maximum(np.abs(x), eb["floor"])
        else:
            sel = (store.layer_index(layer), slice(0, store.n_sequences))
            scales = quant.block_scale_float(store._read(RESID_SCALE, sel)).astype(np.float64)
            allowed = np.repeat(scales, preset.block, axis=-1)[..., : x.shape[-1]] / 2 + np.abs(x) * 2.0**-23
        worst = max(worst, float((np.abs(y - x) / np.maximum(allowed, 1e-45)).max()))
    return rel, worst


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--seqs", type=int, default=None, help=f"sequences (the last 10%% are held out; {REAL['seqs']})"
    )
    ap.add_argument("--seq-len", type=int, default=None, help=f"default {REAL['seq_len']}")
    ap.add_argument("--eval-tokens", type=int, default=None, help=f"default {REAL['eval_tokens']}")
    ap.add_argument(
        "--tuned-steps",
        type=int,
        default=None,
        help=f"KL steps of the tuned lens, from the affine lens ({REAL['tuned_steps']})",
    )
    ap.add_argument("--tuned-batch-tokens", type=int, default=None, help=f"default {REAL['tuned_batch_tokens']}")
    ap.add_argument("--exact-store", default=None, help="reuse this fp32-zstd store instead of building one")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--work", default=None, help="where the stores go (default: a temporary directory)")
    ap.add_argument("--out", default=None, help="JSON output (default bench-results/codecs.json)")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="add these presets to an existing --out of the same exact store (its reference KLs must match)",
    )
    add_smoke_args(ap)
    args = ap.parse_args(argv)
    for key, value in (SMOKE if args.smoke else REAL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    out_file = out_path(args.out, "codecs", args.smoke)
    work = Path(args.work) if args.work else scratch_dir("bench-codecs")
    work.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    if args.smoke:
        model, data, data_text = smoke_model(args.model, work), DataSpec(SMOKE_DATA), SMOKE_DATA
    else:
        if not args.exact_store and not WIKITEXT.exists():
            raise SystemExit(f"{WIKITEXT} is missing: pass --exact-store, or --smoke for a run without it")
        model = args.model or str(default_model_dir())
        data, data_text = DataSpec(str(WIKITEXT), doc_regex=r"^ = [^=]"), REAL_DATA
    if args.exact_store:
        exact = open_store(args.exact_store)
    else:
        exact = build_exact(str(work / "exact.zarr"), args.seqs, args.seq_len, model, data)
    print(
        f"exact store: {exact.n_sequences} x {exact.seq_len} tokens ({time.perf_counter() - t:.0f} s)",
        flush=True,
    )
    if exact.codec != "fp32-zstd":
        raise SystemExit("--exact-store must be an fp32-zstd store")
    train = len(split_sequences(exact.n_sequences).train)

    t = time.perf_counter()
    affine = fit_affine(exact, max_sequences=train)
    print(f"affine lens fitted on the exact store ({time.perf_counter() - t:.0f} s)", flush=True)
    t = time.perf_counter()
    spec = StreamSpec(
        batch_tokens=args.tuned_batch_tokens,
        max_tokens=args.tuned_steps * args.tuned_batch_tokens,
        max_sequences=train,
        seed=0,
    )
    tuned = fit_tuned(
        exact, work / "tuned", spec, TunedConfig(checkpoint_every=0), init=affine, progress=False
    )
    print(f"tuned lens fitted on the exact store ({time.perf_counter() - t:.0f} s)", flush=True)
    lenses = {"affine": affine, "tuned": tuned}
    names = ("logit", *lenses)
    ref = evaluate(exact, lenses, max_tokens=args.eval_tokens, progress=False)
    layers = [layer for layer in ref.layers if layer != exact.meta.n_layers]
    idx = [ref.layers.index(layer) for layer in layers]
    ref_kl = {lens: per_layer(ref, lens, "kl")[idx] for lens in names}
    ref_top1 = per_layer(ref, "logit", "top1_agreement")[idx]

    mid = exact.layers[len(exact.layers) // 2]
    sample = torch.from_numpy(exact.resid(mid, range(0, min(8, exact.n_sequences))))
    results: dict[str, dict] = {}
    for name in args.presets.split(","):
        preset = PRESETS[name]
        t = time.perf_counter()
        store = exact if name == "fp32-zstd" else reencode(exact, str(work / f"{name}.zarr"), preset)
        written = time.perf_counter() - t
        rep = (
            ref
            if name == "fp32-zstd"
            else evaluate(store, lenses, max_tokens=args.eval_tokens, progress=False)
        )
        kl = {lens: per_layer(rep, lens, "kl")[idx] for lens in names}
        top1 = per_layer(rep, "logit", "top1_agreement")[idx]
        rel_l2, worst = errors(store, exact, preset)
        bits = resid_bits(store)
        change = {lens: np.abs(kl[lens] - ref_kl[lens]) / ref_kl[lens] for lens in kl}
        results[name] = {
            "description": preset.description,
            "error_bound": preset.error_bound(),
            "lossy": preset.lossy,
            "bits_per_value": round(bits, 3),
            "ratio_vs_fp16_raw": round(16.0 / bits, 3),
            "rel_l2_error_per_layer": {k: float(f"{v:.4g}") for k, v in rel_l2.items()},
            "rel_l2_error_max": float(f"{max(rel_l2.values()):.4g}"),
            "worst_error_over_bound": round(worst, 4),
            **speed(preset, sample, exact.meta, mid),
            "logit_kl_per_layer": dict(zip(map(str, layers), np.round(kl["logit"], 5).tolist(), strict=True)),
            **{
                f"{lens}_kl_per_layer": dict(
                    zip(map(str, layers), np.round(kl[lens], 5).tolist(), strict=True)
                )
                for lens in lenses
            },
            "logit_top1_per_layer": dict(zip(map(str, layers), np.round(top1, 5).tolist(), strict=True)),
            "max_rel_kl_change": {lens: float(f"{v.max():.4g}") for lens, v in change.items()},
            "max_top1_change": float(f"{np.abs(top1 - ref_top1).max():.4g}"),
            "write_seconds": round(written, 1),
        }
        r = results[name]
        print(
            f"{name:14s} {bits:6.3f} bits/value  {16 / bits:5.2f}x vs fp16  rel L2 max {r['rel_l2_error_max']:.3g}  "
            f"enc {r['encode_mb_s']:7.1f} MB/s  dec {r['decode_mb_s']:7.1f} MB/s  "
            f"max dKL logit {r['max_rel_kl_change']['logit']:.3%} affine {r['max_rel_kl_change']['affine']:.3%} "
            f"tuned {r['max_rel_kl_change']['tuned']:.3%}  "
            f"max dtop1 {r['max_top1_change']:.4f}  bound x{worst:.3f}",
            flush=True,
        )
    reference = {
        "logit_kl_per_layer": dict(zip(map(str, layers), np.round(ref_kl["logit"], 5).tolist(), strict=True)),
        **{
            f"{lens}_kl_per_layer": dict(
                zip(map(str, layers), np.round(ref_kl[lens], 5).tolist(), strict=True)
            )
            for lens in lenses
        },
    }
    merged_from = None
    if args.merge and out_file.exists():
        old = json.loads(out_file.read_text())
        if old.get("reference") != reference or old.get("sequences") != exact.n_sequences:
            raise SystemExit(f"--merge: {out_file} was measured on other data (reference KLs differ)")
        results = {**old["presets"], **results}
        merged_from = sorted(old["presets"].keys() - set(args.presets.split(",")))
    fp16_bits = results.get("fp16-zstd", {}).get("bits_per_value")
    for r in results.values():
        r["ratio_vs_fp16_zstd_store"] = round(fp16_bits / r["bits_per_value"], 3) if fp16_bits else None
    passing = [
        n
        for n, r in results.items()
        if r["bits_per_value"] <= BITS_TARGET and max(r["max_rel_kl_change"].values()) < KL_TARGET
    ]
    recommended = min(passing, key=lambda n: results[n]["bits_per_value"]) if passing else None
    out = {
        "benchmark": "codecs",
        "smoke": args.smoke,
        "model": exact.meta.model.get("id"),
        "data": data_text,
        "sequences": exact.n_sequences,
        "seq_len": exact.seq_len,
        "train_sequences": train,
        "tuned_lens": {"init": "affine", "steps": args.tuned_steps, "batch_tokens": args.tuned_batch_tokens},
        "eval_tokens": ref.tokens,
        "machine": describe_machine(),
        "speed_sample": {"layer": mid, "values": int(sample.numel())},
        "reference": reference,
        # presets measured by earlier runs on the same exact store and reference (--merge)
        "merged_from": merged_from,
        "presets": results,
        "targets": {"bits_per_value": BITS_TARGET, "max_rel_kl_change": KL_TARGET},
        "meets_target": passing,
        "recommended": recommended,
    }
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(out, indent=1) + "\n")
    print(
        f"recommended (<= {BITS_TARGET} bits/value, every per-layer KL within {KL_TARGET:.0%}): {recommended}"
    )
    print(f"wrote {out_file}")
    return out


if __name__ == "__main__":
    main()
