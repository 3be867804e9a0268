"""Lenses: per-layer affine translators that map a layer's residual state towards the last layer's.

A lens is only the translator half of the tuned-lens library's lens/unembed split; the unembed
half is the store's head (`lenscache.head.Unembed`). Every kind shares one parametrisation,
``h + (W h + b)`` with one (W, b) per layer boundary, so that weight decay pulls towards the
identity and a zero lens is the logit lens:

- ``logit``: W = 0, b = 0 (nothing fitted);
- ``tuned``: fitted by KL to the final distribution (Belrose et al. 2023);
- ``affine``: fitted in closed form by least squares to the last boundary (Din et al. 2023).

On disk a lens is a directory: ``lens.safetensors`` (the stacked W and b) and ``lens.json``
(`LensConfig`). No pickle is ever written or read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lenscache import __version__
from lenscache.errors import LensError
from lenscache.reader import Store

LENS_KINDS = ("logit", "tuned", "affine")
WEIGHTS_FILE = "lens.safetensors"
CONFIG_FILE = "lens.json"
FORMAT = "lenscache-lens/1"


@dataclass
class LensConfig:
    kind: str
    layers: list[int]  # the boundaries that have a translator, in order
    d_model: int
    n_layers: int  # blocks of the model; boundary n_layers is the model's own output
    model: dict[str, Any]  # id, revision, weights_hash of the model whose store it was fitted on
    fit: dict[str, Any] = field(default_factory=dict)  # how it was fitted (settings, tokens, losses)
    format: str = FORMAT
    package_version: str = __version__

    @classmethod
    def from_dict(cls, raw: Any) -> LensConfig:
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise LensError(f"not a lenscache lens config (expected format {FORMAT!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - raw.keys() - {"fit", "package_version"})
        if missing:
            raise LensError(f"lens config is missing keys: {', '.join(missing)}")
        cfg = cls(**{k: raw[k] for k in names if k in raw})
        if cfg.kind not in LENS_KINDS:
            raise LensError(f"unknown lens kind {cfg.kind!r}")
        return cfg


def model_identity(store: Store) -> dict[str, Any]:
    model = store.meta.model
    return {k: model.get(k) for k in ("id", "revision", "weights_hash", "architecture")}


class Lens(torch.nn.Module):
    """Stacked per-layer translators: ``translate(h, i) = h + h @ W[i].T + b[i]``."""

    def __init__(self, config: LensConfig):
        super().__init__()
        self.config = config
        n, d = len(config.layers), config.d_model
        self.weight = torch.nn.Parameter(torch.zeros(n, d, d))
        self.bias = torch.nn.Parameter(torch.zeros(n, d))

    @classmethod
    def identity(cls, store: Store, layers: list[int], kind: str = "logit", **fit: Any) -> Lens:
        """A zero lens (the logit lens) for `layers` of the store's model."""
        for layer in layers:
            store.layer_index(layer)  # a lens only for boundaries the store has
        meta = store.meta
        return cls(LensConfig(kind, list(layers), meta.d_model, meta.n_layers, model_identity(store), fit))

    @property
    def layers(self) -> list[int]:
        return list(self.config.layers)

    def index(self, layer: int) -> int:
        try:
            return self.config.layers.index(layer)
        except ValueError:
            raise LensError(f"this lens has no translator for layer {layer} (it has {self.layers})") from None

    def translate(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Map residual states (..., d) of boundary `layer`; the last boundary maps to itself."""
        if layer == self.config.n_layers and layer not in self.config.layers:
            return h
        i = self.index(layer)
        return h + torch.nn.functional.linear(h, self.weight[i], self.bias[i])

    def translate_all(self, resid: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """(L, B, d) states of `layers` -> translated, all layers in one batched matmul."""
        idx = [self.index(layer) for layer in layers]
        w, b = self.weight[idx], self.bias[idx]
        return resid + torch.baddbmm(b.unsqueeze(1), resid, w.transpose(1, 2))

    # ---- files -------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``lens.safetensors`` + ``lens.json`` atomically (a reader never sees half a lens)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight.detach().float().contiguous(), "bias": self.bias.detach().float()}
        tmp_w, tmp_c = out / (WEIGHTS_FILE + ".tmp"), out / (CONFIG_FILE + ".tmp")
        save_file(tensors, str(tmp_w), metadata={"format": FORMAT})
        tmp_c.write_text(json.dumps(dataclasses.asdict(self.config), indent=2))
        os.replace(tmp_w, out / WEIGHTS_FILE)
        os.replace(tmp_c, out / CONFIG_FILE)
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Lens:
        where = Path(directory)
        cfg_path, w_path = where / CONFIG_FILE, where / WEIGHTS_FILE
        if not cfg_path.is_file() or not w_path.is_file():
            raise LensError(f"{where} is not a lens directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        try:
            config = LensConfig.from_dict(json.loads(cfg_path.read_text()))
            tensors = load_file(str(w_path))
        except LensError:
            raise
        except Exception as exc:
            raise LensError(f"cannot read the lens in {where}: {exc}") from exc
        lens = cls(config)
        n, d = len(config.layers), config.d_model
        shapes = {"weight": (n, d, d), "bias": (n, d)}
        for name, shape in shapes.items():
            if name not in tensors or tuple(tensors[name].shape) != shape:
                got = tuple(tensors[name].shape) if name in tensors else "nothing"
                raise LensError(f"lens tensor {name!r} in {where} has shape {got}, expected {shape}")
            _check_finite(tensors[name], name, config.layers, where)
        with torch.no_grad():
            lens.weight.copy_(tensors["weight"])
            lens.bias.copy_(tensors["bias"])
        return lens

    def check_compatible(self, store: Store) -> None:
        """Refuse to apply a lens to a store of another model (weights hash, widths, depth)."""
        mine, theirs = self.config.model, model_identity(store)
        if mine.get("weights_hash") != theirs.get("weights_hash"):
            raise LensError(
                f"this lens was fitted on model {mine.get('id')!r} (weights {mine.get('weights_hash')}) "
                f"but the store {store.url} holds model {theirs.get('id')!r} "
                f"(weights {theirs.get('weights_hash')}); fit a lens on a store of that model"
            )
        meta = store.meta
        if (self.config.d_model, self.config.n_layers) != (meta.d_model, meta.n_layers):
            raise LensError(
                f"lens shape (d_model {self.config.d_model}, {self.config.n_layers} layers) does not match "
                f"the store (d_model {meta.d_model}, {meta.n_layers} layers)"
            )


def _check_finite(tensor: torch.Tensor, name: str, layers: list[int], where: Path) -> None:
    """Refuse NaN or inf weights: they would turn every translated row into NaN without an error."""
    bad = (~torch.isfinite(tensor)).flatten(1).sum(1) if tensor.numel() else torch.zeros(0)
    for layer, count in zip(layers, bad.tolist(), strict=True):
        if count:
            raise LensError(
                f"lens {name} for layer {layer} in {where} has {count:,} non-finite values (NaN or inf); "
                "refit the lens"
            )
