"""Multi-worker builds on Dask distributed (cache/distributed.py): bit-identical to a one-process build,
through a cluster of the test's own (--scheduler) and one the build starts (--workers); a worker killed
mid-build, a driver killed mid-build, bad options and a scheduler that does not answer."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dask
import pytest
from tiny_models import TRAIN_TEXT

import lenscache.cache.distributed as dist
import lenscache.cache.host_memory as host_memory
from lenscache.cache.build import BuildConfig, build_store
from lenscache.cache.distributed import WORKER_CRASH_ENV, ClusterError, TaskSpec, build_task, shared_arrays
from lenscache.cache.faults import ENV as CRASH_ENV
from lenscache.cache.faults import CrashPointError
from lenscache.cache.model import ModelSpec
from lenscache.cache.text import DataSpec
from lenscache.encoding import get_preset
from lenscache.errors import DataError, ModelError, StoreLocked
from lenscache.lock import LOCK_NAME
from lenscache.reader import open_store
from lenscache.schema import LOGSUMEXP, TOKENS, TOPK_IDS, TOPK_LOGPROBS
from lenscache.tools.bench_workers import differing_files, store_files
from lenscache.tools.cli import main
from lenscache.verify import verify_store

distributed = pytest.importorskip("distributed")

SEQ, N_SEQ, S = 16, 21, 4  # rows of 4 sequences, the last one ragged (1 sequence): 6 tasks


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dist") / "corpus.txt"
    path.write_text("\n\n".join(TRAIN_TEXT * 40), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cfg(llama_dir, corpus) -> dict:
    return dict(model=ModelSpec(str(llama_dir)), data=DataSpec(str(corpus)), seq_len=SEQ, max_tokens=SEQ * N_SEQ,
                batch_size=2, seqs_per_chunk=S, progress=False)  # fmt: skip


def cli_args(cfg: dict) -> list[str]:
    return ["build", "--model", cfg["model"].name, "--data", cfg["data"].source, "--seq-len", str(SEQ),
            "--max-tokens", str(SEQ * N_SEQ), "--batch-size", "2", "--seqs-per-chunk", str(S), "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """Two worker processes of one thread each; a task may kill its worker once and be rerun (not twice)."""
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                      scheduler_kwargs={"dashboard_address": ":0"}, memory_limit=0,
                                      silence_logs=logging.CRITICAL) as local:  # fmt: skip
            yield local.scheduler_address


@pytest.fixture(scope="module")
def references(cfg, tmp_path_factory) -> dict[str, Path]:
    """One-process builds, by codec and logits setting."""
    root = tmp_path_factory.mktemp("refs")
    built = {}
    for name, extra in VARIANTS.items():
        built[name] = root / f"{name}.zarr"
        build_store(BuildConfig(out=str(built[name]), **{**cfg, **extra}))
    return built


VARIANTS = {
    "bf16": {},  # lossless: encoded in the hooks, the last boundary as lo16
    "int8": {"codec": "int8rms10l16-zstd"},  # block-quantized: scales, the last boundary as float32
    "logits": {"full_logits": True, "codec": "fp16-zstd"},
}


def assert_identical(a: Path, b: Path) -> None:
    assert differing_files(a, b) == []  # bit-identical, file by file (the root metadata without timestamps)
    assert verify_store(a).ok


def state(out: Path) -> tuple[str, int]:
    build = json.loads((out / "zarr.json").read_text())["attributes"]["lenscache"]["build"]
    return build["status"], build["committed"]


# -- the same bytes as a one-process build ------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_two_worker_build_equals_a_one_process_build(variant, cluster, cfg, references, tmp_path):
    out = tmp_path / "two.zarr"
    summary = build_store(BuildConfig(out=str(out), scheduler=cluster, **{**cfg, **VARIANTS[variant]}))
    assert_identical(out, references[variant])
    assert summary.workers["tasks"] == 6 and summary.workers["workers"] == 2
    assert set(summary.workers["per_worker"]) <= {"0", "1"}  # the rows were built in the workers
    assert summary.tokens_built == SEQ * N_SEQ
    st = open_store(out)
    # the small arrays' chunks span all rows: the driver writes them (tokens before the rows), the workers the rest
    assert set(shared_arrays(st.meta, get_preset(st.meta.build.identity["codec"]))) == {
        TOKENS, LOGSUMEXP, TOPK_IDS, TOPK_LOGPROBS}  # fmt: skip


# -- killed workers, a killed driver (the last users of the shared cluster: its workers die) ------


def test_a_tasks_error_reaches_the_driver_as_itself(cluster, references, cfg):
    """The error a task raises comes back, not lost in the worker (an exception that was its own cause
    once sent the worker's report of it round in circles, growing without end)."""
    store = references["bf16"]
    before = store_files(store)
    with distributed.Client(cluster, set_as_default=False) as client:
        future = client.submit(build_task, _spec(store, cfg["model"]), 0, open_store(store).tokens(slice(0, S)), (),
                               pure=False)  # fmt: skip
        with pytest.raises(StoreLocked, match="no longer holds the store's writer lock"):
            future.result(timeout=60)
    assert store_files(store) == before


def test_a_driver_killed_mid_build_resumes_to_the_same_store(cluster, cfg, references, tmp_path):
    out = tmp_path / "killed-driver.zarr"
    env = {k: v for k, v in os.environ.items() if k not in (CRASH_ENV, WORKER_CRASH_ENV)}
    env.update({CRASH_ENV: f"after-commit:{2 * S}", "HF_HUB_OFFLINE": "1"})
    done = subprocess.run([sys.executable, "-m", "lenscache.tools.cli", *cli_args(cfg), "--scheduler", cluster,
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert f"SIGKILL) at after-commit:{2 * S}" in done.stderr
    assert state(out) == ("building", 2 * S)
    summary = build_store(BuildConfig(out=str(out), scheduler=cluster, resume=True, **cfg))
    assert summary.resumed_from == 2 * S
    assert summary.workers["tasks"] == 4  # the rows past the committed count, and only those
    assert_identical(out, references["bf16"])


def test_cli_workers_starts_a_local_cluster_with_the_same_result(
    cfg, references, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: False)  # not in the test process
    out = tmp_path / "cli.zarr"
    main([*cli_args(cfg), "--workers", "2", "--out", str(out), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["sequences"] == N_SEQ
    assert summary["workers"]["local"] and summary["workers"]["workers"] == 2 and summary["workers"]["tasks"] == 6
    assert_identical(out, references["bf16"])
    assert not (out / LOCK_NAME).exists()


def test_a_worker_killed_mid_build_leaves_its_row_to_another(cluster, cfg, references, tmp_path, monkeypatch):
    marker = tmp_path / "killed-once"
    monkeypatch.setenv(WORKER_CRASH_ENV, f"{2 * S}@{marker}")  # the third row, after writing its chunks
    out = tmp_path / "killed-worker.zarr"
    build_store(BuildConfig(out=str(out), scheduler=cluster, **cfg))
    assert marker.exists()  # a worker did die there
    assert_identical(out, references["bf16"])


def test_a_row_that_kills_every_worker_fails_the_build_which_then_resumes(
    cluster, cfg, references, tmp_path, monkeypatch
):
    monkeypatch.setenv(WORKER_CRASH_ENV, "0")  # the first row kills each worker it runs on
    out = tmp_path / "doomed.zarr"
    with pytest.raises(ClusterError, match="kept dying while building sequences 0..3"):
        build_store(BuildConfig(out=str(out), scheduler=cluster, **cfg))
    # later rows may have been written; none is committed before the first one is
    assert state(out) == ("building", 0)
    assert open_store(out).n_sequences == 0
    assert not (out / LOCK_NAME).exists()
    monkeypatch.delenv(WORKER_CRASH_ENV)
    # resumed in this process (the workers are restarting): either way of building continues the other's
    summary = build_store(BuildConfig(out=str(out), resume=True, **cfg))
    assert summary.resumed_from == 0 and summary.workers is None
    assert_identical(out, references["bf16"])


# -- a task's own checks (called directly, outside a worker) ------------------------------------


def _spec(store: Path, model: ModelSpec, **changes) -> TaskSpec:
    identity = open_store(store).meta.build.identity
    fields = dict(url=str(store), model=model, codec=identity["codec"], fsync=False, lock_token="not-the-holder",
                  slots={}, expect={k: identity[k] for k in ("weights_hash", "compute_dtype", "device_type")})  # fmt: skip
    return TaskSpec(**{**fields, **changes})


def test_a_task_writes_nothing_without_its_drivers_lock(references, cfg):
    store = references["bf16"]
    before = store_files(store)
    tokens = open_store(store).tokens(slice(0, S))
    with pytest.raises(StoreLocked, match="no longer holds the store's writer lock"):
        build_task(_spec(store, cfg["model"]), 0, tokens, ())
    dist._writers.clear()
    assert store_files(store) == before


def test_a_task_refuses_a_worker_whose_model_differs(references, cfg):
    store = references["bf16"]
    spec = _spec(store, cfg["model"])
    spec = _spec(store, cfg["model"], expect={**spec.expect, "weights_hash": "sha256:another"})
    dist._models.clear()
    with pytest.raises(ModelError, match="differs from the store's .*weights_hash"):
        build_task(spec, 0, open_store(store).tokens(slice(0, S)), ())
    dist._models.clear()


def test_workers_of_another_lenscache_version_are_refused():
    class Client:
        def run(self, fn):
            return {"tcp://w1": fn(), "tcp://w2": "0.0.1"}

    with pytest.raises(ClusterError, match="other lenscache versions.*tcp://w2"):
        dist._check_workers(Client(), "tcp://s")


# -- bad options and an absent scheduler: one line, nothing written ------------------------------


def run_main(argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out = capsys.readouterr()
    return exit_info.value.code, out.out + out.err


@pytest.fixture
def silent_port() -> Iterator[str]:
    """A loopback port that accepts connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"tcp://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


@pytest.mark.parametrize("which", ["silent_port", "closed_port"])
def test_a_scheduler_that_does_not_answer_fails_clearly_with_nothing_made(
    which, request, cfg, tmp_path, capsys, monkeypatch
):
    address = request.getfixturevalue(which)
    monkeypatch.setattr(dist, "CONNECT_TIMEOUT_S", 1.0)
    out = tmp_path / "never.zarr"
    code, text = run_main([*cli_args(cfg), "--scheduler", address, "--out", str(out)], capsys, monkeypatch)
    assert code == 2
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: no Dask scheduler at {address}"), text
    assert not out.exists()  # no store, no lock, not even the directory


@pytest.mark.parametrize(
    "options, error, message",
    [
        (["--workers", "0"], DataError, r"workers \(--workers\) must be at least 1"),
        (["--workers", "2", "--scheduler", "tcp://127.0.0.1:8786"], DataError, "exclude each other"),
        (["--scheduler", "nonsense"], DataError, r"scheduler \(--scheduler\) 'nonsense' is not an address"),
        (["--scheduler", "tcp://localhost:port"], DataError, "is not an address like tcp://HOST:PORT"),
        (
            ["--workers", "2", "--out", "memory://dist.zarr"],
            DataError,
            "memory:// store lives in one process",
        ),
    ],
)
def test_bad_distributed_options_fail_before_anything_is_written(
    options, error, message, cfg, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "bad.zarr"
    args = [*cli_args(cfg), "--out", str(out), *options]  # a later --out wins
    code, text = run_main(args, capsys, monkeypatch)
    assert code == 2 and len(text.strip().splitlines()) == 1, text
    with pytest.raises(error, match=message):
        kw = {"--workers": "workers", "--scheduler": "scheduler", "--out": "out"}
        given = dict(zip(options[::2], options[1::2], strict=True))
        extra = {kw[k]: int(v) if k == "--workers" else v for k, v in given.items()}
        build_store(BuildConfig(**{"out": str(out), **cfg, **extra}))
    assert not out.exists()


def test_a_bad_worker_crash_point_is_refused(cfg, tmp_path, monkeypatch):
    monkeypatch.setenv(WORKER_CRASH_ENV, "row3")
    with pytest.raises(CrashPointError, match=WORKER_CRASH_ENV):
        build_store(BuildConfig(out=str(tmp_path / "x.zarr"), workers=2, **cfg))
    assert not (tmp_path / "x.zarr").exists()


def test_without_distributed_installed_the_error_says_what_to_install(cfg, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    with pytest.raises(ClusterError, match=r"pip install 'lenscache\[distributed\]'"):
        build_store(BuildConfig(out=str(tmp_path / "x.zarr"), workers=2, **cfg))
    build_store(BuildConfig(out=str(tmp_path / "one.zarr"), **cfg))  # one process needs no Dask
    assert not (tmp_path / "x.zarr").exists()
