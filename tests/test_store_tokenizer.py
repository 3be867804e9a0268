"""The tokenizer travels with the store: eval without the model, GGUF builds, tampering, old stores."""

from __future__ import annotations

import json
import os
import shutil
import socketserver
import subprocess
import sys
import threading
from pathlib import Path

import gguf
import numpy as np
import pytest
import zarr
from tiny_models import make_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from lenscache.analysis.evaluate import count_bytes, evaluate
from lenscache.cache.build import BuildConfig, build_store
from lenscache.cache.model import ModelSpec
from lenscache.cache.text import DataSpec
from lenscache.errors import ResumeMismatch, StoreError
from lenscache.reader import open_store
from lenscache.tokenizer import MissingTokenizer, store_tokenizer, tokenizer_hash
from lenscache.verify import verify_store

SEQ = 16
N_SEQ = 12
CLI = [sys.executable, "-m", "lenscache.tools.cli"]
SAMPLE = "The quick brown fox, Paris 日本語 🙂\tdef f(x): return 2"


def config(model: Path | str, text: Path, out, **kw) -> BuildConfig:
    kw.setdefault("seq_len", SEQ)
    kw.setdefault("max_tokens", SEQ * N_SEQ)
    kw.setdefault("seqs_per_chunk", 4)
    kw.setdefault("progress", False)
    return BuildConfig(out=str(out), model=ModelSpec(str(model)), data=DataSpec(str(text)), **kw)


class HubSpy:
    """A loopback "hub" that counts connections and drops each at once, so any hub access is seen and fails fast."""

    def __init__(self) -> None:
        self.connections = 0
        spy = self

        class Drop(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                spy.connections += 1

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Drop)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> HubSpy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def hub_env(tmp_path: Path, endpoint: str | None) -> dict[str, str]:
    """The environment for a CLI run: offline (endpoint None), or online with the hub at `endpoint`."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf-home"))  # no hub cache to fall back on
    if endpoint is None:
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env.pop("HF_HUB_OFFLINE", None)
        env.pop("TRANSFORMERS_OFFLINE", None)
        env["HF_ENDPOINT"] = endpoint
    return env


def run_eval(store: Path, out: Path, env: dict[str, str], *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    done = subprocess.run(
        [*CLI, "eval", str(store), "--out", str(out), "--split", "all", "--no-plot", "--no-progress", *extra],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text()) if done.returncode == 0 else {}
    return done, metrics


def drop_tokenizer(store: Path) -> Path:
    """Make `store` look as if built before tokenizers were stored: no group, no metadata key."""
    shutil.rmtree(store / "tokenizer")
    root = json.loads((store / "zarr.json").read_text())
    del root["attributes"]["lenscache"]["tokenizer"]
    (store / "zarr.json").write_text(json.dumps(root))
    return store


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """q/k rows in llama.cpp's order (rotary pairs interleaved); transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model_dir: Path, out: Path) -> Path:
    """A float32 Llama GGUF of the tiny model in `model_dir`, with its byte-level BPE as tokenizer.ggml.*."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    by_id = {i: t for t, i in tok.get_vocab().items()}
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    # the embedding has more rows than the tokenizer has tokens: placeholders fill the rest
    w.add_token_list([by_id.get(i, f"[PAD{i}]") for i in range(cfg.vocab_size)])
    w.add_token_types(
        [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(cfg.vocab_size)]
    )
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        base, suffix = name.rsplit(".", 1)
        value = tensor.float().numpy()
        if base.endswith("q_proj"):
            value = llama_permute(value, cfg.num_attention_heads)
        elif base.endswith("k_proj"):
            value = llama_permute(value, cfg.num_key_value_heads)
        w.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(value))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory, text_file) -> dict:
    """A store of a tiny model whose directory is then moved away; what the original tokenizer said."""
    root = tmp_path_factory.mktemp("travels")
    model_dir = make_tiny_model(root / "model", "llama")
    build_store(config(model_dir, text_file, root / "built.zarr"))
    original = AutoTokenizer.from_pretrained(model_dir)
    store = shutil.copytree(root / "built.zarr", root / "elsewhere" / "s.zarr")  # as a teammate receives it
    expected_bytes = count_bytes(open_store(store), range(N_SEQ), original)
    moved = model_dir.rename(root / "moved-model")  # the recorded model path no longer exists
    return {"store": store, "root": root, "moved_model": moved, "original": original, "bytes": expected_bytes}


def test_store_carries_its_tokenizer(built):
    store = open_store(built["store"])
    assert store.meta.tokenizer["hash"].startswith("sha256:")
    assert not Path(store.meta.model["tokenizer"]["name"]).exists()
    tok = store.tokenizer()
    assert store.tokenizer() is tok  # loaded once
    original = built["original"]
    assert tokenizer_hash(tok) == store.meta.model["tokenizer"]["hash"]
    assert tok.encode(SAMPLE) == original.encode(SAMPLE) and tok.encode(SAMPLE)[0] == original.bos_token_id
    ids = [int(t) for t in store.tokens(slice(0, 2)).ravel()]
    assert tok.decode(ids) == original.decode(ids)
    assert tok.special_tokens_map == original.special_tokens_map
    assert verify_store(built["store"]).ok


@pytest.mark.parametrize("hub", ["offline", "reachable"])
def test_eval_without_the_model_reports_bits_per_byte(built, tmp_path, hub):
    store = shutil.copytree(built["store"], tmp_path / "s.zarr")
    if hub == "reachable":
        # as if built from a hub id: the old lookup went to the hub with these names
        root = json.loads((store / "zarr.json").read_text())
        model = root["attributes"]["lenscache"]["model"]
        model.update(id="lenscache-test/tiny-llama", source="hub")
        model["tokenizer"]["name"] = "lenscache-test/tiny-llama"
        (store / "zarr.json").write_text(json.dumps(root))
    with HubSpy() as spy:
        env = hub_env(tmp_path, None if hub == "offline" else spy.endpoint)
        done, metrics = run_eval(store, tmp_path / "report", env)
    assert done.returncode == 0, done.stderr
    assert spy.connections == 0, "eval reached for the hub"
    assert "note:" not in done.stderr
    assert metrics["bytes"] == built["bytes"]  # the stored tokenizer decodes as the original did
    assert metrics["model"]["ce_bpb"] is not None and metrics["lenses"]["logit"]["1"]["kl_bpb"] is not None


def test_store_tokenizer_over_fsspec(built, text_file):
    url = "memory://lenscache-tokenizer/s.zarr"
    build_store(config(built["moved_model"], text_file, url, max_tokens=SEQ * 4))
    assert open_store(url).tokenizer().encode(SAMPLE) == built["original"].encode(SAMPLE)


@pytest.fixture(scope="module")
def gguf_store(tmp_path_factory, llama_dir, text_file) -> dict:
    """A store built by the CLI with --model tiny.gguf, whose GGUF file is then moved away."""
    root = tmp_path_factory.mktemp("gguf")
    (root / "model").mkdir()
    path = write_tiny_gguf(llama_dir, root / "model" / "tiny.gguf")
    out = root / "s.zarr"
    done = subprocess.run(
        [*CLI, "build", "--model", str(path), "--data", str(text_file), "--out", str(out), "--seq-len", str(SEQ),
         "--max-tokens", str(SEQ * N_SEQ), "--no-progress"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    original = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    expected_bytes = count_bytes(open_store(out), range(N_SEQ), original)
    (root / "away").mkdir()
    moved = path.rename(root / "away" / "tiny.gguf")
    return {"store": out, "moved": moved, "bytes": expected_bytes, "original": original}


def test_gguf_built_store_reports_bits_per_byte_without_the_file(gguf_store, tmp_path):
    store = open_store(gguf_store["store"])
    assert store.meta.model["source"] == "gguf" and not Path(store.meta.model["id"]).exists()
    assert store.tokenizer().encode(SAMPLE) == gguf_store["original"].encode(SAMPLE)
    with HubSpy() as spy:
        done, metrics = run_eval(gguf_store["store"], tmp_path / "report", hub_env(tmp_path, spy.endpoint))
    assert done.returncode == 0, done.stderr
    assert spy.connections == 0, "eval reached for the hub"
    assert metrics["bytes"] == gguf_store["bytes"] and metrics["model"]["ce_bpb"] is not None


def test_store_built_before_tokenizers_were_stored(gguf_store, built, tmp_path):
    old = drop_tokenizer(shutil.copytree(gguf_store["store"], tmp_path / "old.zarr"))
    store = open_store(old)  # the optional metadata key is absent: it still opens
    assert store.meta.tokenizer is None and verify_store(old).ok
    with pytest.raises(MissingTokenizer, match="--tokenizer"):
        store.tokenizer()
    report = evaluate(store, {}, layers=[1], progress=False)
    assert report.bytes is None and any("--tokenizer" in note for note in report.notes)
    with HubSpy() as spy:
        env = hub_env(tmp_path, spy.endpoint)
        done, metrics = run_eval(old, tmp_path / "auto", env)
        assert done.returncode == 0, done.stderr
        assert "carries no tokenizer" in done.stderr and "--tokenizer" in done.stderr
        assert metrics["bytes"] is None and metrics["model"]["ce_bpb"] is None
        # the GGUF file as override (it needs gguf_file=; a bare path would be taken for a hub id)
        done, metrics = run_eval(old, tmp_path / "gguf", env, "--tokenizer", str(gguf_store["moved"]))
        assert done.returncode == 0, done.stderr
        assert metrics["bytes"] == gguf_store["bytes"]
        assert spy.connections == 0
    dir_store = drop_tokenizer(shutil.copytree(built["store"], tmp_path / "old-dir.zarr"))
    tok = store_tokenizer(open_store(dir_store), built["moved_model"])  # a tokenizer directory as override
    assert tokenizer_hash(tok) == open_store(dir_store).meta.model["tokenizer"]["hash"]


def tamper_json(store: Path) -> None:
    """Swap the ids of two vocabulary entries, writing through zarr so the chunk checksum stays valid."""
    arr = zarr.open_group(store, mode="r+")["tokenizer/json"]
    data = arr[...].tobytes()
    vocab = json.loads(data)["model"]["vocab"]
    before = f'"a":{vocab["a"]},"b":{vocab["b"]}'.encode()
    after = f'"a":{vocab["b"]},"b":{vocab["a"]}'.encode()
    assert data.count(before) == 1
    arr[...] = np.frombuffer(data.replace(before, after), dtype=np.uint8)


def test_tampered_tokenizer_is_refused(built, tmp_path):
    bytes_edited = shutil.copytree(built["store"], tmp_path / "bytes.zarr")
    tamper_json(bytes_edited)
    meta_edited = shutil.copytree(built["store"], tmp_path / "meta.zarr")
    root = json.loads((meta_edited / "zarr.json").read_text())
    recorded = root["attributes"]["lenscache"]["tokenizer"]["hash"]
    root["attributes"]["lenscache"]["tokenizer"]["hash"] = "sha256:" + "0" * 64
    (meta_edited / "zarr.json").write_text(json.dumps(root))

    with pytest.raises(StoreError, match="does not match its hash") as caught:
        open_store(bytes_edited).tokenizer()
    assert recorded in str(caught.value)  # the recorded hash, and the one the bytes have
    with pytest.raises(StoreError, match=f"hash to {recorded}.*records sha256:0{{64}}"):
        open_store(meta_edited).tokenizer()
    report = verify_store(bytes_edited)
    assert report.chunks_checked and any("does not match its hash" in p for p in report.problems)
    done, _ = run_eval(bytes_edited, tmp_path / "report", hub_env(tmp_path, None))
    assert done.returncode == 2 and "does not match its hash" in done.stderr
    assert not (tmp_path / "report").exists()


def test_resume_keeps_the_tokenizer_and_refuses_another(built, text_file, tmp_path):
    model_dir = built["moved_model"]
    clean = tmp_path / "clean.zarr"
    build_store(config(model_dir, text_file, clean))
    killed = shutil.copytree(clean, tmp_path / "killed.zarr")
    # as a build killed after its first row: committed 4 of 12, building
    root = json.loads((killed / "zarr.json").read_text())
    root["attributes"]["lenscache"]["build"].update(status="building", committed=4, finished=None)
    (killed / "zarr.json").write_text(json.dumps(root))
    summary = build_store(config(model_dir, text_file, killed, resume=True))
    assert summary.resumed_from == 4
    resumed, reference = open_store(killed), open_store(clean)
    assert resumed.meta.tokenizer == reference.meta.tokenizer
    assert resumed.tokenizer().encode(SAMPLE) == built["original"].encode(SAMPLE)
    other = shutil.copytree(model_dir, tmp_path / "other-tokenizer")
    config_file = other / "tokenizer_config.json"
    settings = json.loads(config_file.read_text())
    settings["eos_token"] = "<pad>"  # same weights, another tokenizer
    config_file.write_text(json.dumps(settings))
    root["attributes"]["lenscache"]["build"].update(status="building", committed=4, finished=None)
    (killed / "zarr.json").write_text(json.dumps(root))
    with pytest.raises(ResumeMismatch, match="tokenizer_hash"):
        build_store(config(other, text_file, killed, resume=True))
