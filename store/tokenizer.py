"""The tokenizer travels with the store: its hash, its stored form, and loading it back offline.

A build stores the model's fast tokenizer in the ``tokenizer`` group (see `lenscache.schema`): the
`tokenizers` JSON (``tokenizer.backend_tokenizer.to_str()``) and a small JSON config with the
special tokens, so a store opened where the model is not still decodes its tokens. Loading it
never touches a model hub. An override (a tokenizer directory, a ``.gguf`` file or a hub id)
serves stores built before tokenizers were stored; only a hub id may reach the hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ModelError, StoreError
from .schema import TOKENIZER, TOKENIZER_ARRAYS, TOKENIZER_FORMAT

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .reader import Store

OVERRIDE_HINT = (
    "pass the model's tokenizer as override= (CLI: --tokenizer): its directory, its .gguf file or its hub id"
)


class MissingTokenizer(StoreError):
    """The store carries no tokenizer (built before lenscache stored one) and no override was given."""


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the tokenizer's definition plus its special tokens: part of a build's identity.

    Fast tokenizers hash their serialized JSON; slow ones fall back to the sorted vocabulary.
    """
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        # Encoding with truncation/padding stores those settings in the backend; they are call
        # options, not part of what the tokenizer is.
        definition.pop("truncation", None)
        definition.pop("padding", None)
        h.update(json.dumps(definition, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return f"sha256:{h.hexdigest()}"


def content_hash(arrays: dict[str, bytes]) -> str:
    """sha256 over the stored bytes (name, length, bytes of each array, by name): what a reader checks."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(f"{name}\0{len(arrays[name])}\0".encode())
        h.update(arrays[name])
    return f"sha256:{h.hexdigest()}"


@dataclass(frozen=True)
class SerializedTokenizer:
    """A tokenizer as the store keeps it: the bytes of each ``tokenizer/*`` array."""

    arrays: dict[str, bytes]

    @property
    def record(self) -> dict[str, Any]:
        """The store metadata's ``tokenizer`` object."""
        return {
            "format": TOKENIZER_FORMAT,
            "hash": content_hash(self.arrays),
            "bytes": sum(len(b) for b in self.arrays.values()),
        }


def serialize(tokenizer: PreTrainedTokenizerBase) -> SerializedTokenizer | None:
    """The stored form of a fast tokenizer; None for a tokenizer without a `tokenizers` backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    named = dict(tokenizer.special_tokens_map)
    named.pop("additional_special_tokens", None)  # transformers 4 lists them here too
    named_values = set(named.values())
    bos = tokenizer.bos_token_id
    config = {
        "format": TOKENIZER_FORMAT,
        "class": type(tokenizer).__name__,  # for people; the tokenizer is rebuilt as a fast tokenizer
        "special_tokens": named,
        "extra_special_tokens": [t for t in tokenizer.all_special_tokens if t not in named_values],
        # The post-processor in the JSON is what adds BOS/EOS; the flags are kept for code that reads them.
        "add_bos_token": bool(getattr(tokenizer, "add_bos_token", False)),
        "add_eos_token": bool(getattr(tokenizer, "add_eos_token", False)),
        "adds_bos": bos is not None and tokenizer.encode("a")[:1] == [bos],
        "model_max_length": int(tokenizer.model_max_length),
        "padding_side": tokenizer.padding_side,
        "truncation_side": tokenizer.truncation_side,
        "clean_up_tokenization_spaces": bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)),
    }
    return SerializedTokenizer(
        {
            "json": backend.to_str().encode("utf-8"),
            "config": json.dumps(config, sort_keys=True).encode("utf-8"),
        }
    )


def deserialize(arrays: dict[str, bytes]) -> PreTrainedTokenizerBase:
    """A `PreTrainedTokenizerFast` from the stored bytes: same vocabulary, merges, special tokens."""
    import transformers
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    try:
        config = json.loads(arrays["config"].decode("utf-8"))
        backend = Tokenizer.from_str(arrays["json"].decode("utf-8"))
    except Exception as exc:  # json's ValueError, or tokenizers' own Exception for a bad definition
        raise StoreError(f"the stored tokenizer cannot be read: {exc}") from exc
    if config.get("format") != TOKENIZER_FORMAT:
        raise StoreError(
            f"the stored tokenizer has format {config.get('format')!r}, which this lenscache does not read "
            f"({TOKENIZER_FORMAT}); upgrade lenscache"
        )
    # transformers 5 renamed the list of extra special tokens
    v4 = transformers.__version__.startswith("4.")
    extras_key = "additional_special_tokens" if v4 else "extra_special_tokens"
    kwargs: dict[str, Any] = dict(config["special_tokens"])
    if config["extra_special_tokens"]:
        kwargs[extras_key] = list(config["extra_special_tokens"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=config["model_max_length"],
        padding_side=config["padding_side"],
        truncation_side=config["truncation_side"],
        clean_up_tokenization_spaces=config["clean_up_tokenization_spaces"],
        **kwargs,
    )
    # Passed to the constructor, these flags would make transformers rewrite the stored post-processor.
    for flag in ("add_bos_token", "add_eos_token"):
        if config[flag] and hasattr(tokenizer, flag):
            setattr(tokenizer, flag, True)
    return tokenizer


def read_arrays(store: Store) -> dict[str, bytes]:
    """The stored tokenizer's bytes, checked against the hash in the store metadata."""
    record = store.meta.tokenizer
    if record is None:
        raise MissingTokenizer(
            f"store {store.url} carries no tokenizer (it was built before lenscache stored one); "
            + OVERRIDE_HINT
        )
    if record.get("format") != TOKENIZER_FORMAT:
        raise StoreError(
            f"store {store.url} has a tokenizer of format {record.get('format')!r}, which this lenscache "
            f"does not read ({TOKENIZER_FORMAT}); upgrade lenscache"
        )
    arrays = {}
    for name in TOKENIZER_ARRAYS:
        path = f"{TOKENIZER}/{name}"
        if path not in store.arrays:
            raise StoreError(f"store {store.url} records a tokenizer but has no {path!r} array")
        # through the reader, so a corrupt chunk is named like any other
        arrays[name] = store._read(path, (Ellipsis,)).tobytes()
    actual = content_hash(arrays)
    if actual != record.get("hash"):
        raise StoreError(
            f"the tokenizer stored in {store.url} does not match its hash: the arrays hash to {actual}, "
            f"the store metadata records {record.get('hash')}; the tokenizer was altered after the build"
        )
    return arrays


def stored_tokenizer(store: Store) -> PreTrainedTokenizerBase:
    """The store's own tokenizer, rebuilt offline and hash-checked (`Store.tokenizer` caches it)."""
    return deserialize(read_arrays(store))


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; more slashes, a backslash or a path prefix mean a local path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def load_tokenizer(source: str | os.PathLike) -> PreTrainedTokenizerBase:
    """A tokenizer from a local directory, a local ``.gguf`` file, or a hub id (only that uses the hub)."""
    from transformers import AutoTokenizer

    name = str(source)
    path = Path(name).expanduser()
    kwargs: dict[str, Any] = {"local_files_only": True}
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"no such tokenizer: GGUF file {name!r} does not exist")
        where: str | Path = path.parent
        kwargs["gguf_file"] = path.name  # without it transformers would take the path for a hub id
    elif path.is_dir():
        where = path
    elif path.exists():
        raise ModelError(f"{name!r} is a file, not a tokenizer directory or a .gguf file")
    elif _looks_like_path(name):
        raise ModelError(f"no such tokenizer path: {name!r} does not exist")
    else:
        where, kwargs = name, {}
    try:
        return AutoTokenizer.from_pretrained(where, **kwargs)
    except Exception as exc:  # transformers raises many types for a missing or malformed tokenizer
        raise ModelError(f"cannot load the tokenizer {name!r}: {exc}") from exc


def store_tokenizer(store: Store, override: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of `store`: its own (offline, hash-checked), or `override` for a store without one.

    An override that differs from the build's tokenizer (by `tokenizer_hash`) is used with a warning:
    a different transformers version can serialize the same tokenizer differently.
    """
    if override is None:
        return store.tokenizer()
    tokenizer = load_tokenizer(override)
    built = (store.meta.model.get("tokenizer") or {}).get("hash")
    given = tokenizer_hash(tokenizer)
    if built and given != built:
        warnings.warn(
            f"tokenizer {str(override)!r} hashes to {given}, but {store.url} was built with {built}",
            stacklevel=2,
        )
    return tokenizer
