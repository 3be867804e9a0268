"""Export to and import from the tuned-lens library's directory format (``config.json`` + ``params.pt``).

That format holds one translator per block, ``{i}.weight`` (d, d) and ``{i}.bias`` (d,) for
i = 0..num_hidden_layers-1, applied as ``h + (W h + b)`` to ``hidden_states[i]``, which is our
boundary i; the last boundary has no translator. Its config names the base model but carries no
weights hash, so an import takes the model identity from the store it is checked against.
``params.pt`` is a torch pickle: it is read with ``torch.load(weights_only=True)``, which refuses
anything but tensors and plain containers, so a shared lens cannot run code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lenscache.reader import Store

from .lens import Lens, LensConfig, LensError, model_identity

CONFIG = "config.json"
PARAMS = "params.pt"
LENS_TYPE = "linear_tuned_lens"


def export_tuned_lens(lens: Lens, out: str | os.PathLike) -> Path:
    """Write `lens` as a tuned-lens directory; it needs a translator for every boundary 0..L-1."""
    n = lens.config.n_layers
    if lens.layers != list(range(n)):
        raise LensError(
            f"the tuned-lens format needs translators for layers 0..{n - 1}; this lens has {lens.layers}"
        )
    where = Path(out)
    where.mkdir(parents=True, exist_ok=True)
    state = {}
    for i in range(n):
        state[f"{i}.weight"] = lens.weight[i].detach().float().clone()
        state[f"{i}.bias"] = lens.bias[i].detach().float().clone()
    torch.save(state, where / PARAMS)
    model = lens.config.model
    config = {
        "base_model_name_or_path": model.get("id"),
        "d_model": lens.config.d_model,
        "num_hidden_layers": n,
        "bias": True,
        "base_model_revision": model.get("revision"),
        "unembed_hash": None,  # the library's own hash of its Unembed; not computable from a store
        "lens_type": LENS_TYPE,
    }
    (where / CONFIG).write_text(json.dumps(config, indent=2))
    return where


def import_tuned_lens(directory: str | os.PathLike, store: Store) -> Lens:
    """Read a tuned-lens directory as a lens for `store`'s model (shapes checked, no code run)."""
    where = Path(directory)
    if not (where / CONFIG).is_file() or not (where / PARAMS).is_file():
        raise LensError(f"{where} is not a tuned-lens directory (needs {CONFIG} and {PARAMS})")
    try:
        config = json.loads((where / CONFIG).read_text())
        state = torch.load(where / PARAMS, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LensError(f"cannot read the tuned lens in {where}: {exc}") from exc
    if config.get("lens_type", LENS_TYPE) != LENS_TYPE:
        raise LensError(f"unsupported tuned-lens type {config.get('lens_type')!r} (only {LENS_TYPE})")
    meta = store.meta
    n, d = config.get("num_hidden_layers"), config.get("d_model")
    if (n, d) != (meta.n_layers, meta.d_model):
        raise LensError(
            f"the tuned lens is for {n} layers of width {d}; the store's model has "
            f"{meta.n_layers} layers of width {meta.d_model}"
        )
    if not isinstance(state, dict):
        raise LensError(f"{where / PARAMS} does not hold a state dict")
    lens = Lens(
        LensConfig(
            "tuned",
            list(range(n)),
            d,
            n,
            model_identity(store),
            fit={"imported_from": "tuned-lens", "base_model_name_or_path": config.get("base_model_name_or_path")},
        )
    )
    with torch.no_grad():
        for i in range(n):
            w, b = state.get(f"{i}.weight"), state.get(f"{i}.bias")
            if w is None or tuple(w.shape) != (d, d):
                raise LensError(f"{PARAMS}: translator {i} weight missing or not ({d}, {d})")
            lens.weight[i].copy_(w.float())
            if b is not None:
                if tuple(b.shape) != (d,):
                    raise LensError(f"{PARAMS}: translator {i} bias is not ({d},)")
                lens.bias[i].copy_(b.float())
    return lens
