"""Prediction trajectories: each cell is the formula, the live model gives the store's grid, the table
and the figure are written whole, and bad input is refused with nothing written."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import lenscache.cache.host_memory as host_memory
from lenscache.analysis.trajectory import (
    STATS,
    Trajectory,
    check_lens_for_model,
    trajectory_from_states,
    trajectory_from_store,
    write_json,
    write_parquet,
)
from lenscache.analysis.trajectory_plot import cell_label, plot_trajectory, window_indices
from lenscache.cache.build import BuildConfig, build_store
from lenscache.cache.live import run_text, run_tokens, text_tokens
from lenscache.cache.model import ModelSpec, load_model
from lenscache.cache.text import DataSpec
from lenscache.errors import DataError, LensError, SelectionError
from lenscache.fit.affine import fit_affine
from lenscache.fit.lens import Lens
from lenscache.reader import open_store
from lenscache.tools.cli import main

SEQ = 16
N_SEQ = 12


@pytest.fixture(scope="module")
def world(tmp_path_factory, llama_dir, text_file) -> dict:
    """An fp32 store built one sequence per forward pass (so the live pass is the same computation),
    an affine lens, a lens of 'another model', a store of boundaries 0 and 3 only and a lens of 1, 2."""
    root = tmp_path_factory.mktemp("trajectory")
    common = dict(model=ModelSpec(str(llama_dir)), data=DataSpec(str(text_file)), seq_len=SEQ,
                  max_tokens=SEQ * N_SEQ, seqs_per_chunk=4, batch_size=1, codec="fp32-zstd", progress=False)  # fmt: skip
    build_store(BuildConfig(out=str(root / "s.zarr"), **common))
    build_store(BuildConfig(out=str(root / "ends.zarr"), layers=[0, 3], **common))
    store = open_store(root / "s.zarr")
    lens = fit_affine(store, progress=False)
    lens.save(root / "affine")
    other = Lens.identity(store, [0, 1, 2], kind="affine")
    other.config.model = {**other.config.model, "weights_hash": "blake2b:" + "0" * 64, "id": "another-model"}
    other.save(root / "other")
    Lens.identity(store, [1, 2], kind="affine").save(root / "middle")
    # a lens far from the model: KLs large enough that KL(final ‖ lens) and KL(lens ‖ final) differ
    far = Lens.identity(store, [0, 1, 2], kind="affine")
    with torch.no_grad():
        far.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    return {"root": root, "store": store, "lens": lens, "far": far, "llama": llama_dir}


def _direct(store, lens, seq: int, layer: int, pos: int) -> dict:
    """One cell recomputed from the store's arrays with plain torch."""
    h = torch.from_numpy(store.resid(layer, [seq])[0][pos])
    h = lens.translate(h, layer) if lens is not None and layer != store.meta.n_layers else h
    with torch.no_grad():
        logp = torch.log_softmax(store.unembed(h).double(), -1)
    final = store.final_logprobs([seq])[0][pos].double()
    nxt = int(store.tokens([seq])[0][pos + 1])
    order = torch.argsort(logp, descending=True)
    return {
        "top1": int(logp.argmax()),
        "p_top1": float(logp.exp().max()),
        "entropy": float(-(logp.exp() * logp).sum()),
        "kl_to_final": float((final.exp() * (final - logp)).sum()),
        "ce": float(-logp[nxt]),
        "rank": int((order == nxt).nonzero()[0, 0]) + 1,
    }


@pytest.mark.parametrize(
    "name,layer,pos", [("affine", 1, 5), ("logit", 0, 9), ("affine", 2, 0), ("logit", 3, 14), ("far", 1, 3)]
)
def test_a_cell_is_the_direct_recomputation(world, name, layer, pos):
    store, lenses = world["store"], {"logit": None, "affine": world["lens"], "far": world["far"]}
    traj = trajectory_from_store(store, 2, lenses)
    lens = lenses[name]
    assert traj.layers == [0, 1, 2, 3]
    row, col = traj.layers.index(layer), pos
    want = _direct(store, lens, 2, layer, pos)
    got = {k: traj.stats[name][k][row, col] for k in STATS}
    assert traj.top1[name][row, col] == want["top1"]
    assert traj.top1_texts[name][row][col] == store.tokenizer().decode([want["top1"]])
    for k in ("p_top1", "entropy", "ce"):
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-5), k
    assert got["kl_to_final"] == pytest.approx(want["kl_to_final"], rel=1e-4, abs=2e-5)
    if name == "far":
        assert want["kl_to_final"] > 0.01  # far enough for the direction of the KL to matter
    assert got["rank"] == want["rank"]
    assert traj.next_tokens[col] == store.tokens([2])[0][pos + 1]


def test_the_last_row_is_the_model_and_the_last_position_has_no_next_token(world):
    store, lens = world["store"], world["lens"]
    traj = trajectory_from_store(store, 1, {"logit": None, "affine": lens})
    for name in ("logit", "affine"):
        s = traj.stats[name]
        assert np.allclose(s["kl_to_final"][-1], 0, atol=1e-5)
        assert np.isnan(s["ce"][:, -1]).all() and (s["rank"][:, -1] == -1).all()
        assert np.isfinite(s["ce"][:, :-1]).all() and (s["rank"][:, :-1] >= 1).all()
    final_top = store.final_logprobs([1])[0].argmax(-1).numpy()
    assert (traj.top1["affine"][-1] == final_top).all() and (traj.top1["logit"][-1] == final_top).all()
    # the affine lens is not the logit lens: some cell below the output differs
    assert not np.allclose(traj.stats["affine"]["kl_to_final"][:-1], traj.stats["logit"]["kl_to_final"][:-1])


def test_positions_select_columns_with_their_next_tokens(world):
    store = world["store"]
    full = trajectory_from_store(store, 3, {"logit": None})
    part = trajectory_from_store(store, 3, {"logit": None}, positions=range(4, 9))
    assert part.positions.tolist() == [4, 5, 6, 7, 8]
    for k in STATS:
        assert np.allclose(part.stats["logit"][k], full.stats["logit"][k][:, 4:9], equal_nan=True), k
    with pytest.raises(SelectionError, match="positions"):
        trajectory_from_store(store, 3, {"logit": None}, positions=range(10, 40))


def test_the_live_model_gives_the_stores_grid(world):
    store, lens = world["store"], world["lens"]
    loaded = load_model(ModelSpec(str(world["llama"]), device="cpu"))
    lenses = {"logit": None, "affine": lens}
    for seq in (0, 5):
        tokens = store.tokens([seq])[0]
        live = run_tokens(loaded, tokens)
        assert sorted(live.resid) == [0, 1, 2, 3]
        got = trajectory_from_states(live.resid, live.final_logprobs, live.tokens, live.unembed, lenses,
                                     live.tokenizer, n_layers=live.n_layers)  # fmt: skip
        want = trajectory_from_store(store, seq, lenses)
        assert got.layers == want.layers and got.token_texts == want.token_texts
        for name in lenses:
            assert (got.top1[name] == want.top1[name]).all()
            assert (got.stats[name]["rank"] == want.stats[name]["rank"]).all()
            for k in ("p_top1", "entropy", "kl_to_final", "ce"):
                assert np.allclose(got.stats[name][k], want.stats[name][k], atol=1e-5, equal_nan=True), (name, k)


def test_a_text_is_tokenized_as_a_build_does(world):
    loaded = load_model(ModelSpec(str(world["llama"]), device="cpu"))
    text = "Paris is the capital of France"
    ids = text_tokens(loaded, text)
    body = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.tolist() == [loaded.tokenizer.bos_token_id, *body]
    assert run_text(loaded, text).tokens.tolist() == ids.tolist()
    for empty in ("", "  \n"):
        with pytest.raises(DataError, match="empty"):
            text_tokens(loaded, empty)
    with pytest.raises(DataError, match="context"):
        text_tokens(loaded, "The quick brown fox " * 200)  # the tiny model's context is 256 tokens


def test_a_lens_of_another_model_is_refused_for_a_loaded_model(world):
    prov = {"id": "m", "weights_hash": world["lens"].config.model["weights_hash"]}
    check_lens_for_model(world["lens"], prov, 64, 3)
    with pytest.raises(LensError, match="weights"):
        check_lens_for_model(Lens.load(world["root"] / "other"), prov, 64, 3, "other")
    with pytest.raises(LensError, match="shape"):
        check_lens_for_model(world["lens"], prov, 64, 4)


def test_tables_are_readable_with_the_right_columns_and_rows(world, tmp_path):
    traj = trajectory_from_store(world["store"], 4, {"logit": None, "affine": world["lens"]})
    table = pq.read_table(write_parquet(traj, tmp_path / "t.parquet"))
    assert {"lens", "layer", "pos", "token", "top1", "p_top1", "entropy", "kl_to_final", "ce", "rank"} <= set(
        table.column_names
    )
    assert table.num_rows == 2 * len(traj.layers) * SEQ
    rows = table.to_pylist()
    cell = next(r for r in rows if r["lens"] == "affine" and r["layer"] == 2 and r["pos"] == 7)
    assert cell["top1"] == traj.top1_texts["affine"][2][7]
    assert cell["rank"] == traj.stats["affine"]["rank"][2, 7]
    assert cell["kl_to_final"] == pytest.approx(float(traj.stats["affine"]["kl_to_final"][2, 7]), rel=1e-6)
    last = [r for r in rows if r["pos"] == SEQ - 1]
    assert all(r["ce"] is None and r["rank"] is None and r["next_token"] is None for r in last)
    data = json.loads(write_json(traj, tmp_path / "t.json").read_text())
    assert data["layers"] == traj.layers and data["lenses"]["affine"]["top1_text"] == traj.top1_texts["affine"]
    assert data["lenses"]["logit"]["ce"][0][-1] is None
    assert not list(tmp_path.glob(".*.tmp"))


def _synthetic(n_layers: int, n_pos: int) -> Trajectory:
    rng = np.random.default_rng(0)
    grid = {k: rng.random((n_layers, n_pos)).astype(np.float32) for k in STATS}
    grid["rank"] = rng.integers(1, 500, (n_layers, n_pos))
    return Trajectory(
        layers=list(range(n_layers)), positions=np.arange(n_pos), tokens=np.arange(n_pos),
        next_tokens=np.arange(1, n_pos + 1), token_texts=[f" tok{i}" for i in range(n_pos)],
        next_texts=[f"t{i}" for i in range(n_pos)], top1={"logit": np.zeros((n_layers, n_pos), int)},
        top1_texts={"logit": [[" Paris\n"] * n_pos] * n_layers}, stats={"logit": grid},
    )  # fmt: skip


def test_the_figure_windows_a_long_text(tmp_path):
    traj = _synthetic(31, 100)
    assert window_indices(traj, None, 40).tolist() == list(range(40))
    assert window_indices(traj, 90, 40).tolist() == list(range(90, 100))
    with pytest.raises(SelectionError, match="start"):
        window_indices(traj, 100, 40)
    from PIL import Image

    for stat in ("entropy", "rank"):
        out = plot_trajectory(traj, tmp_path / f"{stat}.png", stat, start=30)
        width, height = Image.open(out).size
        # 40 columns at ~0.42 in and 31 rows at ~0.22 in, 110 dpi: every cell wider than a 6-letter label
        assert 40 * 0.4 * 110 < width < 60 * 110 and 31 * 0.2 * 110 < height < 20 * 110
    assert cell_label(" Paris\n", 6) == "·Pari…" and cell_label("\x0f", 6) == "\\x0f"
    assert not list(tmp_path.glob(".*.tmp"))


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


def test_the_command_writes_figure_and_tables_for_a_store_and_for_a_text(world, tmp_path, capsys, monkeypatch):
    root = world["root"]
    code, out = run_main(["trajectory", str(root / "s.zarr"), "--seq", "3", "--lens", f"affine={root / 'affine'}",
                          "--out", str(tmp_path / "s.png"), "--stat", "kl_to_final"], capsys, monkeypatch)  # fmt: skip
    assert code == 0, out
    assert {p.name for p in tmp_path.iterdir()} == {"s.png", "s.json", "s.parquet"}
    assert pq.read_table(tmp_path / "s.parquet").num_rows == 2 * 4 * SEQ
    code, out = run_main(["trajectory", "--model", str(world["llama"]), "--text", "Paris is the capital of France",
                          "--lens", f"affine={root / 'affine'}", "--out", str(tmp_path / "t.png")], capsys, monkeypatch)  # fmt: skip
    assert code == 0, out
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["source"]["text"] == "Paris is the capital of France" and list(data["lenses"]) == ["logit", "affine"]


BAD = [
    (["{store}", "--seq", "99"], "sequence 99"),
    (["{store}", "--seq", "-1"], "sequence -1"),
    (["{store}", "--seq", "0", "--lens", "other={root}/other"], "weights"),
    (["{ends}", "--seq", "0", "--lens", "middle={root}/middle"], "none of which"),
    (["{store}", "--seq", "0", "--layers", "1,7"], "[7]"),
    (["--model", "{llama}", "--text", "  "], "empty"),
    (["--model", "{llama}", "--text-file", "{root}/empty.txt"], "empty"),
    (["--model", "{llama}", "--text", "Paris", "--lens", "other={root}/other"], "weights"),
    (["--model", "{llama}", "--text-file", "{root}/long.txt"], "context"),
    (["{store}"], "--seq"),
    (["{store}", "--seq", "0", "--model", "{llama}"], "not both"),
    (["--model", "{llama}"], "exactly one of --text"),
    (["{store}", "--seq", "0", "--start", "99"], "start"),
]


@pytest.mark.parametrize("args,words", BAD)
def test_bad_input_is_refused_with_nothing_written(world, tmp_path, capsys, monkeypatch, args, words):
    root = world["root"]
    (root / "empty.txt").write_text("\n \n")
    (root / "long.txt").write_text("The quick brown fox " * 200)
    where = {"store": root / "s.zarr", "ends": root / "ends.zarr", "root": root, "llama": world["llama"]}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = ["trajectory", *(a.format(**where) for a in args), "--out", str(out_dir / "x.png")]
    code, out = run_main(argv, capsys, monkeypatch)
    assert code != 0
    assert words in out, out
    assert "Traceback" not in out
    assert list(out_dir.iterdir()) == []
