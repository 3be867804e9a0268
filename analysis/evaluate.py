"""Per-layer lens metrics on the held-out split of a store.

For every lens (the logit lens is always included) and every layer boundary: KL(final || lens),
cross-entropy against the next token, entropy of the lens distribution and top-1 agreement with the
final prediction; plus one row for the model's own output (the last boundary through the head).
Everything is accumulated over the stream in float64, in nats, and converted to bits per byte
(the tuned-lens paper's unit) with the tokenizer the store carries (`lenscache.tokenizer`), which
counts the held-out text's bytes without the model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lenscache.device import resolve_device
from lenscache.errors import LensError
from lenscache.fit.lens import Lens
from lenscache.fit.losses import FinalDist, entropy, layer_groups, log_probs, next_token_ce
from lenscache.fit.stream import IGNORE_INDEX, ResidualStream, StreamSpec
from lenscache.reader import Store
from lenscache.tokenizer import MissingTokenizer


@dataclass
class LayerMetrics:
    """Sums over tokens; `finish` turns them into means."""

    kl: float = 0.0
    ce: float = 0.0
    entropy: float = 0.0
    top1: float = 0.0
    n: int = 0
    n_ce: int = 0

    def means(self) -> dict[str, float]:
        return {
            "kl": self.kl / max(1, self.n),
            "ce": self.ce / max(1, self.n_ce),
            "entropy": self.entropy / max(1, self.n),
            "top1_agreement": self.top1 / max(1, self.n),
        }


@dataclass
class EvalReport:
    store: str
    split: str
    tokens: int
    predicted_tokens: int  # tokens whose next token is in the sequence (the CE denominator)
    bytes: int | None  # UTF-8 bytes of the predicted tokens' text, when the tokenizer was available
    layers: list[int]
    lenses: dict[str, dict[str, dict[str, float]]]  # lens -> layer -> metric -> value (nats)
    model: dict[str, float]  # the model's own output
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def bits_per_byte(self, nats_per_token: float, per: str = "token") -> float | None:
        """nats/token -> bits/byte with this split's tokens-per-byte ratio."""
        if not self.bytes:
            return None
        count = self.predicted_tokens if per == "predicted" else self.tokens
        return nats_per_token * count / self.bytes / math.log(2)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "store": self.store,
            "split": self.split,
            "tokens": self.tokens,
            "predicted_tokens": self.predicted_tokens,
            "bytes": self.bytes,
            "layers": self.layers,
            "units": "nats per token; *_bpb in bits per byte",
            "seconds": round(self.seconds, 2),
            "notes": self.notes,
            "model": self._with_bpb(self.model),
            "lenses": {
                name: {str(k): self._with_bpb(v) for k, v in rows.items()} for name, rows in self.lenses.items()
            },
        }
        return out

    def _with_bpb(self, row: dict[str, float]) -> dict[str, float | None]:
        out: dict[str, float | None] = {k: round(v, 6) for k, v in row.items()}
        out["kl_bpb"] = _round(self.bits_per_byte(row["kl"]))
        out["ce_bpb"] = _round(self.bits_per_byte(row["ce"], per="predicted"))
        return out


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def _accumulate(acc: LayerMetrics, final: FinalDist, logp: torch.Tensor, nxt: torch.Tensor) -> None:
    """Add one minibatch of (B, V) lens log-probs to the sums."""
    acc.kl += float(final.kl(logp).double().sum())
    acc.ce += float(next_token_ce(logp, nxt).double().sum())
    acc.n_ce += int((nxt != IGNORE_INDEX).sum())
    acc.entropy += float(entropy(logp).double().sum())
    acc.top1 += float((logp.argmax(-1) == final.argmax).double().sum())
    acc.n += logp.shape[0]


def count_bytes(store: Store, seqs: range, tokenizer: Any) -> int:
    """UTF-8 bytes of the text of each sequence's predicted tokens (positions 1..P-1)."""
    total = 0
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for start in range(seqs.start, seqs.stop, 64):
        block = store.tokens(range(start, min(start + 64, seqs.stop)))
        for row in block:
            ids = [int(t) for t in row[1:] if int(t) not in special]
            total += len(tokenizer.decode(ids).encode("utf-8"))
    return total


def evaluate(
    store: Store,
    lenses: dict[str, Lens] | None = None,
    layers: list[int] | None = None,
    split: str = "held_out",
    max_tokens: int | None = None,
    batch_tokens: int = 256,
    tokenizer: Any = "auto",
    device: str = "cpu",
    progress: bool = True,
) -> EvalReport:
    """Metrics per layer for the logit lens and each lens in `lenses`, on a split of the store.

    `tokenizer` counts the text's bytes for bits per byte: "auto" takes the store's own
    (`Store.tokenizer`), None skips them; any other value is used as the tokenizer.
    """
    notes: list[str] = []
    if isinstance(tokenizer, str) and tokenizer == "auto":
        try:  # before the pass: a tampered tokenizer is refused before any work
            tokenizer = store.tokenizer()
        except MissingTokenizer as exc:
            notes.append(str(exc))
            tokenizer = None
    lenses = dict(lenses or {})
    for lens in lenses.values():
        lens.check_compatible(store)
    spec = StreamSpec(
        layers=layers, split=split, batch_tokens=batch_tokens, buffer_tokens=batch_tokens, shuffle=False,
        max_tokens=max_tokens,
    )
    stream = ResidualStream(store, spec)
    layers = stream.layers
    for name, lens in lenses.items():
        missing = [layer for layer in layers if layer not in lens.layers]
        if missing:
            raise LensError(
                f"lens {name!r} has no translator for layers {missing} of this store; "
                f"choose layers it has (layers=…, --layers): {lens.layers}"
            )
    dev = resolve_device(device)
    unembed = store.unembed.to(dev)
    lenses = {name: lens.to(dev) for name, lens in lenses.items()}
    names = ["logit", *lenses]
    acc = {name: [LayerMetrics() for _ in layers] for name in names}
    model_acc = LayerMetrics()
    groups = layer_groups(len(layers), batch_tokens, store.meta.vocab_size)
    started = time.perf_counter()
    n_tokens = n_pred = 0
    bar = tqdm(total=stream.n_batches(), desc="lenscache eval", unit="batch", disable=not progress)
    with torch.no_grad():
        for batch in stream:
            resid = batch.resid.to(dev)
            nxt = batch.next_tokens.to(dev)
            final = FinalDist.from_logp(unembed.log_probs(batch.final.to(dev)))
            _accumulate(model_acc, final, final.logp, nxt)
            for g in groups:
                for name in names:
                    h = resid[g] if name == "logit" else lenses[name].translate_all(resid[g], layers[g])
                    logp = log_probs(unembed(h))
                    for j, i in enumerate(range(*g.indices(len(layers)))):
                        _accumulate(acc[name][i], final, logp[j], nxt)
            n_tokens += batch.n_tokens
            n_pred += int((nxt != IGNORE_INDEX).sum())
            bar.update()
    bar.close()
    seqs = stream.seqs
    n_bytes = None
    if tokenizer is not None:
        covered = range(seqs.start, seqs.start + math.ceil(n_tokens / store.seq_len))
        n_bytes = count_bytes(store, covered, tokenizer)
    else:
        notes.append("no tokenizer: bits per byte not computed")
    return EvalReport(
        store=store.url,
        split=split,
        tokens=n_tokens,
        predicted_tokens=n_pred,
        bytes=n_bytes,
        layers=layers,
        lenses={name: {layer: acc[name][i].means() for i, layer in enumerate(layers)} for name in names},
        model=model_acc.means(),
        seconds=time.perf_counter() - started,
        notes=notes,
    )


def per_layer(report: EvalReport, lens: str, metric: str) -> np.ndarray:
    return np.asarray([report.lenses[lens][layer][metric] for layer in report.layers])
