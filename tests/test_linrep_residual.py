"""Embedding vs unembedding alignment from a padded prompts store (lenscache.analysis.linrep_residual)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from lenscache.analysis.concepts import load_concepts, read_prompts, write_prompts
from lenscache.analysis.linrep_residual import (
    PredictionStream,
    ProbeBatch,
    ProbeSettings,
    PromptMismatch,
    check_prompts,
    class_statistics,
    design,
    fit_probes,
    probe_accuracy,
)
from lenscache.cache.build import BuildConfig, build_store
from lenscache.cache.model import ModelSpec
from lenscache.cache.text import DataSpec
from lenscache.fit.lens import Lens
from lenscache.reader import open_store
from lenscache.tools.cli import main

TOY = [("quick", "brown"), ("dog", "fox"), ("lazy", "over"), ("is", "of"), ("and", "the"), ("capital", "layer")]
SEQS_PER_CHUNK = 4


def build(llama_dir, data, out, packing="padded"):
    build_store(BuildConfig(out=str(out), model=ModelSpec(str(llama_dir)), data=DataSpec(str(data)), seq_len=24,
                            packing=packing, codec="fp32-zstd", seqs_per_chunk=SEQS_PER_CHUNK, progress=False))  # fmt: skip
    return open_store(out)


@pytest.fixture(scope="module")
def toy(llama_dir, tmp_path_factory):
    """(pairs file, prompts file, store) for the TOY concept's template prompts."""
    root = tmp_path_factory.mktemp("linrep_residual")
    pairs = root / "toy.json"
    pairs.write_text(json.dumps([list(p) for p in TOY]))
    concepts = load_concepts([pairs], AutoTokenizer.from_pretrained(llama_dir))
    prompts = root / "prompts.jsonl"
    write_prompts(prompts, concepts)
    return pairs, prompts, build(llama_dir, prompts, root / "p.zarr")


def random_lens(store, seed=0):
    lens = Lens.identity(store, [b for b in store.layers if b != store.meta.n_layers], kind="affine")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lens.weight.copy_(0.2 * torch.randn(lens.weight.shape, generator=g))
        lens.bias.copy_(0.5 * torch.randn(lens.bias.shape, generator=g))
    return lens


def test_streamed_class_means_equal_a_direct_computation(toy, llama_dir):
    pairs, prompts, store = toy
    rows = read_prompts(prompts)
    concepts = load_concepts([pairs], store.tokenizer())
    des = design(rows, concepts)
    lens = random_lens(store)
    stream = PredictionStream(store, des, lens)
    blocks = [r.seq.size for r in stream]
    assert max(blocks) <= SEQS_PER_CHUNK and sum(blocks) == len(rows)  # block by block, never the whole store
    stats = class_statistics(stream)

    head, lengths = store.unembed, store.lengths()
    for view in ("raw", "lens"):
        got = stats.means(view)
        for li, layer in enumerate(stream.layers):
            h = torch.from_numpy(store.resid(layer)[np.arange(len(rows)), lengths - 1])  # in memory: the reference
            if view == "lens":
                h = lens.translate(h, layer)
            f = head.normalize(h).detach().double().numpy()
            for y in (0, 1):
                want = f[des.label == y].mean(0)
                np.testing.assert_allclose(got[li, 0, y], want, rtol=1e-5, atol=1e-6)
    assert stats.counts.tolist() == [[(des.label == 0).sum(), (des.label == 1).sum()]]


def test_the_probe_recovers_a_planted_separable_direction():
    rng = np.random.default_rng(0)
    n, d = 400, 12
    planted = rng.standard_normal(d)
    planted /= np.linalg.norm(planted)
    labels = rng.integers(0, 2, n)
    noise = rng.standard_normal((2, n, d))
    feats = noise.copy()
    feats[0] += np.outer(2 * labels - 1, planted) * 2.0  # layer 0: separable along `planted`; layer 1: noise
    held = np.arange(n) >= 300

    def batches(epoch=0):
        order = np.random.default_rng(epoch).permutation(n)
        for part in np.array_split(order, 8):
            yield ProbeBatch(0, torch.tensor(feats[:, part], dtype=torch.float32), torch.from_numpy(labels[part]),
                             torch.from_numpy(held[part]))  # fmt: skip

    train = feats[:, ~held]
    probes = fit_probes(batches, train.mean(1)[None], train.std(1)[None], ProbeSettings(epochs=40, lr=0.05))
    acc = probe_accuracy(probes, batches(), 1, 2)
    assert acc["held_out"][0, 0] > 0.97 and acc["held_out"][0, 1] < 0.7
    direction = probes.directions()[0, 0]
    assert direction @ planted / np.linalg.norm(direction) > 0.9


def test_cli_residual_on_a_planted_store_with_a_lens(llama_dir, toy, tmp_path, capsys):
    pairs, _, _ = toy
    # label 0 prompts end in " dog", label 1 in " fox": their last states differ from layer 0 on
    rows = []
    for p, (base, _) in enumerate(TOY):
        for filler in ("and the", "over the lazy"):
            for label, last in ((0, "dog"), (1, "fox")):
                rows.append({"text": f"{base} {filler} {last}", "label": label, "concept": "toy", "pair": p})
    prompts = tmp_path / "planted.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = build(llama_dir, prompts, tmp_path / "planted.zarr")
    lens_dir = tmp_path / "lens"
    Lens.identity(store, [b for b in store.layers if b != store.meta.n_layers]).save(lens_dir)
    out = tmp_path / "res"
    main(["linrep", "residual", str(store.url), "--prompts", str(prompts), "--pairs", str(pairs), "--lens",
          str(lens_dir), "--out", str(out), "--epochs", "40", "--lr", "0.05"])  # fmt: skip
    assert {p.name for p in out.iterdir()} == {"residual.json", "residual.md", "residual.png"}
    result = json.loads((out / "residual.json").read_text())
    table = result["table"]["toy"]
    assert set(table) == {str(b) for b in store.layers}
    assert table["0"]["probe_acc_held_out"] == 1.0 and result["concepts"][0]["held_out_pairs"] == 2
    for row in table.values():  # the identity lens maps every layer to itself
        assert row["lens_cos_euclidean"] == pytest.approx(row["dom_cos_euclidean"], abs=1e-6)
        assert row["lens_cos_causal"] == pytest.approx(row["dom_cos_causal"], abs=1e-6)
        assert -1 <= row["dom_cos_causal"] <= 1 and 0 <= row["probe_acc_held_out"] <= 1
    assert "probe held-out accuracy" in capsys.readouterr().out


def test_a_pair_is_never_on_both_sides_of_the_split(toy):
    pairs, prompts, store = toy
    des = design(read_prompts(prompts), load_concepts([pairs], store.tokenizer()), held_out_fraction=0.34, seed=3)
    held, train = set(des.pair[des.held_out]), set(des.pair[~des.held_out])
    assert held and train and not held & train and held | train == set(range(len(TOY)))


def expect_refusal(argv, message, capsys, out):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code != 0 and message in capsys.readouterr().err
    assert not out.exists()


def test_a_store_that_is_not_the_prompts_is_refused(llama_dir, toy, tmp_path, capsys, text_file):
    pairs, prompts, store = toy
    lines = prompts.read_text().splitlines(keepends=True)
    out = tmp_path / "res"
    base = ["linrep", "residual", str(store.url), "--pairs", str(pairs), "--out", str(out)]
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(lines[:-1]))
    expect_refusal([*base, "--prompts", str(fewer)], f"has {len(lines)} sequences but the prompts file has", capsys, out)
    changed = tmp_path / "changed.jsonl"
    row = json.loads(lines[5])
    row["text"] = row["text"].replace(".", ",")
    changed.write_text("".join(lines[:5] + [json.dumps(row) + "\n"] + lines[6:]))
    expect_refusal([*base, "--prompts", str(changed)], "sequence 5 of store", capsys, out)
    packed = build(llama_dir, text_file, tmp_path / "packed.zarr", packing="packed")
    with pytest.raises(PromptMismatch, match="not built with --packing padded"):
        check_prompts(packed, read_prompts(prompts))


def test_prompts_of_an_unknown_concept_or_pair_and_a_lens_of_another_model_are_refused(toy, tmp_path, capsys):
    pairs, prompts, store = toy
    out = tmp_path / "res"
    base = ["linrep", "residual", str(store.url), "--pairs", str(pairs), "--out", str(out)]
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({**r, "concept": "other"}) + "\n" for r in rows))
    expect_refusal([*base, "--prompts", str(other)], "concepts with no pair file: other", capsys, out)
    bad_pair = tmp_path / "bad_pair.jsonl"
    bad_pair.write_text("".join(json.dumps({**r, "pair": r["pair"] + 10}) + "\n" for r in rows))
    expect_refusal([*base, "--prompts", str(bad_pair)], "which is not a usable pair", capsys, out)
    lens = Lens.identity(store, [0])
    lens.config.model["weights_hash"] = "blake2b:another-model"
    lens.save(tmp_path / "lens")
    expect_refusal([*base, "--prompts", str(prompts), "--lens", str(tmp_path / "lens")], "fit a lens on a store",
                   capsys, out)  # fmt: skip
