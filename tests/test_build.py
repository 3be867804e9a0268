"""End-to-end builds on tiny random models of every family: contents, exactness, resume, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import FAMILIES, make_tiny_model
from transformers import AutoModelForCausalLM

import lenscache.cache.build as build_module
from lenscache.cache.build import BuildConfig, build_store, topk_rows
from lenscache.cache.model import ModelSpec
from lenscache.cache.text import DataSpec
from lenscache.errors import DataError, ModelError, ResumeMismatch, StoreError
from lenscache.reader import open_store
from lenscache.verify import verify_store

SEQ = 16


def config(model_dir: Path, text: Path, out, **kw) -> BuildConfig:
    kw.setdefault("seq_len", SEQ)
    kw.setdefault("max_tokens", SEQ * 6)
    kw.setdefault("progress", False)
    return BuildConfig(out=str(out), model=ModelSpec(str(model_dir)), data=DataSpec(str(text)), **kw)


def edited_model(src: Path, out: Path, edit) -> Path:
    """A copy of the model in `src` (weights changed in place by `edit(model)`) with its tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        edit(model)
    model.save_pretrained(out)
    for f in src.glob("tokenizer*"):
        (out / f.name).write_bytes(f.read_bytes())
    return out


def reference(model_dir: Path, tokens: np.ndarray):
    """The model's own hidden states and log-probs for the stored tokens, computed independently."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(tokens.astype(np.int64)), output_hidden_states=True)
    return out.hidden_states, torch.log_softmax(out.logits.float(), -1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_builds_a_verified_exact_store(family, tiny_model_factory, text_file, tmp_path):
    model_dir = tiny_model_factory(family)
    summary = build_store(config(model_dir, text_file, tmp_path / "s.zarr", batch_size=2, seqs_per_chunk=4))
    assert summary.n_sequences == 6 and summary.n_tokens == 6 * SEQ
    report = verify_store(tmp_path / "s.zarr")
    assert report.ok, report.problems

    store = open_store(tmp_path / "s.zarr")
    meta = store.meta
    assert meta.build.status == "complete" and store.n_sequences == 6
    assert store.layers == list(range(meta.n_layers + 1))
    hidden, logprobs = reference(model_dir, store.tokens())
    # boundaries 0..n-1 are Hugging Face's hidden_states; the last one there is normed, ours is not
    for boundary in range(meta.n_layers):
        np.testing.assert_allclose(store.resid(boundary), hidden[boundary].numpy(), rtol=1e-2, atol=1e-2)
    # the final distribution is recovered exactly from the store alone
    recovered = store.final_logprobs()
    assert (recovered - logprobs).abs().max().item() < 1e-4
    ids, top_lp = store.topk()
    np.testing.assert_array_equal(ids[..., 0], logprobs.argmax(-1).numpy())
    np.testing.assert_allclose(top_lp[..., 0], logprobs.max(-1).values.numpy(), atol=1e-4)
    assert meta.head.check_max_abs_error is not None and meta.head.check_max_abs_error < 1e-4


def test_default_store_layout_and_metadata(llama_dir, text_file, tmp_path):
    build_store(config(llama_dir, text_file, tmp_path / "s.zarr"))
    store = open_store(tmp_path / "s.zarr")
    meta = store.meta
    assert meta.storage["dtype"] == "bfloat16" and meta.final["encoding"] == "lo16"
    resid = store.arrays["resid"]
    assert resid.metadata.dimension_names == ("layer", "seq", "pos", "d_model")
    assert resid.chunks[0] == 1, "one layer per chunk: reading a layer reads nothing else"
    for arr in store.arrays.values():
        names = [c.to_dict()["name"] for c in arr.metadata.codecs]
        assert names[-1] == "crc32c", names
    for key in ("weights_hash", "revision", "id"):
        assert key in meta.model
    assert meta.model["tokenizer"]["hash"].startswith("sha256:")
    assert meta.data["fingerprint"].startswith("sha256:")
    assert meta.package_version and meta.created and meta.schema_version == 1
    # the last boundary's stored bf16 is within one bf16 step of the exact value
    exact = store.final_resid()
    hi = store._decoded("resid", (meta.layers.index(meta.n_layers), slice(0, 6)))
    assert np.all(np.abs(exact - hi) <= np.abs(exact) * 2**-7 + 1e-30)


def test_layer_subset_and_float32_codec(llama_dir, text_file, tmp_path):
    build_store(config(llama_dir, text_file, tmp_path / "a.zarr", layers=[0, 2], codec="fp32-zstd"))
    store = open_store(tmp_path / "a.zarr")
    assert store.layers == [0, 2] and store.meta.final["encoding"] == "float32"
    hidden, logprobs = reference(llama_dir, store.tokens())
    np.testing.assert_array_equal(store.resid(2), hidden[2].numpy())
    assert (store.final_logprobs() - logprobs).abs().max().item() < 1e-4
    with pytest.raises(StoreError, match="layer 1 is not in this store"):
        store.resid(1)
    assert verify_store(tmp_path / "a.zarr").ok


def test_full_logits_option(gpt2_dir, text_file, tmp_path):
    build_store(config(gpt2_dir, text_file, tmp_path / "f.zarr", full_logits=True, topk=0, codec="fp32-zstd"))
    store = open_store(tmp_path / "f.zarr")
    _, logprobs = reference(gpt2_dir, store.tokens())
    stored = torch.from_numpy(store.logits())
    assert (torch.log_softmax(stored, -1) - logprobs).abs().max().item() < 1e-4
    with pytest.raises(StoreError, match="without top-k"):
        store.topk()


def test_fsspec_memory_store(llama_dir, text_file):
    url = "memory://lenscache-test/store.zarr"
    build_store(config(llama_dir, text_file, url))
    assert verify_store(url).ok
    store = open_store(url)
    assert store.resid(1).shape == (6, SEQ, 64)


def test_fp16_overflow_names_layer_and_position(tiny_model_factory, text_file, tmp_path):
    model_dir = tiny_model_factory("llama")
    # every entry beyond float16
    big = edited_model(model_dir, tmp_path / "big", lambda m: m.model.embed_tokens.weight.mul_(1e9))
    with pytest.raises(DataError, match=r"float16 overflow at layer 0, sequence 0, position 0.*bf16"):
        build_store(config(big, text_file, tmp_path / "o.zarr", codec="fp16-zstd"))


def test_existing_output_that_is_not_a_store_is_left_alone(llama_dir, text_file, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not touch")
    with pytest.raises(StoreError, match="not a lenscache store"):
        build_store(config(llama_dir, text_file, out))
    assert (out / "thesis.tex").read_text() == "do not touch"
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_existing_store_needs_resume_or_overwrite(llama_dir, text_file, tmp_path):
    out = tmp_path / "s.zarr"
    build_store(config(llama_dir, text_file, out))
    with pytest.raises(StoreError, match="--resume"):
        build_store(config(llama_dir, text_file, out))
    summary = build_store(config(llama_dir, text_file, out, resume=True))
    assert summary.tokens_built == 0  # complete: nothing to do
    with pytest.raises(ResumeMismatch, match="seq_len"):
        build_store(config(llama_dir, text_file, out, resume=True, seq_len=8, max_tokens=48))
    build_store(config(llama_dir, text_file, out, overwrite=True, seq_len=8, max_tokens=48))
    assert open_store(out).seq_len == 8


def test_resume_refuses_another_model(llama_dir, text_file, tmp_path):
    out = tmp_path / "s.zarr"
    build_store(config(llama_dir, text_file, out))
    other = make_tiny_model(tmp_path / "other-llama", "llama", seed=1)  # same shapes, other weights
    with pytest.raises(ResumeMismatch, match="weights_hash"):
        build_store(config(other, text_file, out, resume=True))
    assert open_store(out).meta.build.status == "complete"


def test_head_that_does_not_reproduce_logits_is_refused(llama_dir, text_file, tmp_path, monkeypatch):
    import lenscache.cache.build as build_mod

    real = build_mod.extract_head

    def wrong_norm(taps):
        spec, arrays = real(taps)
        arrays["norm_weight"] = arrays["norm_weight"] * 1.5
        return spec, arrays

    previous = tmp_path / "previous.zarr"
    build_store(config(llama_dir, text_file, previous))
    before = open_store(previous).tokens()
    monkeypatch.setattr(build_mod, "extract_head", wrong_norm)
    with pytest.raises(ModelError, match="does not reproduce the model's logits"):
        build_store(config(llama_dir, text_file, tmp_path / "h.zarr"))
    assert not (tmp_path / "h.zarr").exists(), "nothing is written before the head check passes"
    with pytest.raises(ModelError, match="does not reproduce"):
        build_store(config(llama_dir, text_file, previous, overwrite=True))
    assert verify_store(previous).ok, "a refused --overwrite leaves the old store intact"
    np.testing.assert_array_equal(open_store(previous).tokens(), before)


def test_seq_len_beyond_context_and_bad_layers(llama_dir, text_file, tmp_path):
    with pytest.raises(DataError, match="larger than the model's context"):
        build_store(config(llama_dir, text_file, tmp_path / "x.zarr", seq_len=4096, max_tokens=8192))
    with pytest.raises(DataError, match="outside 0..3"):
        build_store(config(llama_dir, text_file, tmp_path / "x.zarr", layers=[0, 9]))
    assert not (tmp_path / "x.zarr").exists()


def _committed(out: Path) -> int:
    try:
        meta = json.loads((out / "zarr.json").read_text())
        return meta["attributes"]["lenscache"]["build"]["committed"]
    except (OSError, ValueError, KeyError):
        return 0


def test_sigkill_mid_build_then_resume_equals_clean_build(llama_dir, text_file, tmp_path):
    """Kill -9 a CLI build part-way, resume it, and compare every array with an uninterrupted build."""
    n_seq = 48
    common = [
        "--model", str(llama_dir), "--data", str(text_file), "--seq-len", "8",
        "--max-tokens", str(8 * n_seq), "--batch-size", "1", "--seqs-per-chunk", "1", "--no-progress",
    ]  # fmt: skip
    cli = [sys.executable, "-m", "lenscache.tools.cli", "build"]
    killed = tmp_path / "killed.zarr"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # the build SIGKILLs itself right after committing 3 sequences (cache/faults.py): no timing involved
    proc = subprocess.run([*cli, *common, "--out", str(killed)], env={**env, "LENSCACHE_CRASH_AT": "after-commit:3"},
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    at_kill = _committed(killed)
    assert at_kill == 3
    assert not verify_store(killed).ok  # incomplete, and says so

    partial = open_store(killed)
    assert partial.n_sequences == at_kill  # readers see committed sequences only
    with pytest.raises(IndexError):
        partial.tokens(slice(0, at_kill + 1))

    resumed = subprocess.run(
        [*cli, *common, "--out", str(killed), "--resume"], env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed at sequence {at_kill}" in resumed.stdout
    clean = tmp_path / "clean.zarr"
    subprocess.run([*cli, *common, "--out", str(clean)], env=env, check=True, capture_output=True)

    a, b = open_store(killed), open_store(clean)
    assert verify_store(killed).ok
    assert a.meta.build.identity == b.meta.build.identity
    assert set(a.arrays) == set(b.arrays)
    for name in a.arrays:
        np.testing.assert_array_equal(a.arrays[name][...], b.arrays[name][...], err_msg=name)


@pytest.mark.slow
def test_real_model_store_is_exact(smollm2_dir, tmp_path):
    """SmolLM2-135M on the built-in corpus: a verified store whose layers and final distribution match
    the model."""
    out = tmp_path / "smol.zarr"
    cfg = BuildConfig(
        out=str(out),
        model=ModelSpec("default"),
        data=DataSpec("builtin:stdlib-docstrings"),
        seq_len=128,
        max_tokens=256,
        progress=False,
    )
    summary = build_store(cfg)
    assert summary.head_max_abs_error == 0.0
    assert verify_store(out).ok
    store = open_store(out)
    assert store.meta.n_layers == 30 and store.d_model == 576 and store.meta.vocab_size == 49152
    assert store.meta.model["source"] == "default"
    hidden, logprobs = reference(smollm2_dir, store.tokens())
    for boundary in (0, 12, 29):
        np.testing.assert_allclose(store.resid(boundary), hidden[boundary].numpy(), rtol=8e-3, atol=1e-3)
    # the massive middle-layer activations (~2e4) survive bfloat16 storage
    assert np.abs(store.resid(15)).max() > 1e4
    assert (store.final_logprobs() - logprobs).abs().max().item() < 1e-4


def test_unsupported_architecture_names_what_is_missing():
    from lenscache.cache.arch import find_taps

    class NoBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Linear(4, 4)

    with pytest.raises(ModelError, match=r"unsupported architecture NoBlocks: no list of transformer blocks"):
        find_taps(NoBlocks())

    class NoHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

        def get_output_embeddings(self):
            return None

    with pytest.raises(ModelError, match="no linear output head"):
        find_taps(NoHead())


def test_non_finite_activations_are_refused_naming_where(llama_dir, text_file, tmp_path):
    """NaN embeddings for a token that first appears after sequence 0: the head check (run on sequence 0)
    passes, and the residual stream's own check must catch the NaN at boundary 0."""
    clean = tmp_path / "clean.zarr"
    build_store(config(llama_dir, text_file, clean))
    tokens = open_store(clean).tokens()
    later = sorted(set(tokens[1:].ravel().tolist()) - set(tokens[0].ravel().tolist()))
    seq, pos = (int(i[0]) for i in np.nonzero(tokens == later[0]))
    broken = edited_model(
        llama_dir, tmp_path / "nan-token", lambda m: m.get_input_embeddings().weight[later[0]].fill_(float("nan"))
    )
    with pytest.raises(DataError, match=rf"non-finite activation at layer 0, sequence {seq}, position {pos}\b"):
        build_store(config(broken, text_file, tmp_path / "n.zarr"))
    assert open_store(tmp_path / "n.zarr").n_sequences <= seq  # nothing at or past the bad sequence committed


def test_a_model_with_nan_weights_is_refused_by_the_head_check(llama_dir, text_file, tmp_path):
    broken = edited_model(
        llama_dir,
        tmp_path / "nan-model",
        lambda m: m.model.layers[1].mlp.down_proj.weight.fill_(float("nan")),
    )
    with pytest.raises(ModelError, match=r"non-finite \(NaN/inf\) logits"):
        build_store(config(broken, text_file, tmp_path / "n.zarr"))
    assert not (tmp_path / "n.zarr").exists()


def test_all_zero_chunks_are_written_and_verify(llama_dir, gpt2_dir, text_file, tmp_path):
    """A chunk equal to the fill value is still a written chunk: it is on disk, and verify passes."""
    zeroed = edited_model(
        llama_dir, tmp_path / "zero-embeddings", lambda m: m.get_input_embeddings().weight.zero_()
    )
    out = tmp_path / "z.zarr"
    build_store(config(zeroed, text_file, out, seqs_per_chunk=2))
    assert not open_store(out).resid(0).any()  # boundary 0 is the (zero) embedding output
    report = verify_store(out)
    assert report.ok, report.problems

    # a zero final-norm bias (Hugging Face's initialisation of LayerNorm) is a head array of zeros
    zero_bias = edited_model(gpt2_dir, tmp_path / "zero-norm-bias", lambda m: m.transformer.ln_f.bias.zero_())
    out = tmp_path / "b.zarr"
    build_store(config(zero_bias, text_file, out))
    assert open_store(out).meta.head.has_norm_bias
    report = verify_store(out)
    assert report.ok, report.problems


def test_fast_topk_matches_torch_topk():
    gen = torch.Generator().manual_seed(0)
    cases = [
        torch.randn(64, 49152, generator=gen) * 4,  # the SmolLM2 shape
        torch.randint(-3, 3, (32, 9000), generator=gen).float(),  # many ties, ragged last piece
        torch.randn(8, 300, generator=gen),  # too few pieces: torch's own topk
    ]
    cases[0][5, 49151] = 1e3  # the maximum in the last piece
    cases[0][6, :] = float("-inf")
    cases[0][6, 7] = 0.0
    for rows in cases:
        for k in (1, 16):
            values, ids = topk_rows(rows, k)
            ref = rows.topk(k, dim=-1).values
            assert torch.equal(values, ref)
            assert torch.equal(rows.gather(1, ids), values)
            assert all(len(set(r.tolist())) == k for r in ids)  # k distinct entries per row


@pytest.mark.parametrize("codec", ["bf16-zstd", "fp16-zstd", "int8rms10l16-zstd"])
def test_writer_thread_and_writes_between_passes_store_the_same(
    codec, llama_dir, text_file, tmp_path, monkeypatch
):
    """Both ways of writing rows, with boundaries encoded in hooks (lossless) or by the writer (lossy)."""
    stores = {}
    for inline in (True, False):
        monkeypatch.setattr(build_module, "writes_between_passes", lambda device, inline=inline: inline)
        out = tmp_path / f"inline-{inline}.zarr"
        # 7 sequences in rows of 3: the last row is partial, and rows span several forward passes
        build_store(config(llama_dir, text_file, out, max_tokens=SEQ * 7, codec=codec, batch_size=2,
                           seqs_per_chunk=3))  # fmt: skip
        assert verify_store(out).ok
        stores[inline] = open_store(out)
    a, b = stores[True], stores[False]
    assert set(a.arrays) == set(b.arrays)
    for name in a.arrays:
        np.testing.assert_array_equal(a.arrays[name][...], b.arrays[name][...], err_msg=name)
    hidden, _ = reference(llama_dir, a.tokens())
    for boundary in range(a.meta.n_layers):  # HF's last hidden state is normed
        np.testing.assert_allclose(a.resid(boundary), hidden[boundary].numpy(), rtol=2e-2, atol=2e-2)
