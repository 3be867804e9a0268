"""Codec presets: round trips within each declared error bound on adversarial inputs, refusals of
non-finite values, and end-to-end builds that verify and read back within the bound."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lenscache import quant
from lenscache.cache.build import BuildConfig, build_store
from lenscache.cache.model import ModelSpec
from lenscache.cache.staging import BatchOutput, RowEncoder
from lenscache.cache.text import DataSpec
from lenscache.encoding import CARRIER, PRESETS, decode
from lenscache.errors import DataError
from lenscache.reader import open_store
from lenscache.schema import RESID_SCALE
from lenscache.verify import verify_store

SEQ = 16
D = 96  # three blocks of 32


def adversarial(d: int = D) -> torch.Tensor:
    """(rows, d) float32: ordinary values, SmolLM2-size outliers, zeros, denormals, extremes."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(8, d, generator=g) * s for s in (1e-3, 1.0, 30.0)]
    x = torch.cat(rows)
    outlier = torch.randn(4, d, generator=g)
    outlier[:, 5] = 25600.0  # one massive dimension inside a block
    outlier[1, d - 3] = -25600.0
    zeros = torch.zeros(2, d)
    denorm = torch.full((2, d), 1e-40)
    denorm[1, ::3] = -3e-44
    tiny_and_big = torch.randn(2, d, generator=g) * 1e-30
    tiny_and_big[0, d // 2] = 1e30
    mixed = torch.randn(2, d, generator=g)
    mixed[:, :32] = 0.0
    mixed[0, d - 2] = float(np.finfo(np.float32).max) / 2
    return torch.cat([x, outlier, zeros, denorm, tiny_and_big, mixed])


def roundtrip(name: str, x: torch.Tensor) -> np.ndarray:
    """Encode `x` as a build does, decode as the reader does."""
    p = PRESETS[name]
    if p.quant == "block":
        q, s = quant.block_quantize(x, p.bits, p.block, p.rms_step)
        assert q.dtype == np.int8 and s.shape == (*x.shape[:-1], quant.n_blocks(x.shape[-1], p.block))
        return quant.block_dequantize(q, s, p.block)
    if p.quant == "bitround":
        return decode(quant.bitround(x, p.keepbits), "bfloat16")
    enc = RowEncoder(SimpleNamespace(layers=[0], n_layers=1, final={"encoding": "float32"}), p)
    out = np.empty(x.shape, dtype=CARRIER[p.dtype])  # a row buffer's slot, filled in place
    assert enc._encode_resid(out, x, 0, 0) is None
    return decode(out, p.dtype)


def bound(name: str, x: np.ndarray, boundary: int = 0, n_layers: int = 100) -> np.ndarray:
    """The declared per-value bound of preset `name`, plus float32 rounding of the decode."""
    p = PRESETS[name]
    ax = np.abs(x.astype(np.float64))
    eb = p.error_bound()
    if eb["kind"] == "relative":
        return eb["value"] * np.maximum(ax, eb["floor"]) + 1e-45
    d = x.shape[-1]
    nb = quant.n_blocks(d, p.block)
    padded = np.zeros((*x.shape[:-1], nb * p.block))
    padded[..., :d] = ax
    absmax = padded.reshape(*x.shape[:-1], nb, p.block).max(-1)
    scale_max = absmax / eb["qmax"]
    step = p.rms_step_for(boundary, n_layers)
    if step is not None:
        rms = np.sqrt((ax**2).mean(-1, keepdims=True))
        scale_max = np.maximum(scale_max, rms * step)
    scale_max = np.maximum(scale_max * (1 + 2.0**-7), 2.0**-133)
    per_value = np.repeat(scale_max, p.block, axis=-1)[..., :d]
    return per_value / 2 + ax * 2.0**-23


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("d", [D, 40])  # 40: a partial last block
def test_roundtrip_within_declared_bound(name, d):
    x = adversarial(d)
    if name == "fp16-zstd":
        x = x.clamp(-60000, 60000)  # float16's range is enforced separately (overflow refused)
    y = roundtrip(name, x)
    xn = x.numpy()
    err = np.abs(y.astype(np.float64) - xn)
    assert np.isfinite(y).all()
    assert (err <= bound(name, xn)).all(), f"{name}: worst excess {(err - bound(name, xn)).max():.3g}"
    assert (y[xn == 0] == 0).all()  # zeros stay zeros


@pytest.mark.parametrize("name", ["int8b32-zstd", "int4b32-zstd"])
def test_block_bound_is_tight_per_block(name):
    """The block bound is local: an outlier coarsens only its own block of 32."""
    p = PRESETS[name]
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(1))
    x[:, 3] = 25600.0
    y = roundtrip(name, x)
    err = np.abs(y - x.numpy())
    assert err[:, 32:].max() <= x[:, 32:].abs().max().item() / (2 * quant.qmax(p.bits)) * 1.01
    assert err[:, 3].max() <= 25600 * 2.0**-8  # the outlier itself is nearly exact


def test_bitround_matches_round_to_nearest_even():
    x = torch.tensor([1.0 + 2.0**-5, 1.0 + 3 * 2.0**-5, -1.0 - 2.0**-5, 1.0 + 2.0**-5 + 2.0**-20])
    y = quant.bitround_float(x, 4)
    # ties go to the even mantissa; above the tie rounds up
    assert y.tolist() == [1.0, 1.0 + 4 * 2.0**-5, -1.0, 1.0 + 2.0**-4]


def _encoder(name: str) -> RowEncoder:
    meta = SimpleNamespace(
        layers=[0, 1, 2], n_layers=2, final={"encoding": "float32", "topk": 0, "full_logits": False}
    )
    return RowEncoder(meta, PRESETS[name])


def _batch(states: list[torch.Tensor]) -> BatchOutput:
    n, t, _ = states[0].shape
    return BatchOutput(states, states[-1], torch.zeros(n, t), None, None, None)


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_refused_naming_layer_and_position(name, bad):
    states = [torch.randn(3, 5, D) for _ in range(3)]
    states[1][2, 4, 7] = bad
    with pytest.raises(DataError, match=r"non-finite activation at layer 1, sequence 12, position 4"):
        _encoder(name).encode_row(10, [_batch(states)])


def test_bitround_overflow_is_refused():
    states = [torch.randn(2, 3, D) for _ in range(3)]
    states[2][1, 2, 0] = float(np.finfo(np.float32).max)
    with pytest.raises(DataError, match=r"overflow at layer 2, sequence 1, position 2"):
        _encoder("bf16r3-zstd").encode_row(0, [_batch(states)])


def test_late_layers_get_the_finer_step():
    p = PRESETS["int8rms10l16-zstd"]
    assert p.rms_step_for(0, 30) == 1 / 10 and p.rms_step_for(25, 30) == 1 / 10
    assert p.rms_step_for(26, 30) == 1 / 16 and p.rms_step_for(29, 30) == 1 / 16
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(2))
    states = [x.reshape(4, 16, D)] * 3
    out = _encoder("int8rms10l16-zstd").encode_row(0, [_batch(states)])
    steps = quant.block_scale_float(out[RESID_SCALE])
    # the tiny encoder has n_layers = 2: every boundary counts as late
    np.testing.assert_allclose(steps[0], steps[2])
    assert np.median(steps[0]) < np.median(quant.block_scale_float(quant.block_quantize(x, 8, 32, 1 / 10)[1]))


def test_block_encode_row_shapes():
    states = [torch.randn(2, 3, D) for _ in range(3)]
    out = _encoder("int4b32-zstd").encode_row(0, [_batch(states)])
    assert out["resid"].dtype == np.int8 and out["resid"].shape == (3, 2, 3, D)
    assert np.abs(out["resid"]).max() <= 7
    assert out[RESID_SCALE].dtype == np.uint16 and out[RESID_SCALE].shape == (3, 2, 3, 3)


# ---- end to end -------------------------------------------------------------------------------


def _config(model_dir: Path, text: Path, out, **kw) -> BuildConfig:
    return BuildConfig(
        out=str(out),
        model=ModelSpec(str(model_dir)),
        data=DataSpec(str(text)),
        seq_len=SEQ,
        max_tokens=SEQ * 6,
        progress=False,
        batch_size=2,
        seqs_per_chunk=4,
        **kw,
    )


@pytest.fixture(scope="module")
def exact_store(llama_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("exact") / "f32.zarr"
    build_store(_config(llama_dir, text_file, out, codec="fp32-zstd"))
    return open_store(out)


@pytest.mark.parametrize("name", sorted(set(PRESETS) - {"fp32-zstd"}))
def test_build_with_each_preset_verifies_and_meets_its_bound(
    name, llama_dir, text_file, exact_store, tmp_path
):
    out = tmp_path / f"{name}.zarr"
    build_store(_config(llama_dir, text_file, out, codec=name))
    report = verify_store(out)
    assert report.ok, report.problems
    store = open_store(out)
    p = PRESETS[name]
    assert store.codec == name and store.meta.storage["error_bound"] == p.error_bound()
    assert store.meta.schema_version == (2 if p.quant == "block" else 1)
    if p.lossy:
        assert store.meta.final["encoding"] == "float32"
    n_layers = store.meta.n_layers
    for layer in store.layers:
        ref = exact_store.resid(layer)
        got = store.resid(layer)
        assert got.dtype == np.float32 and got.shape == ref.shape
        if layer == n_layers:
            np.testing.assert_array_equal(got, ref)  # the last boundary stays exact
            continue
        err = np.abs(got.astype(np.float64) - ref)
        allowed = bound(name, ref, layer, n_layers)
        assert (err <= allowed).all(), f"layer {layer}: {(err - allowed).max():.3g}"
        # the streaming reader's path (resid_raw + storage_dtype) decodes to the same values
        raw = store.resid_raw(layer, range(0, 4))
        np.testing.assert_array_equal(store.decode_raw(raw), got[:4])
        np.testing.assert_array_equal(decode(raw, store.storage_dtype), got[:4])
    np.testing.assert_array_equal(store.final_logprobs().numpy(), exact_store.final_logprobs().numpy())


def test_streaming_reader_decodes_block_scaled_store(llama_dir, text_file, tmp_path):
    from lenscache.fit.stream import MemorySource, ResidualStream, StreamSpec

    out = tmp_path / "q.zarr"
    build_store(_config(llama_dir, text_file, out, codec="int8b32-zstd"))
    store = open_store(out)
    layers = store.layers[:-1]
    spec = StreamSpec(layers=layers, split="all", batch_tokens=SEQ * 6, shuffle=False)
    stream = ResidualStream(store, spec)
    batch = next(iter(stream))
    expected = np.stack([store.resid(layer).reshape(-1, store.d_model) for layer in layers])
    np.testing.assert_array_equal(batch.resid.numpy(), expected)
    mem = MemorySource(store, layers, range(0, store.n_sequences))
    np.testing.assert_array_equal(mem.resid, np.stack([store.resid(layer) for layer in layers]))


def test_cli_build_with_recommended_lossy_preset_then_verify_and_info(llama_dir, text_file, tmp_path):
    import subprocess
    import sys

    cli = [sys.executable, "-m", "lenscache.tools.cli"]
    out = tmp_path / "cli.zarr"
    r = subprocess.run(
        [*cli, "build", "--model", str(llama_dir), "--data", str(text_file), "--out", str(out),
         "--seq-len", str(SEQ), "--max-tokens", str(SEQ * 4), "--codec", "int8rms10l16-zstd", "--no-progress"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*cli, "verify", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([*cli, "info", str(out)], capture_output=True, text=True)
    assert r.returncode == 0 and "int8rms10l16-zstd" in r.stdout and "resid_scale" in r.stdout


def test_block_preset_with_full_logits_and_a_layer_subset(llama_dir, text_file, exact_store, tmp_path):
    out = tmp_path / "fl.zarr"
    build_store(_config(llama_dir, text_file, out, codec="int8b32-zstd", full_logits=True, layers=[1, 2]))
    assert verify_store(out).ok
    store = open_store(out)
    assert store.layers == [1, 2] and store.arrays["logits"].dtype == np.uint16  # bfloat16 logits
    logits = store.logits()
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    np.testing.assert_array_equal(store.final_resid(), exact_store.final_resid())
    err = np.abs(store.resid(1).astype(np.float64) - exact_store.resid(1))
    assert (err <= bound("int8b32-zstd", exact_store.resid(1))).all()
