"""`lenscache info`: what is in a store, how big it is, and where it came from."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from lenscache.reader import Store
from lenscache.schema import FINAL_EXACT, FINAL_LO, LOGITS, LOGSUMEXP, RESID, TOPK_IDS, TOPK_LOGPROBS

FINAL_ARRAYS = (FINAL_LO, FINAL_EXACT, TOPK_IDS, TOPK_LOGPROBS, LOGSUMEXP, LOGITS)


def describe(url: str | os.PathLike) -> dict[str, Any]:
    """A JSON-able description: metadata, per-array sizes, bytes per token."""
    store = Store(url)
    meta = store.meta
    stored = store.stored_bytes()
    arrays = {}
    for name, arr in sorted(store.arrays.items()):
        raw = int(np.prod(arr.shape)) * np.dtype(arr.dtype).itemsize
        arrays[name] = {
            "shape": list(arr.shape),
            "dims": list(arr.metadata.dimension_names or ()),
            "dtype": str(dict(arr.attrs).get("lenscache_dtype", arr.dtype)),
            "chunks": list(arr.chunks),
            "chunk_mib": round(int(np.prod(arr.chunks)) * np.dtype(arr.dtype).itemsize / 2**20, 3),
            "stored_bytes": stored.get(name, 0),
            "raw_bytes": raw,
        }
    tokens_written = max(1, meta.committed * meta.seq_len)
    resid = arrays[RESID]
    per_layer = resid["stored_bytes"] / tokens_written / max(1, len(meta.layers))
    raw_per_layer = meta.d_model * np.dtype(store.arrays[RESID].dtype).itemsize
    final_bytes = sum(arrays[n]["stored_bytes"] for n in FINAL_ARRAYS if n in arrays) / tokens_written
    return {
        "url": str(url),
        "meta": meta.to_dict(),
        "arrays": arrays,
        "committed_tokens": meta.committed * meta.seq_len,
        "bytes_per_token_per_layer": per_layer,
        "raw_bytes_per_token_per_layer": raw_per_layer,
        "final_distribution_bytes_per_token": final_bytes,
        "compression_ratio_resid": resid["raw_bytes"]
        * meta.committed
        / max(1, meta.n_sequences)
        / max(1, resid["stored_bytes"]),
    }


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def render(info: dict[str, Any]) -> str:
    m = info["meta"]
    model, data, build = m["model"], m["data"], m["build"]
    lines = [
        f"store       {info['url']}",
        f"status      {build['status']}: {build['committed']:,} of {m['n_sequences']:,} sequences "
        f"({info['committed_tokens']:,} tokens) committed",
        f"model       {model.get('id')} ({model.get('architecture')}, {m['n_layers']} blocks, d_model {m['d_model']}, "
        f"vocab {m['vocab_size']}, computed in {model.get('dtype')} on {model.get('device')})",
        f"weights     {model.get('weights_hash')}",
        f"tokenizer   {model.get('tokenizer', {}).get('name')} {model.get('tokenizer', {}).get('hash')}",
        f"data        {data['spec'].get('source')}: {data.get('n_documents')} documents, fingerprint {data.get('fingerprint')}",
        f"sequences   seq_len {m['seq_len']}, BOS {data.get('bos_token_id')}, separator {data.get('separator_token_id')}",
        f"layers      {_ranges(m['layers'])} (boundary 0 = embeddings, {m['n_layers']} = last block before the final norm)",
        f"storage     {m['storage']['codec']}: {m['storage']['description']}",
        f"final dist. exact last layer via '{m['final']['encoding']}', top-{m['final']['topk']}, "
        f"full logits {'yes' if m['final']['full_logits'] else 'no'}; head check max |Δlogit| "
        f"{m['head']['check_max_abs_error']}",
        f"created     {m['created']} by lenscache {m['package_version']} (schema {m['schema_version']})",
        "",
        f"{'array':<22}{'dims':<34}{'dtype':<10}{'chunk':>11}{'stored':>14}{'ratio':>8}",
    ]
    for name, a in info["arrays"].items():
        ratio = a["raw_bytes"] / a["stored_bytes"] if a["stored_bytes"] else float("nan")
        dims = "×".join(f"{d}={s}" for d, s in zip(a["dims"], a["shape"], strict=False)) or str(a["shape"])
        lines.append(
            f"{name:<22}{dims:<34}{a['dtype']:<10}{a['chunk_mib']:>8.2f}MiB{_mib(a['stored_bytes']):>14}{ratio:>7.2f}x"
        )
    lines += [
        "",
        f"residual    {info['bytes_per_token_per_layer']:.1f} bytes/token/layer stored "
        f"({info['raw_bytes_per_token_per_layer']} raw, ratio {info['compression_ratio_resid']:.2f}x)",
        f"final dist. {info['final_distribution_bytes_per_token']:.1f} bytes/token stored",
    ]
    return "\n".join(lines)


def _ranges(values: list[int]) -> str:
    out, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(out)
