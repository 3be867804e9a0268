"""Fitting from stores: the streaming reader, tuned / affine / logit lenses, files, resume, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import TRAIN_TEXT

from lenscache.cache.build import BuildConfig, build_store
from lenscache.cache.model import ModelSpec
from lenscache.cache.text import DataSpec
from lenscache.errors import LensCacheError
from lenscache.fit.affine import fit_affine, stream_moments
from lenscache.fit.lens import Lens, LensError
from lenscache.fit.stream import IGNORE_INDEX, MemorySource, ResidualStream, StreamSpec, split_sequences
from lenscache.fit.tuned import TunedConfig, fit_tuned
from lenscache.fit.tuned_lens_format import export_tuned_lens, import_tuned_lens
from lenscache.reader import open_store

SEQ = 16
N_SEQ = 40
CLI = [sys.executable, "-m", "lenscache.tools.cli"]


def _build(model_dir: Path, text: Path, out: str) -> str:
    build_store(
        BuildConfig(
            out=out, model=ModelSpec(str(model_dir)), data=DataSpec(str(text)), seq_len=SEQ,
            max_tokens=SEQ * N_SEQ, seqs_per_chunk=4, progress=False,
        )
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fit_data") / "corpus.txt"
    path.write_text("\n\n".join(TRAIN_TEXT * 12), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, llama_dir, text) -> str:
    return _build(llama_dir, text, str(tmp_path_factory.mktemp("fit") / "s.zarr"))


@pytest.fixture(scope="module")
def store(store_path):
    return open_store(store_path)


def test_split_is_by_sequence_and_shared():
    s = split_sequences(100)
    assert (s.train, s.held_out) == (range(0, 90), range(90, 100))
    assert split_sequences(5).held_out == range(4, 5)  # at least one held out
    assert len(split_sequences(1).held_out) == 0
    with pytest.raises(LensCacheError, match="fraction"):
        split_sequences(10, 1.5)


def test_stream_visits_every_train_token_once_with_the_stored_values(store):
    spec = StreamSpec(batch_tokens=48, buffer_tokens=100, seed=3)
    stream = ResidualStream(store, spec)
    batches = list(stream)
    assert len(batches) == stream.n_batches()
    seq = torch.cat([b.seq for b in batches]).numpy()
    pos = torch.cat([b.pos for b in batches]).numpy()
    flat = seq * SEQ + pos
    train = split_sequences(store.n_sequences).train
    assert sorted(flat.tolist()) == list(range(train.start * SEQ, train.stop * SEQ))
    assert all(b.n_tokens == 48 for b in batches[:-1])
    # shuffled across sequences, not in storage order
    assert len(set(batches[0].seq.tolist())) > 3
    assert not np.array_equal(flat, np.sort(flat))
    tokens = store.tokens()
    finals = store.final_resid()
    for b in batches[:3]:
        s, p = b.seq.numpy(), b.pos.numpy()
        for i, layer in enumerate(b.layers):
            np.testing.assert_array_equal(b.resid[i].numpy(), store.resid(layer)[s, p])
        np.testing.assert_array_equal(b.final.numpy(), finals[s, p])
        np.testing.assert_array_equal(b.tokens.numpy(), tokens[s, p])
        nxt = np.where(p + 1 < SEQ, tokens[s, np.minimum(p + 1, SEQ - 1)], IGNORE_INDEX)
        np.testing.assert_array_equal(b.next_tokens.numpy(), nxt)


def test_stream_is_deterministic_per_seed_and_memory_source_serves_the_same(store):
    spec = StreamSpec(batch_tokens=64, buffer_tokens=128, seed=1, epochs=2, layers=[0, 2])
    a = list(ResidualStream(store, spec))
    b = list(ResidualStream(store, spec))
    seqs = ResidualStream(store, spec).seqs
    c = list(ResidualStream(store, spec, source=MemorySource(store, [0, 2], seqs)))
    other = list(ResidualStream(store, StreamSpec(batch_tokens=64, buffer_tokens=128, seed=2, layers=[0, 2])))
    for x, y, z in zip(a, b, c, strict=True):
        assert torch.equal(x.seq, y.seq) and torch.equal(x.pos, z.pos)
        assert torch.equal(x.resid, y.resid) and torch.equal(x.resid, z.resid)
    assert not torch.equal(a[0].seq, other[0].seq)
    # epoch 2 is a fresh permutation of the same tokens
    half = len(a) // 2
    e1 = torch.cat([x.seq * SEQ + x.pos for x in a[:half]])
    e2 = torch.cat([x.seq * SEQ + x.pos for x in a[half:]])
    assert sorted(e1.tolist()) == sorted(e2.tolist()) and not torch.equal(e1, e2)
    skipped = list(ResidualStream(store, StreamSpec(**{**spec.__dict__, "skip_batches": 3})))
    assert [x.index for x in skipped] == [x.index for x in a[3:]]
    assert torch.equal(skipped[0].resid, a[3].resid)


def test_stream_options_held_out_bf16_and_limits(store):
    held = list(ResidualStream(store, StreamSpec(split="held_out", shuffle=False, batch_tokens=SEQ)))
    assert held[0].seq[0].item() == split_sequences(store.n_sequences).held_out.start
    bf = next(iter(ResidualStream(store, StreamSpec(dtype="bfloat16", batch_tokens=32))))
    f32 = next(iter(ResidualStream(store, StreamSpec(dtype="float32", batch_tokens=32))))
    assert bf.resid.dtype == torch.bfloat16 and torch.equal(bf.resid.float(), f32.resid)
    limited = list(ResidualStream(store, StreamSpec(batch_tokens=40, max_tokens=100)))
    assert [b.n_tokens for b in limited] == [40, 40, 20]
    with pytest.raises(LensCacheError, match="not in this store|layer 99"):
        ResidualStream(store, StreamSpec(layers=[99]))


def test_stream_reads_an_fsspec_store(llama_dir, text):
    url = _build(llama_dir, text, "memory://fit-stream.zarr")
    batches = list(ResidualStream(open_store(url), StreamSpec(batch_tokens=128)))
    assert sum(b.n_tokens for b in batches) == len(split_sequences(N_SEQ).train) * SEQ


def _reference_tuned_fit(store, spec: StreamSpec, cfg: TunedConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe written out plainly over arrays held in RAM, fed the same (seq, pos) minibatches."""
    order = [(b.seq.numpy(), b.pos.numpy()) for b in ResidualStream(store, spec)]
    layers = [b for b in store.layers if b != store.meta.n_layers]
    resid = torch.from_numpy(np.stack([store.resid(layer) for layer in layers]))  # (L, n, P, d)
    final_logp = store.final_logprobs()
    d = store.d_model
    w = torch.zeros(len(layers), d, d, requires_grad=True)
    b = torch.zeros(len(layers), d, requires_grad=True)
    lr = cfg.lr * (1 - cfg.momentum)
    opt = torch.optim.SGD([w, b], lr=lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    for step, (s, p) in enumerate(order):
        for group in opt.param_groups:
            group["lr"] = lr * (1 - step / len(order))
        opt.zero_grad()
        target = final_logp[s, p]
        loss = 0
        for i in range(len(layers)):
            h = resid[i, s, p]
            logp = torch.log_softmax(store.unembed(h + h @ w[i].T + b[i]), -1)
            loss = loss + (target.exp() * (target - logp)).sum(-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([w, b], cfg.clip)
        opt.step()
    return w.detach(), b.detach()


def test_streamed_tuned_fit_equals_a_fit_on_in_memory_data(store, tmp_path):
    spec = StreamSpec(batch_tokens=32, buffer_tokens=96, seed=7, epochs=2)
    cfg = TunedConfig(checkpoint_every=0)
    lens = fit_tuned(store, tmp_path / "lens", spec, cfg, progress=False)
    w, b = _reference_tuned_fit(store, spec, cfg)
    assert lens.config.fit["steps"] == ResidualStream(store, spec).n_batches() > 10
    assert lens.weight.abs().max() > 1e-4  # it moved
    torch.testing.assert_close(lens.weight.detach(), w, atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(lens.bias.detach(), b, atol=2e-6, rtol=1e-4)
    loaded = Lens.load(tmp_path / "lens")
    assert torch.equal(loaded.weight, lens.weight) and loaded.config.kind == "tuned"


def test_tuned_and_affine_lenses_beat_the_logit_lens_on_held_out_data(store, tmp_path):
    from lenscache.analysis.evaluate import evaluate, per_layer

    tuned = fit_tuned(store, tmp_path / "t", StreamSpec(batch_tokens=64, epochs=4), progress=False)
    affine = fit_affine(store)
    report = evaluate(store, {"tuned": tuned, "affine": affine}, progress=False)
    logit = per_layer(report, "logit", "kl")
    assert (per_layer(report, "tuned", "kl") < logit).all()
    assert (per_layer(report, "affine", "kl") < logit).all()
    assert report.model["kl"] == pytest.approx(0.0, abs=1e-6)
    assert report.model["top1_agreement"] == 1.0


def test_eval_metrics_match_a_direct_computation(store):
    from lenscache.analysis.evaluate import evaluate

    report = evaluate(store, {}, layers=[1], batch_tokens=24, progress=False)
    held = split_sequences(store.n_sequences).held_out
    h = torch.from_numpy(store.resid(1, held)).reshape(-1, store.d_model)
    final = store.final_logprobs(held).reshape(h.shape[0], -1)
    logp = store.unembed.log_probs(h)
    kl = (final.exp() * (final - logp)).sum(-1).mean()
    nxt = torch.from_numpy(store.tokens(held)[:, 1:].astype(np.int64))
    ce = -logp.reshape(len(held), SEQ, -1)[:, :-1].gather(-1, nxt.unsqueeze(-1)).mean()
    row = report.lenses["logit"][1]
    assert row["kl"] == pytest.approx(float(kl), rel=1e-4)
    assert row["ce"] == pytest.approx(float(ce), rel=1e-4)
    assert row["top1_agreement"] == pytest.approx(
        float((logp.argmax(-1) == final.argmax(-1)).double().mean())
    )
    assert report.tokens == len(held) * SEQ


def test_affine_lens_is_the_least_squares_solution(store):
    lens = fit_affine(store, ridge=1e-9)
    train = split_sequences(store.n_sequences).train
    y = store.final_resid(train).reshape(-1, store.d_model).astype(np.float64)
    for i, layer in enumerate(lens.layers):
        x = store.resid(layer, train).reshape(-1, store.d_model).astype(np.float64)
        x1 = np.hstack([x, np.ones((x.shape[0], 1))])
        coef, *_ = np.linalg.lstsq(x1, y, rcond=None)
        a, c = coef[:-1].T, coef[-1]
        np.testing.assert_allclose(
            lens.weight[i].detach().double().numpy() + np.eye(store.d_model), a, atol=2e-3
        )
        np.testing.assert_allclose(lens.bias[i].detach().double().numpy(), c, atol=2e-3)
    # moments merged across blocks equal the moments of all data at once (float64)
    m = stream_moments(store, range(0, 12), [2], partitions=3)
    x = store.resid(2, range(0, 12)).reshape(-1, store.d_model).astype(np.float64)
    xc = x - x.mean(0)
    np.testing.assert_allclose(m.cxx[0], xc.T @ xc, rtol=1e-5, atol=1e-6)


def test_tuned_lens_format_round_trip_and_no_code_execution(store, tmp_path):
    lens = fit_affine(store)
    out = export_tuned_lens(lens, tmp_path / "tl")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == store.meta.n_layers and config["lens_type"] == "linear_tuned_lens"
    state = torch.load(out / "params.pt", weights_only=True)
    assert set(state) == {f"{i}.{p}" for i in range(store.meta.n_layers) for p in ("weight", "bias")}
    back = import_tuned_lens(out, store)
    torch.testing.assert_close(back.weight, lens.weight.float())
    torch.testing.assert_close(back.bias, lens.bias.float())

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"0.weight": Evil()}, out / "params.pt")
    with pytest.raises(LensError, match="cannot read"):
        import_tuned_lens(out, store)
    assert not marker.exists()


def test_lens_fitted_on_another_model_is_refused(store, tmp_path, tiny_model_factory, text):
    from lenscache.analysis.evaluate import evaluate

    other = open_store(_build(tiny_model_factory("qwen2"), text, str(tmp_path / "other.zarr")))
    lens = fit_affine(other)
    with pytest.raises(LensError, match="fitted on model"):
        evaluate(store, {"other": lens}, progress=False)
    lens.save(tmp_path / "other-lens")
    done = subprocess.run(
        [*CLI, "eval", store.url, "--lens", str(tmp_path / "other-lens"), "--out", str(tmp_path / "r")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2 and "fitted on model" in done.stderr
    assert not (tmp_path / "r").exists()


def test_cli_fit_and_eval_write_lens_and_report(store_path, tmp_path):
    lens_dir = tmp_path / "affine"
    done = subprocess.run(
        [*CLI, "fit", store_path, "--out", str(lens_dir), "--lens", "affine"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    before = (lens_dir / "lens.safetensors").read_bytes()
    again = subprocess.run(
        [*CLI, "fit", store_path, "--out", str(lens_dir), "--lens", "logit"], capture_output=True, text=True
    )
    assert again.returncode != 0 and "--overwrite" in again.stderr
    assert (lens_dir / "lens.safetensors").read_bytes() == before
    report = tmp_path / "report"
    done = subprocess.run(
        [*CLI, "eval", store_path, "--lens", str(lens_dir), "--out", str(report), "--no-progress"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["lenses"]) == {"logit", "affine"}
    assert metrics["bytes"] and metrics["lenses"]["affine"]["0"]["kl_bpb"] is not None
    assert (report / "metrics.png").stat().st_size > 10_000
    assert "| layer | logit | affine |" in (report / "metrics.md").read_text()


def test_killed_fit_resumes_from_its_checkpoint(store_path, tmp_path):
    args = [
        "--batch-tokens",
        "16",
        "--epochs",
        "20",
        "--checkpoint-every",
        "5",
        "--no-progress",
        "--layers",
        "0,2",
    ]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen([*CLI, "fit", store_path, "--out", str(killed), *args], stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while (
        not (killed / "checkpoint" / "state.json").exists() and proc.poll() is None and time.time() < deadline
    ):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads((killed / "checkpoint" / "state.json").read_text())
    assert not (killed / "lens.json").exists(), "the fit finished before the kill: make it longer"
    resumed = subprocess.run(
        [*CLI, "fit", store_path, "--out", str(killed), *args, "--resume"], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    subprocess.run([*CLI, "fit", store_path, "--out", str(clean), *args], check=True, capture_output=True)
    a, b = Lens.load(killed), Lens.load(clean)
    assert state["step"] >= 5
    torch.testing.assert_close(a.weight, b.weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.bias, b.bias, atol=1e-6, rtol=1e-5)
    assert not (killed / "checkpoint").exists()
    other = subprocess.run(
        [*CLI, "fit", store_path, "--out", str(tmp_path / "x"), "--resume"], capture_output=True, text=True
    )
    assert other.returncode == 2 and "no checkpoint" in other.stderr


def test_affine_moments_reduce_the_same_on_a_distributed_cluster(store):
    distributed = pytest.importorskip("distributed")  # in the test extra; users need it only for clusters

    local = fit_affine(store, ridge=1e-3)
    with distributed.Client(
        processes=True, n_workers=2, threads_per_worker=1, dashboard_address=None
    ) as client:
        with distributed.get_task_stream(client) as tasks:
            remote = fit_affine(store, ridge=1e-3)
    assert len(tasks.data) > 0  # the moments were computed by the cluster's workers
    torch.testing.assert_close(remote.weight, local.weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(remote.bias, local.bias, atol=1e-5, rtol=1e-5)


def test_cross_entropy_loss_option_lowers_next_token_loss(store, tmp_path):
    lens = fit_tuned(
        store, tmp_path / "ce", StreamSpec(batch_tokens=64, epochs=6), TunedConfig(loss="ce"), progress=False
    )
    history = lens.config.fit["loss_history"]
    assert np.mean(history[-5:]) < np.mean(history[:5])  # per-layer mean next-token CE, nats
    with pytest.raises(LensCacheError, match="loss must be"):
        TunedConfig(loss="mse")
