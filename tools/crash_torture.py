"""Crash torture: kill `lenscache build` with SIGKILL at many points, resume, compare with a clean build.

Each point starts a fresh build in a subprocess, waits until the store exists, sleeps a delay spread
over the build's writing time (so kills land during chunk writes, commits and metadata updates
alike), sends SIGKILL, then runs the same command with `--resume`. Every resumed store must verify
clean and equal the clean build bit for bit (lossless codecs). The test suite runs a few points;
the full run is

    python -m lenscache.tools.crash_torture --points 24 --out bench-results/crash_torture.json

(with no --model, a tiny random Llama is made for the run).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lenscache.reader import open_store
from lenscache.verify import verify_store

CLI = [sys.executable, "-m", "lenscache.tools.cli", "build"]


@dataclass
class KillPoint:
    delay_s: float
    committed_at_kill: int
    chunk_files_at_kill: int
    finished_before_kill: bool
    resumed_ok: bool
    verified: bool
    identical: bool
    error: str = ""


def _committed(out: Path) -> int:
    try:
        meta = json.loads((out / "zarr.json").read_text())
        return int(meta["attributes"]["lenscache"]["build"]["committed"])
    except (OSError, ValueError, KeyError):
        return -1


def _chunk_files(out: Path) -> int:
    return sum(1 for p in out.rglob("*") if p.is_file() and "/c/" in p.as_posix()) if out.exists() else 0


def _same(a: Path, b: Path) -> bool:
    x, y = open_store(a), open_store(b)
    if set(x.arrays) != set(y.arrays) or x.meta.build.identity != y.meta.build.identity:
        return False
    return all(np.array_equal(x.arrays[n][...], y.arrays[n][...]) for n in x.arrays)


def torture(build_args: list[str], workdir: Path, points: int, seed: int = 0) -> dict:
    """Run `points` kill/resume cycles of `lenscache build *build_args` and check each against a clean build."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    clean = workdir / "clean.zarr"
    started = time.perf_counter()
    proc = subprocess.Popen(
        [*CLI, *build_args, "--out", str(clean)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    while not (clean / "zarr.json").exists() and proc.poll() is None:
        time.sleep(0.005)
    appeared = time.perf_counter()
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"clean build failed: {err.decode()[-2000:]}")
    writing_s = time.perf_counter() - appeared
    rng = random.Random(seed)
    results: list[KillPoint] = []
    for i in range(points):
        out = workdir / f"killed-{i}.zarr"
        # stratified delays: point i lands in the i-th slice of the writing time
        delay = writing_s * (i + rng.random()) / points
        proc = subprocess.Popen(
            [*CLI, *build_args, "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        while not (out / "zarr.json").exists() and proc.poll() is None:
            time.sleep(0.002)
        time.sleep(delay)
        finished = proc.poll() is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        point = KillPoint(delay, _committed(out), _chunk_files(out), finished, False, False, False)
        done = subprocess.run(
            [*CLI, *build_args, "--out", str(out), "--resume"], env=env, capture_output=True, text=True
        )
        point.resumed_ok = done.returncode == 0
        if point.resumed_ok:
            point.verified = verify_store(out).ok
            point.identical = _same(out, clean)
        else:
            point.error = done.stderr[-500:]
        results.append(point)
        shutil.rmtree(out, ignore_errors=True)
    distinct = len({(p.committed_at_kill, p.chunk_files_at_kill) for p in results if not p.finished_before_kill})
    return {
        "points": points,
        "distinct_kill_states": distinct,
        "clean_build_writing_seconds": round(writing_s, 2),
        "all_ok": all(p.resumed_ok and p.verified and p.identical for p in results),
        "seconds": round(time.perf_counter() - started, 1),
        "kills": [asdict(p) for p in results],
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=24)
    ap.add_argument("--model", default=None, help="model for the builds (default: a tiny random Llama)")
    ap.add_argument("--seq-len", type=int, default=8)
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench-results/crash_torture.json")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lenscache-torture-"))
    try:
        model = args.model
        if model is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from tiny_models import make_tiny_model

            model = str(make_tiny_model(work / "llama", "llama"))
        text = work / "corpus.txt"
        text.write_text("\n\n".join(f"Document {i}: " + "the quick brown fox jumps. " * (i % 7 + 3) for i in range(400)))
        build_args = [
            "--model", model, "--data", str(text), "--seq-len", str(args.seq_len),
            "--max-tokens", str(args.seq_len * args.sequences), "--batch-size", "1", "--seqs-per-chunk", "1",
            "--no-progress",
        ]  # fmt: skip
        result = torture(build_args, work, args.points, args.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    summary = {k: v for k, v in result.items() if k != "kills"}
    print(json.dumps(summary, indent=2))
    return result


if __name__ == "__main__":
    main()
