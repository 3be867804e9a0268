"""A causal basis on disk: the directions CBE found for a lens, with their energies.

A basis is a directory: ``basis.safetensors`` (directions (L, k, d) float32, held-out energies and
their standard errors (L, k) float64, the ablation mean (L, d) float64, training-time energy
estimates) and ``basis.json`` (`BasisConfig`: layers, k, ablation mode, the lens it belongs to, the
store's data fingerprint and the model's weights hash, energies ± stderr per layer, tokens used,
settings). No pickle is ever written or read. The JSON records the SHA-256 of the tensor file, so a
pair torn by a kill between the two renames is refused on load instead of misread.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lenscache import __version__
from lenscache.errors import BasisError
from lenscache.reader import Store

from .lens import Lens, model_identity

WEIGHTS_FILE = "basis.safetensors"
CONFIG_FILE = "basis.json"
FORMAT = "lenscache-basis/1"
MODES = ("mean", "zero", "resample")
TENSORS = ("directions", "energies", "stderr", "mu", "train_energies")
ORTHONORMAL_TOL = 1e-3  # |V Vᵀ - I| allowed in a loaded basis (float32 round-off is ~1e-6)


def lens_identity(lens: Lens | None) -> dict[str, Any]:
    """What names the lens a basis belongs to: its kind, layers and a hash of its tensors (None: logit)."""
    if lens is None:
        return {"kind": "logit", "layers": None, "tensor_sha256": None}
    digest = hashlib.sha256()
    for name in ("weight", "bias"):
        digest.update(getattr(lens, name).detach().float().cpu().contiguous().numpy().tobytes())
    return {"kind": lens.config.kind, "layers": lens.layers, "tensor_sha256": digest.hexdigest()}


def store_identity(store: Store) -> dict[str, Any]:
    """The store's data fingerprint and shape (the model is recorded apart, as for lenses)."""
    meta = store.meta
    fingerprint = (meta.data or {}).get("fingerprint") or meta.build.identity.get("data_fingerprint")
    return {
        "url": store.url,
        "data_fingerprint": fingerprint,
        "n_sequences": store.n_sequences,
        "seq_len": store.seq_len,
    }


@dataclass
class BasisConfig:
    layers: list[int]
    k: int
    d_model: int
    mode: str  # mean | zero | resample
    lens: dict[str, Any]  # lens_identity()
    model: dict[str, Any]  # model_identity() of the store it was fitted on
    store: dict[str, Any]  # store_identity()
    energies: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # layer -> [{energy, stderr}]
    tokens: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""
    format: str = FORMAT
    package_version: str = __version__

    @classmethod
    def from_dict(cls, raw: Any) -> BasisConfig:
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise BasisError(f"not a lenscache basis config (expected format {FORMAT!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        optional = {"energies", "tokens", "settings", "package_version"}
        missing = sorted(names - raw.keys() - optional)
        if missing:
            raise BasisError(f"basis config is missing keys: {', '.join(missing)}")
        cfg = cls(**{k: raw[k] for k in names if k in raw})
        if cfg.mode not in MODES:
            raise BasisError(f"unknown ablation mode {cfg.mode!r} in the basis config")
        ok_layers = isinstance(cfg.layers, list) and all(isinstance(x, int) for x in cfg.layers)
        if not ok_layers or not cfg.layers or len(set(cfg.layers)) != len(cfg.layers):
            raise BasisError(f"basis config has a malformed layer list {cfg.layers!r}")
        if not (isinstance(cfg.k, int) and isinstance(cfg.d_model, int) and 1 <= cfg.k <= cfg.d_model):
            raise BasisError(f"basis config has k={cfg.k!r}, d_model={cfg.d_model!r}; need 1 <= k <= d_model")
        return cfg


class Basis:
    """Orthonormal directions per layer, ordered by held-out energy (nats), with standard errors."""

    def __init__(
        self,
        config: BasisConfig,
        directions: torch.Tensor,
        energies: torch.Tensor,
        stderr: torch.Tensor,
        mu: torch.Tensor,
        train_energies: torch.Tensor | None = None,
    ):
        self.config = config
        self.directions = directions.float()
        self.energies = energies.double()
        self.stderr = stderr.double()
        self.mu = mu.double()
        self.train_energies = (
            train_energies.double() if train_energies is not None else torch.full_like(self.energies, math.nan)
        )

    @property
    def layers(self) -> list[int]:
        return list(self.config.layers)

    def index(self, layer: int) -> int:
        try:
            return self.config.layers.index(layer)
        except ValueError:
            raise BasisError(f"this basis has no directions for layer {layer} (it has {self.layers})") from None

    def for_layer(self, layer: int) -> torch.Tensor:
        """The (k, d) directions of `layer`, highest energy first."""
        return self.directions[self.index(layer)]

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {
            "directions": self.directions.contiguous(),
            "energies": self.energies.contiguous(),
            "stderr": self.stderr.contiguous(),
            "mu": self.mu.contiguous(),
            "train_energies": self.train_energies.contiguous(),
        }

    # ---- files -------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``basis.safetensors`` + ``basis.json`` (temporary files, then renames)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        cfg = self.config
        cfg.energies = {
            str(layer): [
                {"energy": float(e), "stderr": float(s)}
                for e, s in zip(self.energies[i].tolist(), self.stderr[i].tolist(), strict=True)
            ]
            for i, layer in enumerate(cfg.layers)
        }
        tmp_w, tmp_c = out / (WEIGHTS_FILE + ".tmp"), out / (CONFIG_FILE + ".tmp")
        save_file(self._tensors(), str(tmp_w), metadata={"format": FORMAT})
        cfg.weights_sha256 = _sha256(tmp_w)
        tmp_c.write_text(json.dumps(dataclasses.asdict(cfg), indent=2, allow_nan=False))
        os.replace(tmp_w, out / WEIGHTS_FILE)
        os.replace(tmp_c, out / CONFIG_FILE)
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Basis:
        """Read a basis; malformed, torn or non-finite files are refused with a `BasisError`."""
        where = Path(directory)
        cfg_path, w_path = where / CONFIG_FILE, where / WEIGHTS_FILE
        if not cfg_path.is_file() or not w_path.is_file():
            raise BasisError(f"{where} is not a basis directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        try:
            config = BasisConfig.from_dict(json.loads(cfg_path.read_text()))
        except BasisError:
            raise
        except Exception as exc:
            raise BasisError(f"cannot read the basis config in {where}: {exc}") from exc
        if _sha256(w_path) != config.weights_sha256:
            raise BasisError(
                f"{w_path} does not match the SHA-256 recorded in {cfg_path} (a torn or edited basis); "
                "fit it again"
            )
        try:
            tensors = load_file(str(w_path))
        except Exception as exc:
            raise BasisError(f"cannot read the basis tensors in {where}: {exc}") from exc
        n, k, d = len(config.layers), config.k, config.d_model
        shapes = {"directions": (n, k, d), "energies": (n, k), "stderr": (n, k), "mu": (n, d), "train_energies": (n, k)}
        for name, shape in shapes.items():
            got = tuple(tensors[name].shape) if name in tensors else "nothing"
            if got != shape:
                raise BasisError(f"basis tensor {name!r} in {where} has shape {got}, expected {shape}")
            # train energies are NaN where a basis was made without them; everything else must be finite
            values = tensors[name][~torch.isnan(tensors[name])] if name == "train_energies" else tensors[name]
            if not torch.isfinite(values).all():
                raise BasisError(f"basis tensor {name!r} in {where} has non-finite values (NaN or inf)")
        v = tensors["directions"].double()
        gram_err = (v @ v.transpose(1, 2) - torch.eye(k, dtype=torch.float64)).abs().amax(dim=(1, 2))
        for layer, err in zip(config.layers, gram_err.tolist(), strict=True):
            if err > ORTHONORMAL_TOL:
                raise BasisError(f"basis directions of layer {layer} in {where} are not orthonormal (error {err:.2e})")
        return cls(config, **{name: tensors[name] for name in TENSORS})

    def check_compatible(self, store: Store, lens: Lens | None | str = "any") -> None:
        """Refuse a store of another model (both weights hashes named), of another width, or without
        the basis's layers; with `lens` given (None: the logit lens), refuse another lens too."""
        mine, theirs = self.config.model, model_identity(store)
        if mine.get("weights_hash") != theirs.get("weights_hash"):
            raise BasisError(
                f"this basis was fitted on model {mine.get('id')!r} (weights {mine.get('weights_hash')}) "
                f"but the store {store.url} holds model {theirs.get('id')!r} (weights {theirs.get('weights_hash')})"
            )
        if store.d_model != self.config.d_model:
            raise BasisError(f"basis d_model {self.config.d_model} does not match the store's {store.d_model}")
        missing = [layer for layer in self.layers if layer not in store.layers]
        if missing:
            raise BasisError(f"the store {store.url} lacks the basis's layers {missing} (it has {store.layers})")
        if not isinstance(lens, str):
            want, got = self.config.lens, lens_identity(lens)
            if (want.get("kind"), want.get("tensor_sha256")) != (got["kind"], got["tensor_sha256"]):
                raise BasisError(
                    f"this basis belongs to a {want.get('kind')} lens (tensors {want.get('tensor_sha256')}), "
                    f"not to the given {got['kind']} lens (tensors {got['tensor_sha256']})"
                )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
