"""Causal fidelity of a causal basis: the hook edits exactly boundary l, the statistics are their
formulas, another model is refused, and the command writes its report whole or not at all."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import TRAIN_TEXT

from lenscache.analysis.fidelity import aitchison_similarity, clr_change, rankdata, spearman, top_over_random
from lenscache.cache.ablation import check_weights, edited_logprobs, logprobs_under_edits, recorded_logprobs
from lenscache.cache.build import BuildConfig, build_store
from lenscache.cache.model import ModelSpec, load_model
from lenscache.cache.text import DataSpec
from lenscache.errors import ModelError
from lenscache.fit.cbe import ablate, fit_cbe
from lenscache.fit.lens import Lens
from lenscache.fit.stream import StreamSpec
from lenscache.reader import open_store
from lenscache.tools.cbe_fidelity import FidelitySpec, cbe_fidelity, measure_fidelity, random_directions
from lenscache.tools.cli import main

SEQ = 16
N_SEQ = 40  # held out: the last 4 sequences
N_LAYERS = 3  # the tiny Llama's blocks


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, llama_dir) -> str:
    root = tmp_path_factory.mktemp("fidelity")
    text = root / "corpus.txt"
    text.write_text("\n\n".join(TRAIN_TEXT * 12), encoding="utf-8")
    out = root / "s.zarr"
    build_store(BuildConfig(out=str(out), model=ModelSpec(str(llama_dir)), data=DataSpec(str(text)), seq_len=SEQ,
                            max_tokens=SEQ * N_SEQ, seqs_per_chunk=4, progress=False))  # fmt: skip
    return str(out)


@pytest.fixture(scope="module")
def store(store_path):
    return open_store(store_path)


@pytest.fixture(scope="module")
def loaded(llama_dir):
    return load_model(ModelSpec(str(llama_dir), device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def ids(store) -> torch.Tensor:
    return torch.from_numpy(store.tokens(range(36, 39)).astype(np.int64))


def _basis(store, layers, mode="mean", lens=None, k=3):
    return fit_cbe(store, lens, layers, k=k, mode=mode, spec=StreamSpec(batch_tokens=64), steps=3, progress=False)


@pytest.fixture(scope="module")
def basis_dir(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("basis") / "b"
    _basis(store, [1, 2]).save(out)
    return out


def _unit(d: int, seed: int) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


# ---- the hook ---------------------------------------------------------------------------------------
def _later_layers(loaded, h: torch.Tensor, boundary: int) -> torch.Tensor:
    """The model's log-probabilities from state `h` at `boundary`: blocks boundary.. run by hand."""
    inner = loaded.model.model
    blocks = inner.layers
    inner.layers = torch.nn.ModuleList(list(blocks)[boundary:])
    try:
        with torch.inference_mode():
            logits = loaded.model(inputs_embeds=h, use_cache=False).logits
    finally:
        inner.layers = blocks
    return torch.log_softmax(logits.float(), dim=-1)


@pytest.mark.parametrize("boundary", range(N_LAYERS + 1))
def test_the_hook_edits_exactly_the_boundary_the_store_records(store, loaded, ids, boundary):
    clean, states = recorded_logprobs(loaded, ids, [boundary])
    seen = []
    same = edited_logprobs(loaded, ids, boundary, lambda h: seen.append(h.clone()) or h)
    torch.testing.assert_close(same, clean, rtol=0, atol=1e-6)  # the identity edit is the clean pass
    assert torch.equal(seen[0], states[0])  # the edit receives the recorded boundary...
    stored = torch.from_numpy(store.resid(boundary, range(36, 39)))
    torch.testing.assert_close(seen[0], stored, rtol=1e-2, atol=1e-2)  # ...which is the store's (bfloat16)
    # a mean ablation through the hook = the later blocks run by hand on the edited state
    v, mu = _unit(store.d_model, boundary), states[0].reshape(-1, store.d_model).mean(0)

    def edit(h):
        return ablate(h.reshape(-1, h.shape[-1]), v, "mean", mu).reshape(h.shape)

    hooked = edited_logprobs(loaded, ids, boundary, edit)
    assert float((hooked - clean).abs().max()) > 1e-3  # the edit changed the output
    torch.testing.assert_close(hooked, _later_layers(loaded, edit(states[0]), boundary), rtol=0, atol=2e-5)


def test_stacked_edits_equal_one_pass_each(loaded, ids, store):
    edits = [(lambda h, s=s: h * s) for s in (1.0, 0.5, -1.0)]
    one = list(logprobs_under_edits(loaded, ids, 2, edits, edits_per_pass=1))
    stacked = list(logprobs_under_edits(loaded, ids, 2, edits, edits_per_pass=2))
    assert len(stacked) == 3 and stacked[0].shape == ids.shape + (store.meta.vocab_size,)
    for a, b in zip(one, stacked, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert float((one[1] - one[0]).abs().max()) > 1e-3


@pytest.mark.parametrize("mode", ["mean", "zero", "resample"])
def test_at_the_last_boundary_the_model_side_is_the_logit_lens_side(store, loaded, mode):
    """Boundary n_layers through the head is the model's output: both sides of every ablation agree."""
    basis = _basis(store, [N_LAYERS], mode=mode, k=2)
    report = measure_fidelity(store, basis, loaded, None, FidelitySpec(n_random=2, progress=False))
    lf = report.layers[0]
    for group in (lf.cbe, lf.random):
        np.testing.assert_allclose(group["model_kl"], group["logit_kl"], rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(group["lens_align"], 1.0, atol=1e-4)  # the same change: similarity 1
    assert min(lf.cbe["model_kl"]) > 1e-4
    assert report.tokens == 4 * SEQ and report.sequences == [36, 37, 38, 39]
    assert report.clean_check < 1e-4  # the model's clean pass is the store's output


def test_random_directions_are_seeded_and_orthonormal():
    a, b = random_directions(64, 5, seed=1, layer=2), random_directions(64, 5, seed=1, layer=2)
    assert torch.equal(a, b) and not torch.equal(a, random_directions(64, 5, seed=2, layer=2))
    torch.testing.assert_close(a @ a.T, torch.eye(5), rtol=0, atol=1e-5)


# ---- the statistics ---------------------------------------------------------------------------------
def test_spearman_with_ties_is_pearson_of_averaged_ranks():
    x, y = [1.0, 2.0, 2.0, 3.0, 5.0], [2.0, 1.0, 4.0, 4.0, 9.0]
    rx, ry = np.array([1, 2.5, 2.5, 4, 5]), np.array([2, 1, 3.5, 3.5, 5])
    np.testing.assert_array_equal(rankdata(x), rx)
    np.testing.assert_array_equal(rankdata(y), ry)
    assert spearman(x, y) == pytest.approx(float(np.corrcoef(rx, ry)[0, 1]), abs=1e-12)
    perm = [3.0, 1.0, 4.0, 2.0, 5.0]  # no ties: 1 − 6 Σd² / (n (n² − 1))
    d = np.arange(1, 6) - np.array(perm)
    assert spearman(range(1, 6), perm) == pytest.approx(1 - 6 * (d**2).sum() / (5 * 24), abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert top_over_random([9.0, 7.0, 5.0, 3.0, 100.0], [1.0, 2.0, 3.0]) == pytest.approx(6.0 / 2.0)


def test_aitchison_similarity_is_one_for_the_same_change_and_minus_one_for_the_opposite():
    gen = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(6, 50, generator=gen), -1)
    step = torch.randn(6, 50, generator=gen)
    up, down, twice = (torch.log_softmax(p + s * step, -1) for s in (1.0, -1.0, 2.0))
    torch.testing.assert_close(aitchison_similarity(p, up, p, up), torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(aitchison_similarity(p, up, p, twice), torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(aitchison_similarity(p, up, p, down), -torch.ones(6, dtype=torch.float64))
    other = torch.log_softmax(p + torch.randn(6, 50, generator=gen), -1)
    a, b = clr_change(p, up), clr_change(p, other)  # the definition, written out
    direct = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    torch.testing.assert_close(aitchison_similarity(p, up, p, other), direct)
    u, q = up.double(), p.double()
    torch.testing.assert_close(a, u - u.mean(-1, keepdim=True) - (q - q.mean(-1, keepdim=True)))
    assert bool(aitchison_similarity(p, p, p, up).isnan().all())  # no change: undefined, left out


# ---- refusals ---------------------------------------------------------------------------------------
def test_another_models_weights_are_refused_naming_both_hashes(store, store_path, basis_dir, gpt2_dir, tmp_path):
    other = load_model(ModelSpec(str(gpt2_dir), device="cpu", dtype="float32"))
    with pytest.raises(ModelError) as err:
        check_weights(other, store.meta.model)
    mine, theirs = other.provenance["weights_hash"], store.meta.model["weights_hash"]
    assert mine != theirs and mine in str(err.value) and theirs in str(err.value)
    out = tmp_path / "report"
    with pytest.raises(ModelError, match="not the model the store was built from"):
        cbe_fidelity(store_path, str(basis_dir), str(gpt2_dir), out, spec=FidelitySpec(progress=False))
    assert not out.exists() and not (tmp_path / "report.partial").exists()


def _main(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    got = capsys.readouterr()
    return exit_info.value.code, got.out + got.err


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _other_model(basis: Path) -> None:
    cfg = json.loads((basis / "basis.json").read_text())
    cfg["model"]["weights_hash"] = "blake2b:" + "0" * 64
    (basis / "basis.json").write_text(json.dumps(cfg))


def _corrupt_held_out_tokens(st: Path) -> None:
    chunk = st / "tokens" / "c" / "0" / "0"  # the one chunk of token ids
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))


def test_bad_input_exits_nonzero_naming_the_problem_and_writes_nothing(store, store_path, basis_dir, llama_dir,
                                                                       tmp_path, capsys):  # fmt: skip
    lens = Lens.identity(store, [1, 2], kind="affine").requires_grad_(False)
    affine_basis = tmp_path / "affine_basis"
    _basis(store, [1, 2], lens=lens, k=2).save(affine_basis)
    lens.save(tmp_path / "lens")
    with torch.no_grad():
        lens.bias.add_(0.01)
    lens.save(tmp_path / "other_lens")
    s, b = store_path, str(basis_dir)
    cases = {
        "other model": (s, str(_edited_copy(basis_dir, tmp_path / "b2", _other_model)), "fitted on model"),
        "no head": (str(_edited_copy(Path(s), tmp_path / "nohead.zarr", lambda p: shutil.rmtree(p / "head" / "unembed"))),
                    b, "no head/unembed"),  # fmt: skip
        "corrupt chunk": (str(_edited_copy(Path(s), tmp_path / "bad.zarr", _corrupt_held_out_tokens)), b, "corrupt"),
        "lens missing": (s, str(affine_basis), "belongs to a affine lens; pass that lens's directory"),
        "wrong lens": (s, str(affine_basis), "not to the given affine lens"),
        "max tokens": (s, b, "max_tokens (--max-tokens) must be at least 1"),
    }
    extra = {"wrong lens": ["--lens", str(tmp_path / "other_lens")], "max tokens": ["--max-tokens", "0"]}
    for name, (st, bd, message) in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '_')}"
        argv = ["cbe", "fidelity", st, "--basis", bd, "--model", str(llama_dir), "--out", str(out), "--no-progress"]
        code, text = _main(argv + extra.get(name, []), capsys)
        assert code != 0 and message in text and "Traceback" not in text, (name, text)
        assert not out.exists() and not Path(str(out) + ".partial").exists(), name
    # the same affine basis with its own lens is measured
    out = tmp_path / "out-affine"
    argv = ["cbe", "fidelity", s, "--basis", str(affine_basis), "--model", str(llama_dir), "--out", str(out),
            "--lens", str(tmp_path / "lens"), "--max-tokens", "16", "--no-progress"]  # fmt: skip
    main(argv)  # returns on success
    assert json.loads((out / "fidelity.json").read_text())["lens"] == "affine"


def test_cli_writes_json_markdown_and_png_and_refuses_an_existing_report(store_path, basis_dir, llama_dir, tmp_path,
                                                                          capsys):  # fmt: skip
    out = tmp_path / "report"
    args = ["cbe", "fidelity", store_path, "--basis", str(basis_dir), "--model", str(llama_dir), "--out", str(out),
            "--random", "4", "--max-tokens", "40", "--no-progress"]  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "lenscache.tools.cli", *args], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["fidelity.json", "fidelity.md", "fidelity.png"]
    assert not (tmp_path / "report.partial").exists()
    report = json.loads((out / "fidelity.json").read_text())
    assert [lf["layer"] for lf in report["layers"]] == [1, 2] and report["mode"] == "mean"
    assert report["tokens"] == 3 * SEQ and report["positions"] == SEQ and report["n_random"] == 4
    for lf in report["layers"]:
        assert len(lf["cbe"]["model_kl"]) == 3 and len(lf["random"]["model_kl"]) == 4
        assert -1 <= lf["spearman"] <= 1 and lf["top4_over_random"] > 0
        assert -1 <= lf["alignment"]["lens"] <= 1 and lf["alignment"]["lens"] == lf["alignment"]["logit"]
    assert "| layer | ρ (basis)" in (out / "fidelity.md").read_text()
    assert (out / "fidelity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = (out / "fidelity.json").read_text()
    code, text = _main(args, capsys)
    assert code != 0 and "not empty; pass --overwrite" in text and (out / "fidelity.json").read_text() == before
    main([*args, "--overwrite", "--seed", "1"])
    assert json.loads((out / "fidelity.json").read_text())["seed"] == 1 and before != (out / "fidelity.json").read_text()
    assert not (tmp_path / "report.partial").exists() and not (tmp_path / "report.old").exists()
