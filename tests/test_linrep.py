"""Linear representations in the unembedding (lenscache.analysis.linrep): planted geometry is recovered."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from lenscache.analysis.concepts import ConceptError, ConceptPairs, load_pairs, parse_pairs, tokenize_concept
from lenscache.analysis.linrep import CausalInnerProduct, analyze_geometry, auroc, cohens_d
from lenscache.cache.build import BuildConfig, build_store
from lenscache.cache.model import ModelSpec
from lenscache.cache.text import DataSpec
from lenscache.tools.cli import main

V, D = 3000, 24
N_PAIRS = 20


def planted(seed: int = 0, n_concepts: int = 3):
    """An anisotropic unembedding with concepts planted along causally orthonormal directions.

    Rows are z Lᵀ with cov(z) = I exactly, so Cov(γ) ≈ L Lᵀ and the directions L u (u orthonormal) are
    orthogonal under the causal inner product while far from orthogonal in the Euclidean one.
    """
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((V, D))
    z -= z.mean(0)
    evals, evecs = np.linalg.eigh(z.T @ z / (V - 1))
    z = z @ (evecs / np.sqrt(evals)) @ evecs.T
    u = np.linalg.qr(rng.standard_normal((D, n_concepts)))[0].T  # orthonormal rows
    w = u.sum(0) / np.linalg.norm(u.sum(0))
    lmat = np.eye(D) + 3.0 * np.outer(w, w) + 0.3 * rng.standard_normal((D, D)) / np.sqrt(D)
    gamma = z @ lmat.T
    tokens = rng.permutation(V)[: 2 * N_PAIRS * n_concepts].reshape(n_concepts, N_PAIRS, 2)
    concepts = []
    for c in range(n_concepts):
        v = lmat @ u[c]
        for a, b in tokens[c]:
            gamma[b] = gamma[a] + v + 0.05 * lmat @ rng.standard_normal(D)
        ids = [(int(a), int(b)) for a, b in tokens[c]]
        concepts.append(concept(f"c{c}", ids))
    return gamma, concepts, rng


def concept(name: str, ids: list[tuple[int, int]]) -> ConceptPairs:
    return ConceptPairs(name, [(str(a), str(b)) for a, b in ids], list(range(len(ids))), ids)


def shuffled(c: ConceptPairs, rng: np.random.Generator) -> ConceptPairs:
    """The concept's tokens re-paired at random, each pair with a random side: no common direction."""
    toks = rng.permutation(np.asarray(c.ids).reshape(-1))
    return concept(c.name + "-shuffled", [(int(a), int(b)) for a, b in toks.reshape(-1, 2)])


def test_planted_concepts_are_linear_and_shuffled_pairs_are_not():
    gamma, concepts, rng = planted()
    result = analyze_geometry(gamma, concepts + [shuffled(concepts[0], rng)], n_random=500)
    for ip in ("euclidean", "causal"):
        for c in concepts:
            lin = result.linearity[ip][c.name]
            assert lin.auroc > 0.99 and lin.cohens_d > 1.5 and lin.mean_loo > 0.8, (ip, c.name, lin)
        control = result.linearity[ip]["c0-shuffled"]
        assert 0.25 < control.auroc < 0.75 and abs(control.mean_loo) < 0.3, (ip, control)


def test_causally_orthogonal_concepts_are_orthogonal_only_under_the_causal_inner_product():
    gamma, concepts, _ = planted()
    result = analyze_geometry(gamma, concepts, n_random=100)
    assert result.mean_abs_offdiag["causal"] < 0.1
    assert result.mean_abs_offdiag["euclidean"] > 0.3
    assert np.allclose(np.diag(result.cosines["causal"]), 1.0)


def test_causal_inner_product_whitening_equals_the_direct_computation():
    gamma, _, rng = planted(seed=1)
    ip = CausalInnerProduct(gamma)
    cov = np.cov(gamma, rowvar=False)
    x, y = rng.standard_normal((5, D)), rng.standard_normal((5, D))
    np.testing.assert_allclose(ip.inner(x, y), np.einsum("nd,nd->n", x, np.linalg.solve(cov, y.T).T), rtol=1e-8)
    # an embedding-side vector pairs with a whitened unembedding vector as λᵀγ, with norm² λᵀ Cov λ
    np.testing.assert_allclose((ip.embed(x) * ip.whiten(y)).sum(-1), (x * y).sum(-1), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose((ip.embed(x) ** 2).sum(-1), np.einsum("nd,de,ne->n", x, cov, x), rtol=1e-8)
    assert ip.ridge == 0.0


def test_a_singular_covariance_gets_a_stated_ridge():
    gamma, _, _ = planted(seed=2)
    gamma[:, -1] = 0.0  # one direction the vocabulary never uses
    ip = CausalInnerProduct(gamma)
    assert ip.ridge > 0 and np.isfinite(ip.whitener).all()


def test_auroc_and_cohens_d_against_their_definitions():
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 5, 40).astype(float), rng.integers(0, 5, 50).astype(float)  # many ties
    pairwise = ((a[:, None] > b[None]).sum() + 0.5 * (a[:, None] == b[None]).sum()) / (a.size * b.size)
    assert auroc(a, b) == pytest.approx(pairwise)
    pooled = np.sqrt(((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1)) / (a.size + b.size - 2))
    assert cohens_d(a, b) == pytest.approx((a.mean() - b.mean()) / pooled)


# ---- pair files and the CLI on a real tiny store whose head has a planted concept -------------------

TOY = [("quick", "brown"), ("dog", "fox"), ("lazy", "over"), ("is", "of"), ("and", "the"), ("capital", "layer")]


@pytest.fixture(scope="module")
def planted_store(llama_dir, tmp_path_factory, text_file):
    """A store of the tiny llama whose unembedding has γ(cf) = γ(base) + v for the TOY pairs."""
    root = tmp_path_factory.mktemp("linrep")
    model_dir = root / "model"
    shutil.copytree(llama_dir, model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        w = model.lm_head.weight
        v = torch.as_tensor(rng.standard_normal(w.shape[1]) * 3 * float(w.std()), dtype=w.dtype)
        for base, cf in TOY:
            (b,), (c,) = tok.encode(" " + base, add_special_tokens=False), tok.encode(" " + cf, add_special_tokens=False)
            w[c] = w[b] + v
    model.save_pretrained(model_dir)
    out = root / "s.zarr"
    build_store(BuildConfig(out=str(out), model=ModelSpec(str(model_dir)), data=DataSpec(str(text_file)),
                            seq_len=16, max_tokens=64, progress=False))  # fmt: skip
    return out


def pairs_file(path, pairs):
    path.write_text(json.dumps(pairs), encoding="utf-8")
    return path


def test_cli_geometry_recovers_the_planted_concept_of_a_stored_head(planted_store, tmp_path, capsys):
    toy = pairs_file(tmp_path / "toy.json", [list(p) for p in TOY] + [["quick", "zzqx"]])
    # the shared files' shape: objects with input/output
    objects = pairs_file(tmp_path / "objs.json", [{"input": b, "output": c} for b, c in reversed(TOY)])
    out = tmp_path / "geo"
    main(["linrep", "geometry", str(planted_store), "--pairs", str(toy), "--pairs", str(objects), "--out", str(out),
          "--n-random", "300"])  # fmt: skip
    result = json.loads((out / "geometry.json").read_text())
    assert {p.name for p in out.iterdir()} == {"geometry.json", "geometry.md", "orthogonality.png", "linearity.png"}
    toy_summary = result["concepts"][0]
    assert (toy_summary["n_usable"], toy_summary["n_skipped"]) == (len(TOY), 1)
    assert "'zzqx' is" in toy_summary["skipped"][0]["reason"]
    for ip in ("euclidean", "causal"):
        assert result["linearity"][ip]["toy"]["auroc"] > 0.99
        assert result["cosines"][ip][0][1] == pytest.approx(1.0)  # the same planted direction twice
    assert "toy" in (out / "geometry.md").read_text() and "AUROC" in capsys.readouterr().out


def test_pair_files_in_either_shape_and_malformed_ones():
    assert parse_pairs([["a", "b"], {"input": "c", "output": "d"}], "x") == [("a", "b"), ("c", "d")]
    for bad in ({"a": "b"}, ["ab", "cd"], [["a", "b", "c"]], [["a", 3]], [], [{"input": "a"}], [["a", " "]]):
        with pytest.raises(ConceptError, match="expected a JSON list of \\[base, counterfactual\\] pairs"):
            parse_pairs(bad, "x")


def test_fewer_than_three_usable_pairs_are_refused(llama_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_dir)
    with pytest.raises(ConceptError, match=r"concept 'few' has 2 usable pairs of 4 .* fewer than the 3 needed"):
        tokenize_concept("few", [("dog", "fox"), ("quick", "brown"), ("zzqx", "fox"), ("dog", "dog")], tok)
    name, pairs = load_pairs(pairs_file(tmp_path / "ok.json", [list(p) for p in TOY]))
    assert name == "ok" and tokenize_concept(name, pairs, tok).n_usable == len(TOY)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"quick": "brown"}, "expected a JSON list of"),
        ([["quick", "brown"], "dog"], "item 1 is"),
        ([["zzqx", "qqzv"], ["xxzq", "vvqz"], ["qzqz", "zqzq"]], "has 0 usable pairs of 3"),
        ([["quick", "brown"], ["dog", "fox"], ["zzqx", "fox"]], "has 2 usable pairs of 3"),
    ],
)
def test_cli_refuses_bad_pair_files_and_writes_nothing(planted_store, tmp_path, capsys, content, message):
    bad = pairs_file(tmp_path / "bad.json", content)
    with pytest.raises(SystemExit) as exc:
        main(["linrep", "geometry", str(planted_store), "--pairs", str(bad), "--out", str(tmp_path / "geo")])
    assert exc.value.code != 0 and message in capsys.readouterr().err
    assert not (tmp_path / "geo").exists() and [p.name for p in tmp_path.iterdir()] == ["bad.json"]


def test_cli_refuses_a_store_without_the_head(planted_store, tmp_path, capsys):
    headless = tmp_path / "headless.zarr"
    shutil.copytree(planted_store, headless)
    shutil.rmtree(headless / "head" / "unembed")
    toy = pairs_file(tmp_path / "toy.json", [list(p) for p in TOY])
    for argv in (
        ["geometry", str(headless), "--pairs", str(toy), "--out", str(tmp_path / "geo")],
        ["residual", str(headless), "--prompts", str(toy), "--pairs", str(toy), "--out", str(tmp_path / "geo")],
    ):
        with pytest.raises(SystemExit) as exc:
            main(["linrep", *argv])
        assert exc.value.code != 0 and "no head/unembed array" in capsys.readouterr().err
        assert not (tmp_path / "geo").exists()


def test_cli_refuses_an_existing_out_unless_overwrite(planted_store, tmp_path, capsys):
    toy = pairs_file(tmp_path / "toy.json", [list(p) for p in TOY])
    out = tmp_path / "geo"
    out.mkdir()
    (out / "keep").write_text("old")
    argv = ["linrep", "geometry", str(planted_store), "--pairs", str(toy), "--out", str(out), "--n-random", "50"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code != 0 and "already exists" in capsys.readouterr().err and (out / "keep").exists()
    main([*argv, "--overwrite"])
    assert not (out / "keep").exists() and (out / "geometry.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["geo", "toy.json"]  # no temporary left


def test_cli_prompts_skip_pairs_that_are_not_single_tokens(planted_store, tmp_path, capsys):
    toy = pairs_file(tmp_path / "toy.json", [list(p) for p in TOY] + [["zzqx", "fox"]])
    out = tmp_path / "prompts.jsonl"
    main(["linrep", "prompts", "--pairs", str(toy), "--tokenizer-store", str(planted_store), "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["pair"] for r in rows} == set(range(len(TOY)))  # pair 6 (zzqx) skipped
    assert {(r["label"], r["target"]) for r in rows if r["pair"] == 1} == {(0, "dog"), (1, "fox")}
    for r in rows:  # a prompt never mentions the word it predicts, and ends before it
        assert r["target"] not in r["text"].split() and not r["text"].endswith(" ")
    assert "6/7 pairs usable" in capsys.readouterr().out
