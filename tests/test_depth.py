"""Prediction depth: the definition on hand-made cases, the streamed pass against a brute-force one
over trajectories, the Parquet table and summary, rank correlations, and refused input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

import lenscache.cache.host_memory as host_memory
from lenscache.analysis.depth import (
    average_ranks,
    depth_from_agreement,
    prediction_depth,
    spearman,
    token_counts,
    write_depth,
)
from lenscache.analysis.trajectory import trajectory_from_store
from lenscache.cache.build import BuildConfig, build_store
from lenscache.cache.model import ModelSpec
from lenscache.cache.text import DataSpec
from lenscache.fit.affine import fit_affine
from lenscache.fit.lens import Lens
from lenscache.reader import open_store
from lenscache.tools.cli import main

SEQ = 16
N_SEQ = 12


@pytest.fixture(scope="module")
def world(tmp_path_factory, llama_dir, text_file) -> dict:
    root = tmp_path_factory.mktemp("depth")
    common = dict(model=ModelSpec(str(llama_dir)), data=DataSpec(str(text_file)), seq_len=SEQ,
                  max_tokens=SEQ * N_SEQ, seqs_per_chunk=4, progress=False)  # fmt: skip
    build_store(BuildConfig(out=str(root / "s.zarr"), **common))
    build_store(BuildConfig(out=str(root / "ends.zarr"), layers=[0, 3], **common))
    store = open_store(root / "s.zarr")
    lens = fit_affine(store, progress=False)
    lens.save(root / "affine")
    other = Lens.identity(store, [0, 1, 2], kind="affine")
    other.config.model = {**other.config.model, "weights_hash": "blake2b:" + "0" * 64, "id": "another-model"}
    other.save(root / "other")
    Lens.identity(store, [1, 2], kind="affine").save(root / "middle")
    return {"root": root, "store": store, "lens": lens}


def test_depth_is_the_first_boundary_of_the_final_run_of_agreement():
    boundaries = [0, 6, 14, 22, 30]
    agree = np.array(
        [  # one column per token, one row per boundary below the output
            [1, 0, 1, 0, 1, 0],
            [1, 1, 0, 0, 1, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 0],
        ],
        dtype=bool,
    )
    # settled from 0; from 6; agrees at 0, leaves at 6, back from 14 -> 14; only the last -> 22;
    # agrees at 0 and 6 but not 14 -> 22; never below the output -> 30 (the sentinel: the output)
    assert depth_from_agreement(agree, boundaries).tolist() == [0, 6, 14, 22, 22, 30]
    with pytest.raises(ValueError):
        depth_from_agreement(agree, boundaries[:-1])


def test_spearman_is_pearson_of_average_ranks():
    assert average_ranks(np.array([3.0, 1.0, 2.0, 2.0])).tolist() == [4.0, 1.0, 2.5, 2.5]
    rng = np.random.default_rng(0)
    x, y = rng.random(50), rng.random(50)
    d = average_ranks(x) - average_ranks(y)
    assert spearman(x, y) == pytest.approx(1 - 6 * (d * d).sum() / (50 * (50**2 - 1)))
    ties_x, ties_y = np.array([1, 2, 2, 3, 3, 3]), np.array([0.1, 0.5, 0.2, 0.9, 0.7, 0.8])
    rx, ry = np.array([1, 2.5, 2.5, 5, 5, 5]), np.array([1, 3, 2, 6, 4, 5])
    assert spearman(ties_x, ties_y) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    assert spearman(x, np.exp(3 * x)) == pytest.approx(1.0) and spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(np.ones(5), x[:5]) is None
    assert spearman(np.array([1.0, np.nan, 2.0, 3.0]), np.array([1.0, 5.0, 2.0, 3.0])) == pytest.approx(1.0)


def _brute_force(store, lenses: dict) -> dict[tuple[str, int, int], tuple[int, float, list[float]]]:
    """Depth from each stored sequence's trajectory, with loops: (lens, seq, pos) -> (depth, loss, KLs)."""
    out = {}
    for seq in range(store.n_sequences):
        traj = trajectory_from_store(store, seq, lenses)
        for name in lenses:
            top = traj.top1[name]
            for pos in range(SEQ):
                depth = traj.layers[-1]
                for i in reversed(range(len(traj.layers) - 1)):
                    if top[i, pos] != top[-1, pos]:
                        break
                    depth = traj.layers[i]
                kls = traj.stats[name]["kl_to_final"][:-1, pos].tolist()
                out[(name, seq, pos)] = (depth, float(traj.stats[name]["ce"][-1, pos]), kls)
    return out


def test_streamed_depth_equals_brute_force_over_trajectories(world, tmp_path):
    store, lens = world["store"], world["lens"]
    lenses = {"logit": None, "affine": lens}
    summary = prediction_depth(store, lenses, tmp_path / "d.parquet", batch_tokens=40, progress=False)
    table = pq.read_table(tmp_path / "d.parquet")
    assert table.num_rows == 2 * N_SEQ * SEQ == 2 * summary.tokens
    assert pq.ParquetFile(tmp_path / "d.parquet").num_row_groups > 1  # written as it streamed
    want = _brute_force(store, lenses)
    depths = set()
    for row in table.to_pylist():
        depth, loss, kls = want[(row["lens"], row["seq"], row["pos"])]
        assert row["depth"] == depth, row
        depths.add(depth)
        if np.isnan(loss):
            assert row["final_loss"] is None and row["next_token"] is None
        else:
            assert row["final_loss"] == pytest.approx(loss, rel=1e-4)
        assert [row[f"kl_{b}"] for b in (0, 1, 2)] == pytest.approx(kls, abs=2e-5)
    assert 3 in depths and len(depths) > 1  # tokens that never settle below the output, and some that do
    assert summary.layers == [0, 1, 2, 3]
    for name in lenses:
        s = summary.lenses[name]
        got = np.array([r["depth"] for r in table.to_pylist() if r["lens"] == name])
        assert s["histogram"] == {str(b): int((got == b).sum()) for b in summary.layers}
        assert -1 <= s["spearman_depth_vs_final_loss"] <= 1


def test_the_summary_relates_depth_to_loss_and_frequency(world, tmp_path):
    store = world["store"]
    counts = token_counts(store, store.meta.vocab_size)
    assert (counts == np.bincount(store.tokens().reshape(-1), minlength=store.meta.vocab_size)).all()
    summary = prediction_depth(store, {"logit": None}, tmp_path / "d.parquet", progress=False)
    rows = pq.read_table(tmp_path / "d.parquet").to_pandas()
    known = rows["final_loss"].notna()
    s = summary.lenses["logit"]
    assert s["spearman_depth_vs_final_loss"] == pytest.approx(
        spearman(rows["depth"][known].to_numpy(), rows["final_loss"][known].to_numpy()), abs=1e-6
    )
    assert s["spearman_depth_vs_log_token_frequency"] == pytest.approx(
        spearman(rows["depth"].to_numpy(), counts[rows["token"].to_numpy()].astype(float)), abs=1e-6
    )


def test_max_tokens_and_split_limit_the_rows(world, tmp_path):
    store = world["store"]
    summary = prediction_depth(store, {"logit": None}, tmp_path / "d.parquet", max_tokens=3 * SEQ, progress=False)
    table = pq.read_table(tmp_path / "d.parquet")
    assert summary.tokens == table.num_rows == 3 * SEQ
    assert sorted(set(table.column("seq").to_pylist())) == [0, 1, 2]
    summary = prediction_depth(store, {"logit": None}, tmp_path / "h.parquet", split="held_out", progress=False)
    assert set(pq.read_table(tmp_path / "h.parquet").column("seq").to_pylist()) == {N_SEQ - 2, N_SEQ - 1}


def test_write_depth_writes_the_three_files(world, tmp_path):
    summary = write_depth(world["store"], {"logit": None, "affine": world["lens"]}, tmp_path / "out", progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["depth.json", "depth.parquet", "depth.png"]
    data = json.loads((tmp_path / "out" / "depth.json").read_text())
    assert data["tokens"] == summary.tokens == N_SEQ * SEQ
    assert set(data["lenses"]) == {"logit", "affine"}
    assert sum(data["lenses"]["affine"]["histogram"].values()) == N_SEQ * SEQ


# ---- the command --------------------------------------------------------------------------------------
def run_main(argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: False)
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out + out.err


def test_the_command_prints_the_summary(world, tmp_path, capsys, monkeypatch):
    root = world["root"]
    code, out = run_main(["depth", str(root / "s.zarr"), "--lens", f"affine={root / 'affine'}", "--out",
                          str(tmp_path / "d"), "--max-tokens", "64", "--no-progress"], capsys, monkeypatch)  # fmt: skip
    assert code == 0, out
    assert "ρ(depth, final loss)" in out and "affine" in out
    assert pq.read_table(tmp_path / "d" / "depth.parquet").num_rows == 2 * 64


BAD = [
    (["{store}", "--lens", "other={root}/other"], "weights"),
    (["{ends}", "--lens", "middle={root}/middle"], "none of which"),
    (["{store}", "--layers", "5"], "[5]"),
    (["{store}", "--max-tokens", "0"], "max_tokens"),
    (["{root}/missing.zarr"], "no store"),
]


@pytest.mark.parametrize("args,words", BAD)
def test_bad_input_is_refused_with_nothing_written(world, tmp_path, capsys, monkeypatch, args, words):
    root = world["root"]
    where = {"store": root / "s.zarr", "ends": root / "ends.zarr", "root": root}
    out = tmp_path / "out"
    code, text = run_main(["depth", *(a.format(**where) for a in args), "--out", str(out), "--no-progress"],
                          capsys, monkeypatch)  # fmt: skip
    assert code != 0
    assert words in text, text
    assert "Traceback" not in text
    assert not out.exists()
