"""Prompt-injection detection: the generator, features read from a padded store, detectors, AUROC, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from lenscache.analysis.anomaly import (
    FINAL_SET,
    LENGTH_SET,
    Features,
    auroc_with_ci,
    check_prompts_match,
    detect,
    detector_scores,
    group_split,
    markdown,
    pair_matrix,
    prompt_features,
    resampled_auroc,
)
from lenscache.analysis.injection import BENIGN_ALL, INJECTIONS, prompts, read_jsonl, write_jsonl
from lenscache.cache.build import BuildConfig, build_store
from lenscache.cache.model import ModelSpec
from lenscache.cache.text import DataSpec
from lenscache.errors import DataError
from lenscache.fit.lens import Lens
from lenscache.reader import open_store
from lenscache.tools.cli import main

SEQ_LEN = 256  # the tiny tokenizer spends many tokens per word


# ---- the generator -------------------------------------------------------------------------------------
def test_generator_counts_determinism_and_twins():
    rows = prompts(30, 45, seed=3)
    assert [r["label"] for r in rows].count("clean") == 30 and [r["label"] for r in rows].count("injected") == 45
    assert rows == prompts(30, 45, seed=3)
    assert rows != prompts(30, 45, seed=4)
    assert len({r["text"] for r in rows}) == len(rows)
    clean = {r["group"]: r for r in rows if r["label"] == "clean"}
    assert sorted(clean) == list(range(30))
    fixed_parts = [t.split("{x}")[0] for t in INJECTIONS]
    for r in clean.values():
        assert r["injection"] is None and not any(p in r["text"] for p in fixed_parts)
        assert r["benign"] in BENIGN_ALL and (" " + r["benign"] + "\n") in r["text"]
    for r in rows:
        if r["label"] == "injected":
            twin = clean[r["group"]]
            assert r["family"] == twin["family"] and r["injection"] in r["text"] and r["benign"] is None
            # the twin is the clean prompt with its benign sentence replaced by the injection, before the cue
            assert r["text"].replace(r["injection"], twin["benign"]) == twin["text"]
            assert r["text"].rsplit("\n", 1)[1] == twin["text"].rsplit("\n", 1)[1]
    assert len({r["family"] for r in rows}) == 6
    # control "none": the clean prompt is the injected one without its injection (the unmatched benchmark)
    plain = prompts(30, 45, seed=3, control="none")
    bare = {r["group"]: r["text"] for r in plain if r["label"] == "clean"}
    assert all(r["benign"] is None for r in plain)
    for r in plain:
        if r["label"] == "injected":
            assert r["text"].replace(" " + r["injection"], "") == bare[r["group"]]
    with pytest.raises(DataError, match="unknown control 'odd'; choose one of benign, none"):
        prompts(3, 3, control="odd")


def _char_lengths(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    length = np.asarray([len(r["text"]) for r in rows], np.float64)
    injected = np.asarray([r["label"] == "injected" for r in rows])
    return length[~injected], length[injected]


def test_benign_control_matches_the_injected_prompts_length():
    """Clean and injected prompts are about as long (characters: the generator has no tokenizer), so the
    length baseline is near chance; without the control it is not."""
    rows = prompts(200, 200, seed=0)
    clean, injected = _char_lengths(rows)
    assert abs(clean.mean() - injected.mean()) / injected.mean() < 0.02
    assert abs(np.median(clean) - np.median(injected)) / np.median(injected) < 0.03
    auc, _, _ = auroc_with_ci(clean, injected, n_boot=10)
    assert 0.35 <= auc <= 0.65
    twins = {r["group"]: r for r in rows if r["label"] == "injected"}
    gaps = [abs(len(r["benign"]) - len(twins[r["group"]]["injection"])) for r in rows if r["benign"]]
    assert np.mean(gaps) <= 2.0  # each clean prompt matches its own twin, not just the average
    clean, injected = _char_lengths(prompts(200, 200, seed=0, control="none"))
    assert auroc_with_ci(clean, injected, n_boot=10)[0] > 0.85 and injected.mean() > 1.3 * clean.mean()
    # more clean prompts than twins: the unpaired ones still match an injection's length distribution
    clean, injected = _char_lengths(prompts(300, 100, seed=1))
    assert abs(clean.mean() - injected.mean()) / injected.mean() < 0.03


def test_jsonl_round_trip_and_bad_rows(tmp_path):
    rows = prompts(5, 5)
    assert read_jsonl(write_jsonl(rows, tmp_path / "p.jsonl")) == rows
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x", "label": "odd", "group": 0}) + "\n")
    with pytest.raises(DataError, match="line 1: 'label' must be one of clean, injected"):
        read_jsonl(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "none.jsonl")


def test_group_split_never_puts_twins_on_both_sides():
    rows = prompts(40, 80, seed=1)
    split = group_split(rows, 0.5, seed=2)
    groups = np.asarray([r["group"] for r in rows])
    labels = np.asarray([r["label"] for r in rows])
    train_groups = set(groups[split.train])
    held_groups = set(groups[split.clean]) | set(groups[split.injected])
    assert train_groups and held_groups and not train_groups & held_groups
    assert (labels[split.train] == "clean").all() and (labels[split.clean] == "clean").all()
    assert (labels[split.injected] == "injected").all()
    assert len(train_groups) == 20 and split.injected.size == 40  # every held-out group's two twins
    again = group_split(rows, 0.5, seed=2)
    assert np.array_equal(again.train, split.train) and np.array_equal(again.injected, split.injected)


# ---- detectors and AUROC --------------------------------------------------------------------------------
def test_bootstrap_replicates_are_aurocs_of_resamples():
    rng = np.random.default_rng(0)
    clean, injected = rng.normal(size=30).round(1), rng.normal(0.5, size=25).round(1)  # ties included
    pairs = pair_matrix(clean, injected)
    assert pairs.mean() == pytest.approx(roc_auc_score(np.r_[np.zeros(30), np.ones(25)], np.r_[clean, injected]))
    ic, ii = rng.integers(0, 30, size=30), rng.integers(0, 25, size=25)
    counts = resampled_auroc(pairs, np.bincount(ic, minlength=30)[None], np.bincount(ii, minlength=25)[None])
    want = roc_auc_score(np.r_[np.zeros(30), np.ones(25)], np.r_[clean[ic], injected[ii]])
    assert counts[0] == pytest.approx(want)


def _planted(shift: float, n: int = 120, d: int = 6, seed: int = 0) -> tuple[list[dict], Features]:
    rng = np.random.default_rng(seed)
    rows = [{"label": "clean", "group": g, "text": "", "family": ""} for g in range(n)]
    rows += [{"label": "injected", "group": g, "text": "", "family": ""} for g in range(n)]
    x = rng.normal(size=(2 * n, d))
    x[n:] += shift
    return rows, Features([f"f{i}" for i in range(d)], x, {FINAL_SET: [0], "all": list(range(d))}, [0], ["logit"])


class _FakeStore:
    url = "planted"


@pytest.mark.parametrize("detector", ["isolation_forest", "lof"])
def test_detectors_separate_planted_anomalies_and_not_identical_ones(detector):
    rows, feats = _planted(shift=3.0)
    result = detect(_FakeStore(), rows, feats, seed=0, n_boot=500)
    row = next(r for r in result.rows if r.feature_set == "all" and r.detector == detector)
    assert row.auroc > 0.95 and row.ci_low > 0.9 and row.ci_low <= row.auroc <= row.ci_high
    rows, feats = _planted(shift=0.0)
    result = detect(_FakeStore(), rows, feats, seed=0, n_boot=500)
    row = next(r for r in result.rows if r.feature_set == "all" and r.detector == detector)
    assert abs(row.auroc - 0.5) < 0.15 and row.ci_low < 0.5 < row.ci_high
    assert result.n_train_clean == 60 and result.n_heldout_clean == 60 and result.n_heldout_injected == 60


def test_length_baseline_is_scored_raw_and_reported():
    rows, feats = _planted(shift=0.0)
    rng = np.random.default_rng(3)
    length = rng.integers(20, 40, size=len(rows)).astype(np.float64)
    length[len(rows) // 2 :] += 4  # injected prompts a little longer
    names = ["final_entropy", "prompt_length", *feats.names[1:]]
    values = np.c_[feats.values[:, :1], length, feats.values[:, 1:]]
    feats = Features(names, values, {FINAL_SET: [0], LENGTH_SET: [1], "all": [0, *range(2, 7)]}, [0], ["logit"])
    result = detect(_FakeStore(), rows, feats, seed=0, n_boot=200)
    split = group_split(rows, 0.5, 0)
    got = {r.detector: r for r in result.rows if r.feature_set == LENGTH_SET}
    assert sorted(got) == ["isolation_forest", "lof", "raw"] and got["raw"].n_features == 1
    y = np.r_[np.zeros(split.clean.size), np.ones(split.injected.size)]
    clean, injected = length[split.clean], length[split.injected]
    assert got["raw"].auroc == pytest.approx(roc_auc_score(y, np.r_[clean, injected])) and got["raw"].auroc > 0.7
    assert result.mean_length == pytest.approx({"clean": clean.mean(), "injected": injected.mean()})
    md = markdown(result)
    assert f"| prompt length | 1 | {got['raw'].auroc:.3f} [" in md
    assert f"held out: clean {clean.mean():.2f}, injected {injected.mean():.2f}" in md
    assert result.to_dict()["mean_length"] == result.mean_length


def test_detectors_are_fitted_on_clean_training_prompts_only():
    """The raw score is the first column; the detectors score a point far from the training prompts high."""
    rng = np.random.default_rng(1)
    train = rng.normal(size=(50, 3))
    test = np.array([[0.0, 0.0, 0.0], [8.0, 8.0, 8.0]])
    for det in ("isolation_forest", "lof"):
        s = detector_scores(det, train, test)
        assert s[1] > s[0]
    assert detector_scores("raw", train, test).tolist() == [0.0, 8.0]
    auc, lo, hi = auroc_with_ci(np.zeros(10), np.ones(10), n_boot=100)
    assert (auc, lo, hi) == (1.0, 1.0, 1.0)


# ---- features from a tiny padded store -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(llama_dir, tmp_path_factory):
    """Prompts, their padded store (several chunks) and a fitted-looking lens with random weights."""
    root = tmp_path_factory.mktemp("anomaly")
    rows = prompts(12, 12, seed=0)
    data = write_jsonl(rows, root / "prompts.jsonl")
    cfg = BuildConfig(
        out=str(root / "p.zarr"), model=ModelSpec(str(llama_dir)), data=DataSpec(str(data)), packing="padded",
        seq_len=SEQ_LEN, codec="fp32-zstd", seqs_per_chunk=5, progress=False,
    )  # fmt: skip
    build_store(cfg)
    store = open_store(root / "p.zarr")
    layers = [b for b in store.layers if b != store.meta.n_layers]
    lens = Lens.identity(store, layers, kind="affine")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lens.weight.copy_(0.2 * torch.randn(lens.weight.shape, generator=gen))
        lens.bias.copy_(0.5 * torch.randn(lens.bias.shape, generator=gen))
    lens.save(root / "lens")
    return {"root": root, "rows": rows, "data": data, "store": store, "lens": lens, "llama": llama_dir}


def _direct(store, lens, layer, i, last):
    """KL(final || lens) and entropy at position `last` of sequence i, recomputed from store.resid."""
    h = torch.from_numpy(store.resid(layer, [i])[0, last])
    if lens is not None:
        h = h + h @ lens.weight[lens.index(layer)].detach().T + lens.bias[lens.index(layer)].detach()
    logp = torch.log_softmax(store.unembed(h).double(), -1)
    final = store.final_logprobs([i])[0, last].double()
    kl = float((final.exp() * (final - logp)).sum())
    return kl, float(-(logp.exp() * logp).sum()), float(-(final.exp() * final).sum())


def test_features_equal_a_direct_recomputation_at_the_last_position(tiny):
    store, lens = tiny["store"], tiny["lens"]
    assert store.padded and store.n_sequences == 24 and store.meta.build.seqs_per_chunk == 5
    lengths = store.lengths()
    assert len(set(lengths.tolist())) > 1  # prompts of different lengths: the position matters
    feats = prompt_features(store, {"affine": lens})
    col = {name: k for k, name in enumerate(feats.names)}
    for i in range(store.n_sequences):
        for layer in feats.layers:
            for name, which in (("logit", None), ("affine", lens)):
                kl, ent, final_ent = _direct(store, which, layer, i, lengths[i] - 1)
                assert feats.values[i, col[f"{name}_kl_{layer}"]] == pytest.approx(kl, rel=1e-4, abs=1e-5)
                assert feats.values[i, col[f"{name}_entropy_{layer}"]] == pytest.approx(ent, rel=1e-4, abs=1e-5)
        assert feats.values[i, col["final_entropy"]] == pytest.approx(final_ent, rel=1e-4, abs=1e-5)
    assert feats.values[:, col["prompt_length"]].tolist() == lengths.tolist()
    assert feats.sets[LENGTH_SET] == [col["prompt_length"]]
    assert all(col["prompt_length"] not in cols for s, cols in feats.sets.items() if s != LENGTH_SET)
    assert set(feats.sets) == {FINAL_SET, LENGTH_SET, "logit lens", "affine", "logit lens + affine"}
    assert len(feats.sets["logit lens + affine"]) == 1 + 4 * len(feats.layers)


def test_store_and_prompts_must_match(tiny):
    store, rows = tiny["store"], tiny["rows"]
    check_prompts_match(store, rows)
    with pytest.raises(DataError, match="24 sequences but the prompts file has 23"):
        check_prompts_match(store, rows[:-1])
    swapped = [rows[1], rows[0], *rows[2:]]
    with pytest.raises(DataError, match="sequence 0 of store .* is not prompt 0"):
        check_prompts_match(store, swapped)
    lengths = store.lengths().tolist()
    i, j = next((i, j) for i in range(24) for j in range(i + 1, 24) if lengths[i] == lengths[j])
    same_length = list(rows)
    same_length[i], same_length[j] = rows[j], rows[i]  # equal token counts: only the ids tell them apart
    with pytest.raises(DataError, match=f"sequence {i} of store"):
        check_prompts_match(store, same_length)
    edited = [*rows[:-1], {**rows[-1], "text": rows[-1]["text"] + " extra"}]
    with pytest.raises(DataError, match="sequence 23 of store"):
        check_prompts_match(store, edited)


# ---- the CLI -----------------------------------------------------------------------------------------
def test_cli_end_to_end(tiny, tmp_path, capsys):
    prompts_file, store, out = tmp_path / "p.jsonl", tmp_path / "s.zarr", tmp_path / "report"
    main(["anomaly", "prompts", "--out", str(prompts_file), "--clean", "12", "--injected", "12"])
    assert prompts_file.read_text() == tiny["data"].read_text()  # the CLI writes what the API gives
    main(["build", "--model", str(tiny["llama"]), "--data", str(prompts_file), "--out", str(store), "--seq-len",
          str(SEQ_LEN), "--packing", "padded", "--no-progress"])  # fmt: skip
    capsys.readouterr()
    main(["anomaly", "detect", str(store), "--prompts", str(prompts_file), "--lens", f"aff={tiny['root'] / 'lens'}",
          "--out", str(out), "--bootstrap", "200", "--no-progress"])  # fmt: skip
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["anomaly.json", "anomaly.md", "anomaly.png", "features.npz"]
    report = json.loads((out / "anomaly.json").read_text())
    assert report["n_train_clean"] + report["n_heldout_clean"] == 12 and report["n_boot"] == 200
    sets = {(r["feature_set"], r["detector"]) for r in report["rows"]}
    assert ("final entropy", "raw") in sets and ("logit lens + aff", "lof") in sets and len(sets) == 2 * 3 + 2 * 3
    assert {("prompt length", d) for d in ("raw", "isolation_forest", "lof")} <= sets
    assert set(report["mean_length"]) == {"clean", "injected"}
    for r in report["rows"]:
        assert 0.0 <= r["ci_low"] <= r["auroc"] <= r["ci_high"] <= 1.0
    md = (out / "anomaly.md").read_text()
    assert "| prompt length | 1 |" in md and "Mean prompt length (tokens" in md
    assert "| logit lens + aff |" in md and "IsolationForest" in md and md in printed
    assert (out / "anomaly.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with np.load(out / "features.npz") as npz:
        assert npz["values"].shape[0] == 24 and list(npz["labels"]).count("injected") == 12
    (out / "stale.txt").write_text("old")
    main(["anomaly", "detect", str(store), "--prompts", str(prompts_file), "--out", str(out), "--bootstrap", "50",
          "--overwrite", "--no-progress"])  # fmt: skip
    assert "stale.txt" not in {p.name for p in out.iterdir()} and json.loads((out / "anomaly.json").read_text())["n_boot"] == 50
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    main(["anomaly", "prompts", "--out", str(tmp_path / "none.jsonl"), "--clean", "5", "--injected", "5", "--control",
          "none"])  # fmt: skip
    assert read_jsonl(tmp_path / "none.jsonl") == prompts(5, 5, control="none")


def _fails(argv, capsys, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code != 0 and message in err, err


def test_cli_refusals_write_nothing(tiny, tmp_path, capsys):
    store, good = str(tiny["root"] / "p.zarr"), str(tiny["data"])
    other = write_jsonl(prompts(12, 12, seed=5), tmp_path / "other.jsonl")
    out = tmp_path / "out"
    _fails(["anomaly", "detect", store, "--prompts", str(other), "--out", str(out)], capsys, "is not prompt 0")
    _fails(["anomaly", "detect", store, "--prompts", good, "--lens", f"x={tmp_path}", "--out", str(out)], capsys,
           "is not a lens directory")  # fmt: skip
    alien = Lens.load(tiny["root"] / "lens")
    alien.config.model["weights_hash"] = "sha256:other"
    alien.save(tmp_path / "alien")
    _fails(["anomaly", "detect", store, "--prompts", good, "--lens", f"x={tmp_path / 'alien'}", "--out", str(out)],
           capsys, "fit a lens on a store of that model")  # fmt: skip
    _fails(["anomaly", "detect", store, "--prompts", str(tmp_path / "none.jsonl"), "--out", str(out)], capsys,
           "does not exist")  # fmt: skip
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(["anomaly", "detect", store, "--prompts", good, "--out", str(out)], capsys, "already exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    _fails(["anomaly", "prompts", "--out", str(other)], capsys, "already exists")
    assert read_jsonl(other) == prompts(12, 12, seed=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alien", "other.jsonl", "out"]
