"""The README's Python snippets run as written, on a tiny store instead of the real model.

The only substitutions are the model (a tiny random Llama with 12 blocks, so that every layer the
snippets name exists) and the token count; each is asserted to apply, so a snippet that changes
shape makes this test fail rather than run something else.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lenscache.tools.tiny_models import make_tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"
SUBSTITUTIONS = {  # what the README says -> what runs here
    'ModelSpec("default")': "ModelSpec(TINY_MODEL)",
    "max_tokens=65536": "max_tokens=4096, seq_len=128",
}


def python_snippets() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


@pytest.fixture(scope="module")
def twelve_block_llama(tmp_path_factory) -> Path:
    out = make_tiny_model(tmp_path_factory.mktemp("readme") / "llama12", "llama")
    config = AutoConfig.from_pretrained(out)
    config.num_hidden_layers = 12
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def test_the_readme_has_the_snippets_this_test_expects():
    snippets = python_snippets()
    assert len(snippets) >= 2
    joined = "\n".join(snippets)
    for written in SUBSTITUTIONS:
        assert written in joined, f"the README no longer says {written!r}; update SUBSTITUTIONS"


def test_readme_python_snippets_run_in_order(twelve_block_llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"TINY_MODEL": str(twelve_block_llama)}
    for i, snippet in enumerate(python_snippets()):
        for written, here in SUBSTITUTIONS.items():
            snippet = snippet.replace(written, here)
        try:
            exec(compile(snippet, f"README.md python snippet {i + 1}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"README python snippet {i + 1} failed:\n{snippet}") from exc
