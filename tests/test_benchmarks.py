"""Every benchmark still runs: each tools/bench_*.py in --smoke mode, in its own process, writes JSON
that records the machine and the ratios the benchmark promises, as finite numbers; the crash
torture's smoke run (one kill, resumed) reports every kill resumed to an identical, clean store.

The benchmarks are found by glob, so a new one without a smoke mode (or without its ratios listed
here) fails. They run two at a time, on the tiny Llama of the test suite.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
BENCHES = sorted(p.stem for p in TOOLS.glob("bench_*.py"))
# other tools with a smoke mode whose JSON is a pass/fail report: the keys that must be true
REPORTS: dict[str, list[str]] = {"crash_torture": ["all_ok"]}

# dotted paths into each benchmark's JSON of the ratios its docs quote; "*" is every key of a mapping
RATIOS: dict[str, list[str]] = {
    "bench_build": [
        "throughput_ratio",
        "ratio_per_round.*",
        "rss_growth_4x_tokens",
        "compression_ratio_resid",
        "user_wait.passes_share_of_wall",
        "fsync_throughput_ratio",
    ],
    "bench_cbe": [
        "energy_ratio_streamed_over_full_batch.*.*",
        "first_energy_ratio_streamed_over_full_batch.*.*",
        "min_energy_ratio.*",
        "rss.peak_rss_growth_4x_tokens",
    ],
    "bench_codecs": [
        "presets.*.ratio_vs_fp16_raw",
        "presets.*.ratio_vs_fp16_zstd_store",
        "presets.*.max_rel_kl_change.*",
        "presets.*.worst_error_over_bound",
    ],
    "bench_lenses": ["affine_over_tuned_time"],
    "bench_depth": ["rss.peak_rss_ratio_4x_tokens", "rss.peak_rss_growth_4x_tokens"],
    "bench_stream": [
        "fit.throughput_ratio_zarr_over_memory",
        "fit.read_share_of_fit_zarr",
        "fit.fit_fraction_of_matmul",
        "rss.peak_rss_growth",
    ],
    "bench_remote": [
        "fit.throughput_ratio_s3_over_local",
        "fit.settings.*.throughput_ratio_s3_over_local",
        "fit.settings.*.s3_requests_per_s_of_fit",
        "read.throughput_ratio_s3_over_local",
        "affine.throughput_ratio_s3_over_local",
    ],
    "bench_workers": ["ratio_2_over_1", "overhead_s_per_row", "startup_overhead_s"],
}
# what a benchmark's JSON must say is true even in a smoke run (its results are only worth a ratio if so)
MUST_HOLD: dict[str, list[str]] = {
    "bench_remote": ["checks.same_lenses_from_s3_and_local"],
    "bench_workers": ["identical"],
}
TIMEOUT_S = 300  # a hung benchmark fails instead of hanging the suite (each takes seconds alone)
PARALLEL = 2  # runs at once: each one's timeout counts from its own start, not behind a queue of others


def values_at(data, path: str) -> list:
    """The values at a dotted `path` ("*" fans out over a mapping's values or a list's items)."""
    nodes = [data]
    for key in path.split("."):
        step = []
        for node in nodes:
            if key == "*":
                step.extend(node.values() if isinstance(node, dict) else node)
            else:
                assert isinstance(node, dict) and key in node, f"no {key!r} on the way to {path}"
                step.append(node[key])
        nodes = step
    return nodes


@pytest.fixture(scope="module")
def smoke_runs(llama_dir, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every benchmark's smoke run, started together and waited for."""
    root = tmp_path_factory.mktemp("bench-smoke")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def run(name: str) -> tuple[subprocess.CompletedProcess, Path]:
        out = root / f"{name}.json"
        cmd = [sys.executable, "-m", f"lenscache.tools.{name}", "--smoke", "--model", str(llama_dir), "--out", str(out)]
        # cwd: an empty directory, so that nothing a run writes by a relative path lands in the checkout
        work = root / name
        work.mkdir()
        # its own temporary directory, to see what a run leaves behind in it
        (root / f"{name}.tmp").mkdir()
        run_env = {**env, "TMPDIR": str(root / f"{name}.tmp")}
        try:
            done = subprocess.run(cmd, cwd=work, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  timeout=TIMEOUT_S)  # fmt: skip
            return subprocess.CompletedProcess(cmd, done.returncode, done.stdout.decode(errors="replace")), out
        except subprocess.TimeoutExpired as exc:
            output = (exc.output or b"").decode(errors="replace")
            return subprocess.CompletedProcess(cmd, f"killed after {TIMEOUT_S} s", output), out

    with ThreadPoolExecutor(PARALLEL) as pool:
        return dict(zip([*BENCHES, *REPORTS], pool.map(run, [*BENCHES, *REPORTS]), strict=True))


def test_benchmarks_are_found():
    assert {"bench_build", "bench_codecs", "bench_lenses", "bench_stream"} <= set(BENCHES)
    assert set(RATIOS) <= set(BENCHES), f"RATIOS lists benchmarks that no longer exist: {set(RATIOS) - set(BENCHES)}"


@pytest.mark.parametrize("name", BENCHES)
def test_smoke_run(name, smoke_runs):
    run, out = smoke_runs[name]
    assert run.returncode == 0, f"{name} --smoke exited {run.returncode}:\n{run.stdout[-4000:]}"
    assert out.is_file(), f"{name} --smoke wrote no JSON to --out {out}"
    result = json.loads(out.read_text())
    assert result.get("smoke") is True
    machine = result.get("machine")
    assert isinstance(machine, dict), f"{name}: no 'machine' entry"
    for key in ("cpu_model", "logical_cores", "ram_gib", "os", "python", "torch", "torch_threads", "gpus"):
        assert key in machine, f"{name}: machine lacks {key!r}"
    assert name in RATIOS, f"{name}: list the ratios its JSON promises in RATIOS (tests/test_benchmarks.py)"
    for path in RATIOS[name]:
        values = values_at(result, path)
        assert values, f"{name}: nothing at {path}"
        for v in values:
            assert isinstance(v, (int, float)) and not isinstance(v, bool), f"{name}: {path} = {v!r}"
            assert math.isfinite(v), f"{name}: {path} = {v!r}"
    for path in MUST_HOLD.get(name, []):
        assert values_at(result, path) == [True], f"{name}: {path} is not true"
    # a benchmark's scratch stores (hundreds of MB in a real run) go when it ends; other libraries' caches
    # (dask's scratch space, torch's compile cache) are theirs to keep
    left = sorted(p.name for p in (out.parent / f"{name}.tmp").iterdir() if p.name.startswith("lenscache-"))
    assert not left, f"{name} --smoke left its scratch directories behind: {left}"


@pytest.mark.parametrize("name", sorted(REPORTS))
def test_smoke_report(name, smoke_runs):
    run, out = smoke_runs[name]
    assert run.returncode == 0, f"{name} --smoke exited {run.returncode}:\n{run.stdout[-4000:]}"
    result = json.loads(out.read_text())
    for key in REPORTS[name]:
        assert result.get(key) is True, f"{name}: {key} = {result.get(key)!r}"
