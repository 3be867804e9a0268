"""Padded packing: one prompt per sequence, right-padded, with each prompt's length in the store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lenscache.cache.build import BuildConfig, build_store
from lenscache.cache.model import ModelSpec
from lenscache.cache.text import DataSpec
from lenscache.errors import DataError
from lenscache.reader import open_store
from lenscache.tools.cli import main

PROMPTS = ["The past tense of walk is", "Paris is the capital of", "a", "one two three four five six seven"]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS + [""]), encoding="utf-8")
    return path


def build(llama_dir, data, out, **kw):
    kw.setdefault("seq_len", 40)
    cfg = BuildConfig(
        out=str(out), model=ModelSpec(str(llama_dir)), data=DataSpec(str(data)), packing="padded",
        codec="fp32-zstd", progress=False, **kw,
    )
    return build_store(cfg)


def test_each_prompt_is_one_sequence_whose_positions_equal_the_prompt_run_alone(llama_dir, prompts_file, tmp_path):
    build(llama_dir, prompts_file, tmp_path / "p.zarr")
    store = open_store(tmp_path / "p.zarr")
    tok = AutoTokenizer.from_pretrained(llama_dir)
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    assert store.padded and store.n_sequences == len(PROMPTS)  # the empty document is skipped
    lengths = store.lengths()
    tokens = store.tokens()
    pad = store.meta.data["pad_token_id"]
    for i, prompt in enumerate(PROMPTS):
        ids = tok(prompt)["input_ids"]  # with BOS when the tokenizer adds it, as the build does
        assert lengths[i] == len(ids)
        assert tokens[i, : lengths[i]].tolist() == ids
        assert (tokens[i, lengths[i]:] == pad).all()
        with torch.no_grad():
            alone = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        for layer in (0, 1):
            got = store.resid(layer, [i])[0, : lengths[i]]
            np.testing.assert_allclose(got, alone[layer][0].numpy(), atol=1e-5, rtol=1e-5)
    assert store.lengths(range(1, 3)).tolist() == lengths[1:3].tolist()


def test_a_packed_store_reports_full_lengths(llama_dir, text_file, tmp_path):
    cfg = BuildConfig(out=str(tmp_path / "s.zarr"), model=ModelSpec(str(llama_dir)), data=DataSpec(str(text_file)),
                      seq_len=16, max_tokens=64, progress=False)
    build_store(cfg)
    store = open_store(tmp_path / "s.zarr")
    assert not store.padded and store.lengths().tolist() == [16] * store.n_sequences


def test_max_tokens_counts_whole_sequences(llama_dir, prompts_file, tmp_path):
    build(llama_dir, prompts_file, tmp_path / "p.zarr", max_tokens=80)
    assert open_store(tmp_path / "p.zarr").n_sequences == 2


def test_a_prompt_longer_than_seq_len_is_refused_and_nothing_is_written(llama_dir, prompts_file, tmp_path):
    with pytest.raises(DataError, match=r"document 3 .* more than seq_len 20"):
        build(llama_dir, prompts_file, tmp_path / "p.zarr", seq_len=20)
    assert not (tmp_path / "p.zarr").exists()


def test_cli_padded_and_its_refusals(llama_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "c.zarr"
    main(["build", "--model", str(llama_dir), "--data", str(prompts_file), "--out", str(out), "--seq-len", "40",
          "--packing", "padded", "--no-progress"])
    assert open_store(out).padded
    with pytest.raises(SystemExit) as exc:
        main(["build", "--model", str(llama_dir), "--data", str(prompts_file), "--out", str(tmp_path / "d.zarr"),
              "--packing", "padded", "--separator", "</s>"])
    assert exc.value.code != 0 and "--separator has no use" in capsys.readouterr().err
    assert not (tmp_path / "d.zarr").exists()


def test_tampered_lengths_are_refused(llama_dir, prompts_file, tmp_path):
    import zarr

    build(llama_dir, prompts_file, tmp_path / "p.zarr")
    group = zarr.open_group(str(tmp_path / "p.zarr"), mode="r+")
    meta = dict(group.attrs["lenscache"])
    meta["data"] = {**meta["data"], "lengths": meta["data"]["lengths"][:-1]}
    group.attrs["lenscache"] = meta
    with pytest.raises(Exception, match="padded store needs one length"):
        open_store(tmp_path / "p.zarr")
