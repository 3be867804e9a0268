"""`lenscache info`: what is in a store, how big it is, and where it came from.

The reader refuses stores whose declared shapes do not match their metadata, so sizes here are
real; every ratio is still guarded (``None`` in JSON, ``-`` in the table) where its denominator is
zero, as in a store with nothing committed yet.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from lenscache.lock import lock_note
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
        item = np.dtype(arr.dtype).itemsize
        stored_bytes = stored.get(name, 0)
        raw = math.prod(int(s) for s in arr.shape) * item
        arrays[name] = {
            "shape": list(arr.shape),
            "dims": list(arr.metadata.dimension_names or ()),
            "dtype": str(dict(arr.attrs).get("lenscache_dtype", arr.dtype)),
            "chunks": list(arr.chunks),
            "chunk_mib": round(math.prod(int(c) for c in arr.chunks) * item / 2**20, 3),
            "stored_bytes": stored_bytes,
            "raw_bytes": raw,
            "ratio": _ratio(raw, stored_bytes),
        }
    tokens = meta.committed * meta.seq_len
    resid = arrays[RESID]
    final_bytes = sum(arrays[n]["stored_bytes"] for n in FINAL_ARRAYS if n in arrays)
    # resid's chunks hold only committed sequences, so its raw size is scaled to them
    resid_raw = resid["raw_bytes"] * meta.committed // meta.n_sequences if meta.n_sequences else 0
    return {
        "url": str(url),
        "writer": lock_note(url),  # a writer lock: held by a writer at work, or stale
        "meta": meta.to_dict(),
        "arrays": arrays,
        "committed_tokens": tokens,
        "bytes_per_token_per_layer": _ratio(resid["stored_bytes"], tokens * len(meta.layers)),
        "raw_bytes_per_token_per_layer": meta.d_model * np.dtype(store.arrays[RESID].dtype).itemsize,
        "final_distribution_bytes_per_token": _ratio(final_bytes, tokens),
        "compression_ratio_resid": _ratio(resid_raw, resid["stored_bytes"]),
    }


def _ratio(num: float, den: float) -> float | None:
    """num / den, or None where there is nothing to divide by (or nothing to divide)."""
    return num / den if den > 0 and num > 0 else None


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def render(info: dict[str, Any]) -> str:
    m = info["meta"]
    model, data, build = m["model"], m["data"], m["build"]
    lines = [
        f"store       {info['url']}",
        f"status      {build['status']}: {build['committed']:,} of {m['n_sequences']:,} sequences "
        f"({info['committed_tokens']:,} tokens) committed",
        *([f"writer      {info['writer']}"] if info.get("writer") else []),
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
    ]
    rows = [("array", "dims", "dtype", "chunk", "stored", "ratio")]
    for name, a in info["arrays"].items():
        dims = "×".join(f"{d}={s}" for d, s in zip(a["dims"], a["shape"], strict=False)) or str(a["shape"])
        ratio = _ratio(a["raw_bytes"], a["stored_bytes"])
        rows.append(
            (
                name,
                dims,
                a["dtype"],
                f"{a['chunk_mib']:.2f} MiB",
                _mib(a["stored_bytes"]),
                _fmt(ratio, ".2f", "x"),
            )
        )
    lines += _table(rows, right=(3, 4, 5))
    lines += [
        "",
        f"residual    {_fmt(info['bytes_per_token_per_layer'], '.1f')} bytes/token/layer stored "
        f"({info['raw_bytes_per_token_per_layer']} raw, ratio {_fmt(info['compression_ratio_resid'], '.2f', 'x')})",
        f"final dist. {_fmt(info['final_distribution_bytes_per_token'], '.1f')} bytes/token stored",
    ]
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]], right: tuple[int, ...]) -> list[str]:
    """Columns as wide as their widest cell, two spaces apart (so no two cells ever run together)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def _ranges(values: list[int]) -> str:
    out, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(out)
