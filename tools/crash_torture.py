"""Crash torture: kill `lenscache build` with SIGKILL, resume, and compare with a clean build.

Two ways to choose where the kills land:

- ``--points named``: one kill at every named crash point of the write protocol (cache/faults.py;
  the build kills itself there, so each kill lands in the same state on every run and every
  machine, however loaded). With ``--direct`` the chunks are 1 MiB and more, written with O_DIRECT,
  and the points include a chunk caught in its temporary file.
- ``--points N``: N kills at random times (stratified over the clean build's writing time, after
  the store appears), which land wherever the machine's timing puts them.

Every killed store is resumed with ``--resume``, must verify clean and must equal the clean build
bit for bit (lossless codecs). The full runs are

    python -m lenscache.tools.crash_torture --points 24 --out bench-results/crash_torture.json
    python -m lenscache.tools.crash_torture --points named [--direct]

and ``--smoke`` kills one build at one named point (a few seconds beyond the imports). With no
--model, a tiny random Llama is made for the run (lenscache.tools.tiny_models). The exit status is
1 when any kill did not resume to an identical, clean store.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lenscache.cache.direct_store import MIN_DIRECT_BYTES, PROBE_WRITES
from lenscache.cache.faults import ENV, armed
from lenscache.reader import open_store
from lenscache.schema import RESID, RESID_SCALE
from lenscache.tools.smoke import write_result
from lenscache.verify import verify_store

CLI = [sys.executable, "-m", "lenscache.tools.cli", "build"]
SEQ_AXIS_1 = (RESID, RESID_SCALE)  # arrays whose sequence axis is 1 (0 for the others)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


# -- what a killed store holds ------------------------------------------------------------------


def build_state(out: Path) -> tuple[str | None, int]:
    """(status, committed) as the root metadata on disk says; (None, -1) without lenscache metadata."""
    try:
        meta = json.loads((out / "zarr.json").read_text())
        build = meta["attributes"]["lenscache"]["build"]
        return build["status"], int(build["committed"])
    except (OSError, ValueError, KeyError):
        return None, -1


def chunk_files(out: Path) -> int:
    return sum(1 for p in out.rglob("*") if p.is_file() and "/c/" in p.as_posix()) if out.exists() else 0


def partial_files(out: Path) -> int:
    """Temporary files of writes that never reached their rename."""
    return sum(1 for p in out.rglob("*.partial")) if out.exists() else 0


def same_store(a: Path, b: Path) -> bool:
    """Same identity, same arrays, every value equal."""
    x, y = open_store(a), open_store(b)
    if set(x.arrays) != set(y.arrays) or x.meta.build.identity != y.meta.build.identity:
        return False
    return all(np.array_equal(x.arrays[n][...], y.arrays[n][...]) for n in x.arrays)


@dataclass
class Geometry:
    """How a store's rows map onto chunk writes, read from a (clean) store."""

    n_sequences: int
    seqs_per_chunk: int
    chunks_per_row: int  # whole chunks the row writer (cache/chunk_writer.py) writes per full row
    # of those, per row, the ones of MIN_DIRECT_BYTES or more: the O_DIRECT writes of a local store
    # (fixed by the data: a chunk's stored bytes are the same in every build)
    direct_per_row: list[int]

    @property
    def rows(self) -> int:
        return math.ceil(self.n_sequences / self.seqs_per_chunk)

    def committed_before_direct_write(self, k: int) -> int:
        """The committed count while the k-th direct write (from 1) is in flight."""
        done = 0
        for row, count in enumerate(self.direct_per_row):
            done += count
            if k <= done:
                return row * self.seqs_per_chunk
        raise ValueError(f"the build makes {done} direct writes, not {k}")


def geometry(store_path: Path) -> Geometry:
    """Row geometry of a store: arrays chunked `seqs_per_chunk` rows at a time get whole-chunk writes."""
    store = open_store(store_path)
    s, n = store.meta.build.seqs_per_chunk, store.meta.n_sequences
    per_row, direct = 0, [0] * math.ceil(n / s)
    for name, arr in store.arrays.items():
        axis = 1 if name in SEQ_AXIS_1 else 0
        if arr.chunks[axis] != s:
            continue  # rows are partial chunks of it: zarr writes those, not the row writer
        grid = [math.ceil(size / c) for size, c in zip(arr.shape, arr.chunks, strict=True)]
        per_row += math.prod(grid) // grid[axis]
        for path in (store_path / name / "c").rglob("*"):
            if path.is_file() and path.stat().st_size >= MIN_DIRECT_BYTES:
                direct[int(path.relative_to(store_path / name / "c").parts[axis])] += 1
    return Geometry(n, s, per_row, direct)


def accepts_o_direct(directory: Path) -> bool:
    """Whether files in `directory` open with O_DIRECT (tmpfs before Linux 6.6, some network filesystems
    and systems without O_DIRECT do not)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    probe = directory / ".o_direct_probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | flag, 0o600))
    except OSError:
        return False
    probe.unlink()
    return True


def named_points(geo: Geometry, direct: bool) -> list[str]:
    """One crash point per distinct state of the write protocol, for a store of this geometry.

    `direct`: its chunks are written with O_DIRECT, so a chunk can be caught in its temporary file
    (only within the first `PROBE_WRITES` direct writes, which a slow device cannot turn off).
    """
    s, c, n = geo.seqs_per_chunk, geo.chunks_per_row, geo.n_sequences
    points = ["group-created", "after-init", "after-layout", "head-written", "tokens-written"]
    points.append("after-commit:0")
    points += ["after-chunk:1", f"before-commit:{min(s, n)}", f"after-commit:{min(s, n)}"]
    if geo.rows >= 2:
        points += [f"after-chunk:{c + (c + 1) // 2}", f"after-chunk:{2 * c}"]  # mid-row 2, its last chunk
    points += [f"before-commit:{n}", f"after-commit:{n}"]
    row0 = geo.direct_per_row[0] if direct else 0
    if row0:
        points.append("mid-chunk:1")
    if direct and geo.rows >= 2 and geo.direct_per_row[1] and row0 + 1 <= PROBE_WRITES:
        points.append(f"mid-chunk:{row0 + 1}")  # the first direct write of the second row
    return points


# -- one kill ----------------------------------------------------------------------------------


@dataclass
class Crash:
    """A build run with LENSCACHE_CRASH_AT=point, and the store it left."""

    point: str
    returncode: int
    said: bool  # the build printed that it was killing itself at `point`
    status: str | None
    committed: int
    chunk_files: int
    partial_files: int
    stderr_tail: str

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL and self.said


def crash_at(build_args: list[str], out: Path, point: str) -> Crash:
    """Run `lenscache build *build_args --out out` until it kills itself at `point`."""
    done = subprocess.run(
        [*CLI, *build_args, "--out", str(out)], env=_env(**{ENV: point}), capture_output=True, text=True
    )
    status, committed = build_state(out)
    return Crash(point, done.returncode, f"SIGKILL) at {point}\n" in done.stderr, status, committed,
                 chunk_files(out), partial_files(out), done.stderr[-1500:])  # fmt: skip


@dataclass
class Outcome:
    """A kill, and whether its store resumed to the clean build."""

    point: str
    killed: bool  # died by SIGKILL where asked (named) / before finishing (timed)
    status_at_kill: str | None
    committed_at_kill: int
    chunk_files_at_kill: int
    partial_files_at_kill: int
    resumed_ok: bool = False
    verified: bool = False
    identical: bool = False
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.killed and self.resumed_ok and self.verified and self.identical


def build_in_process(build_args: list[str]) -> str:
    """`lenscache build *build_args` in this process (spares a subprocess its imports); '' or the error."""
    from lenscache.tools.cli import cli

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            cli.main(args=["build", *build_args], prog_name="lenscache", standalone_mode=False)
    except Exception as exc:  # reported with the kill it belongs to
        return f"{type(exc).__name__}: {exc}"
    return ""


def resume_and_compare(build_args: list[str], out: Path, clean: Path, outcome: Outcome) -> Outcome:
    """`--resume` the killed store (this process has no crash point armed), verify it, compare it."""
    error = build_in_process([*build_args, "--out", str(out), "--resume"])
    outcome.resumed_ok = not error
    outcome.error = "; ".join(e for e in (outcome.error, error) if e)
    if outcome.resumed_ok:
        outcome.verified = verify_store(out).ok
        outcome.identical = same_store(out, clean)
    return outcome


def _clean_build(build_args: list[str], clean: Path) -> float:
    """Build the reference store; the seconds between its root metadata appearing and the build's end."""
    proc = subprocess.Popen([*CLI, *build_args, "--out", str(clean)], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    while not (clean / "zarr.json").exists() and proc.poll() is None:
        time.sleep(0.005)
    appeared = time.perf_counter()
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"clean build failed: {err.decode()[-2000:]}")
    return time.perf_counter() - appeared


def smoke_points(geo: Geometry, direct: bool) -> list[str]:
    """One point: the second row half written, the first committed (the state most kills land in)."""
    return [f"after-chunk:{geo.chunks_per_row + 1}" if geo.rows >= 2 else "after-chunk:1"]


def torture_named(
    build_args: list[str], workdir: Path, choose: Callable[[Geometry, bool], list[str]] = named_points
) -> dict:
    """Kill `lenscache build *build_args` at each point `choose` names for the clean store's geometry."""
    if armed() is not None:  # this process's own builds would kill it
        raise RuntimeError(f"{ENV} is set in this process; unset it (the tool sets it for each kill)")
    started = time.perf_counter()
    clean = workdir / "clean.zarr"
    if error := build_in_process([*build_args, "--out", str(clean)]):
        raise RuntimeError(f"clean build failed: {error}")
    geo = geometry(clean)
    direct = any(geo.direct_per_row) and accepts_o_direct(workdir)
    results = []
    for i, point in enumerate(choose(geo, direct)):
        out = workdir / f"killed-{i}.zarr"
        crash = crash_at(build_args, out, point)
        outcome = Outcome(point, crash.killed, crash.status, crash.committed, crash.chunk_files,
                          crash.partial_files)  # fmt: skip
        if not crash.killed:
            outcome.error = f"not killed at {point} (exit {crash.returncode}): {crash.stderr_tail[-300:]}"
        results.append(resume_and_compare(build_args, out, clean, outcome))
        shutil.rmtree(out, ignore_errors=True)
    return {
        "mode": "named",
        "points": len(results),
        "geometry": asdict(geo),
        "o_direct": direct,
        "all_ok": all(r.ok for r in results),
        "seconds": round(time.perf_counter() - started, 1),
        "kills": [asdict(r) for r in results],
    }


def torture(build_args: list[str], workdir: Path, points: int, seed: int = 0) -> dict:
    """Run `points` randomly timed kill/resume cycles of `lenscache build *build_args`."""
    if armed() is not None:  # the resumes run in this process
        raise RuntimeError(f"{ENV} is set in this process; unset it (timed kills need no crash point)")
    started = time.perf_counter()
    clean = workdir / "clean.zarr"
    writing_s = _clean_build(build_args, clean)
    rng = random.Random(seed)
    results = []
    for i in range(points):
        out = workdir / f"killed-{i}.zarr"
        # stratified delays: point i lands in the i-th slice of the writing time
        delay = writing_s * (i + rng.random()) / points
        proc = subprocess.Popen([*CLI, *build_args, "--out", str(out)], env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        while not (out / "zarr.json").exists() and proc.poll() is None:
            time.sleep(0.002)
        time.sleep(delay)
        finished = proc.poll() is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        status, committed = build_state(out)
        # a build that finished first is no kill, but its store must still resume and compare equal
        state = (status, committed, chunk_files(out), partial_files(out))
        outcome = Outcome(f"after {delay:.3f} s", True, *state)
        outcome.error = "finished before the kill" if finished else ""
        results.append(resume_and_compare(build_args, out, clean, outcome))
        shutil.rmtree(out, ignore_errors=True)
    landed = [r for r in results if not r.error.startswith("finished before the kill")]
    distinct = {(r.status_at_kill, r.committed_at_kill, r.chunk_files_at_kill) for r in landed}
    return {
        "mode": "timed",
        "points": points,
        "distinct_kill_states": len(distinct),
        "clean_build_writing_seconds": round(writing_s, 2),
        "all_ok": all(r.resumed_ok and r.verified and r.identical for r in results),
        "seconds": round(time.perf_counter() - started, 1),
        "kills": [asdict(r) for r in results],
    }


# -- the command -------------------------------------------------------------------------------


def corpus_text(n_documents: int = 400) -> str:
    docs = (f"Document {i}: " + "the quick brown fox jumps. " * (i % 7 + 3) for i in range(n_documents))
    return "\n\n".join(docs)


def build_args_for(
    model: str, data: Path, *, direct: bool, sequences: int | None, seq_len: int | None
) -> list[str]:
    """The `lenscache build` options of a torture run: one sequence per chunk, or O_DIRECT-sized chunks."""
    if direct:  # 128 x 128 tokens of a d_model 64 model: chunks of 2 MiB
        seq_len, per_chunk, batch, sequences = seq_len or 128, 128, 32, sequences or 256
    else:
        seq_len, per_chunk, batch, sequences = seq_len or 8, 1, 1, sequences or 64
    return [
        "--model", model, "--data", str(data), "--seq-len", str(seq_len),
        "--max-tokens", str(seq_len * sequences), "--batch-size", str(batch),
        "--seqs-per-chunk", str(per_chunk), "--no-progress",
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default="24", help="'named' (every crash point, deterministic) or a number "
                    "of randomly timed kills (default 24)")  # fmt: skip
    ap.add_argument("--direct", action="store_true", help="chunks of 1 MiB and more (the O_DIRECT path)")
    ap.add_argument("--smoke", action="store_true", help="one named point on a tiny build: seconds")
    ap.add_argument("--model", default=None, help="model for the builds (default: a tiny random Llama)")
    ap.add_argument("--seq-len", type=int, default=None, help="default 8 (128 with --direct)")
    ap.add_argument("--sequences", type=int, default=None, help="default 64 (256 with --direct)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON report (default bench-results/crash_torture.json; "
                    "with --smoke a temporary file)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.points != "named" and not (args.points.isdigit() and int(args.points) > 0):
        ap.error(f"--points takes 'named' or a positive number, not {args.points!r}")
    work = Path(tempfile.mkdtemp(prefix="lenscache-torture-"))
    try:
        model = args.model
        if model is None:
            from lenscache.tools.tiny_models import make_tiny_model

            model = str(make_tiny_model(work / "llama", "llama"))
        data = work / "corpus.txt"
        data.write_text(corpus_text(3000 if args.direct else 400))
        sequences = 4 if args.smoke and not args.direct else args.sequences
        build_args = build_args_for(
            model, data, direct=args.direct, sequences=sequences, seq_len=args.seq_len
        )
        if args.smoke:
            result = torture_named(build_args, work, smoke_points)
        elif args.points == "named":
            result = torture_named(build_args, work)
        else:
            result = torture(build_args, work, int(args.points), args.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = write_result(result, args.out, "crash_torture", args.smoke)
    summary = {k: v for k, v in result.items() if k != "kills"}
    print(json.dumps({**summary, "report": str(out)}, indent=2))
    if not result["all_ok"]:
        checks = ("killed", "resumed_ok", "verified", "identical")
        bad = [k for k in result["kills"] if not all(k[c] for c in checks)]
        print(json.dumps(bad, indent=1), file=sys.stderr)
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["all_ok"] else 1)
