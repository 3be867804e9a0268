"""Several reader processes on one S3 store while a build appends to it, and an endpoint that cannot be
reached, against the real S3 API server on loopback (tests/s3_server.py).

The build pauses before three of its commits (its row's chunks are on the server, the committed count
does not name them yet) and goes on only once every reader process has read the whole store as it is
then, so every reader sees the committed count grow without the test depending on any timing: each
wait is for an event (a line from the build, a read logged by a reader), with a deadline that fails
the test instead of hanging it. The readers are separate processes with the read-only identity: two
that open the store over and over and record a digest of every committed row they read, and one
`lenscache fit` started in the middle of the build.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from s3_server import s3_server

from lenscache.reader import open_store

CLI = [sys.executable, "-m", "lenscache.tools.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
ENV.pop("LENSCACHE_CRASH_AT", None)
BUCKET = "concurrent"
N_SEQ = 10  # sequences of 16 tokens, 2 per chunk and per row: commits at 2, 4, ..., 10
GATES = (4, 6, 8)  # the build stops before these commits until the readers have read the store
DEADLINE_S = 150.0  # any one wait; reaching it fails the test (nothing here depends on speed)
READERS = 2

# The build (as `lenscache build`), stopping before each commit in GATES: it prints a line and waits
# for one on stdin.
GATED = """
import sys
import lenscache.cache.writer as writer
gates = {int(g) for g in sys.argv[1].split(",")}
real = writer.StoreWriter.commit
def gated(self, committed):
    if committed in gates:
        print(f"at commit {committed}", flush=True)
        sys.stdin.readline()
    return real(self, committed)
writer.StoreWriter.commit = gated
from lenscache.tools.cli import main
main(sys.argv[2:])
"""

# `lenscache` (the CLI) that prints a line each time it has opened a store: "opened at N" (N committed).
OPENED = """
import sys
import lenscache.reader as reader
real = reader.Store.__init__
def opened(self, url):
    real(self, url)
    print(f"opened at {self.n_sequences}", flush=True)
reader.Store.__init__ = opened
from lenscache.tools.cli import main
main(sys.argv[1:])
"""

# How a row is compared: one digest over its values in every array (the readers and the test share it).
DIGESTS = """
import hashlib
def row_digests(store, n):
    seqs = slice(0, n)
    ids, logprobs = store.topk(seqs)
    parts = [store.tokens(seqs), store.final_resid(seqs), store.logsumexp(seqs), ids, logprobs]
    parts += [store.resid_raw(layer, seqs) for layer in store.layers]
    return [hashlib.sha256(b"".join(p[i].tobytes() for p in parts)).hexdigest() for i in range(n)]
"""
_namespace: dict = {}
exec(DIGESTS, _namespace)
row_digests = _namespace["row_digests"]

# One reader process: opens the store again and again until it is complete (or its deadline passes),
# each time reads every committed row of every array and logs one JSON line: the committed count,
# the status, each row's digest, and whether a read of one row more was refused.
READER = (
    DIGESTS
    + """
import json, sys, time
from lenscache.errors import SelectionError
from lenscache.reader import open_store
url, log_path, deadline = sys.argv[1], sys.argv[2], time.monotonic() + float(sys.argv[3])
with open(log_path, "a", buffering=1) as log:
    while True:
        if time.monotonic() > deadline:
            sys.exit("reader: the store was not complete before the deadline")
        store = open_store(url)
        n, status = store.n_sequences, store.meta.build.status
        try:
            store.tokens(slice(0, n + 1))
            refused = False
        except SelectionError:
            refused = True
        log.write(json.dumps({"n": n, "status": status, "rows": row_digests(store, n), "refused": refused}) + "\\n")
        if status == "complete":
            break
"""
)


def build_args(llama_dir: Path, text_file: Path) -> list[str]:
    return ["--model", str(llama_dir), "--data", str(text_file), "--seq-len", "16", "--max-tokens", str(16 * N_SEQ),
            "--seqs-per-chunk", "2", "--batch-size", "2", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        server.make_bucket(BUCKET)
        yield server


class Lines:
    """The lines a child prints on stdout, collected by a thread, so that a wait for one has a deadline."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.queue = proc, queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.queue.put(line.rstrip("\n"))
        self.queue.put(None)

    def next(self) -> str | None:
        """The next line (None: the child closed its output)."""
        try:
            return self.queue.get(timeout=DEADLINE_S)
        except queue.Empty:
            raise AssertionError(f"no line from {self.proc.args[:4]} in {DEADLINE_S} s") from None


def logged(path: Path) -> list[dict]:
    """The reads a reader has logged so far (a last line still being written is left for later)."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def wait_for(what: str, check, children: list[tuple[subprocess.Popen, Path]]) -> None:
    """Poll `check()` until it is true; a child that exits, or the deadline, fails the test instead of
    hanging it (each child's stderr goes to its file)."""
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        for child, err in children:
            assert child.poll() is None, (
                f"{child.args[:3]} exited {child.returncode}: {err.read_text()[-3000:]}"
            )
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def seq_chunks_on_server(s3, prefix: str) -> set[int]:
    """Indices along seq of the residual chunks on the server, committed or not."""
    keys = [k[len(prefix) :].split("/") for k in s3.objects(BUCKET) if k.startswith(prefix)]
    return {int(k[3]) for k in keys if k[:2] == ["resid", "c"]}


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_readers_during_a_build_on_s3_see_only_committed_rows(s3, llama_dir, text_file, tmp_path):
    url = f"s3://{BUCKET}/growing.zarr"
    reader_env = s3.env("reader", ENV)
    # stderr to files: a pipe nobody reads could fill and stop a child, and reading one blocks until it exits
    build_err, fit_err = tmp_path / "build.err", tmp_path / "fit.err"
    files: list = []  # the stderr files' handles in this process, closed at the end

    def to_file(path: Path):
        files.append(path.open("w"))
        return files[-1]

    build = subprocess.Popen(
        [sys.executable, "-c", GATED, ",".join(map(str, GATES)), "build", *build_args(llama_dir, text_file), "--out", url],
        env=s3.env("writer", ENV), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=to_file(build_err), text=True,
    )  # fmt: skip
    lines, children = Lines(build), [build]
    logs = [tmp_path / f"reader{i}.jsonl" for i in range(READERS)]
    readers: list[tuple[subprocess.Popen, Path]] = []
    fit_out = tmp_path / "lens"
    try:
        for gate in GATES:
            assert lines.next() == f"at commit {gate}", build_err.read_text()
            committed = gate - 2
            # the row about to be committed is on the server already, uncommitted
            assert committed // 2 in seq_chunks_on_server(s3, "growing.zarr/")
            if gate == GATES[0]:
                for log in logs:
                    err = log.with_suffix(".err")
                    proc = subprocess.Popen([sys.executable, "-c", READER, url, str(log), str(DEADLINE_S)],
                                            env=reader_env, stderr=to_file(err))  # fmt: skip
                    readers.append((proc, err))
                children += [proc for proc, _ in readers]
            if gate == GATES[1]:  # (at the first there is one training sequence: too few for a fit)
                # a fit started now reads the rows committed now, while the build goes on writing
                fit = subprocess.Popen(
                    [sys.executable, "-c", OPENED, "fit", url, "--lens", "affine", "--out", str(fit_out),
                     "--no-progress"], env=reader_env, stdout=subprocess.PIPE, stderr=to_file(fit_err), text=True)  # fmt: skip
                children.append(fit)
                fit_lines = Lines(fit)
                # the build goes on only once the fit has opened the store: it then reads while rows are written
                assert fit_lines.next() == f"opened at {committed}", fit_err.read_text()
            # every reader has finished a read that began after the build stopped: two more logged reads
            marks = [len(logged(log)) for log in logs]
            for log, mark in zip(logs, marks, strict=True):
                wait_for(
                    f"a read of {log.name} at commit {committed}",
                    lambda log=log, mark=mark: len(logged(log)) >= mark + 2,
                    readers,
                )
                assert logged(log)[-1]["n"] == committed
            build.stdin.write("\n")
            build.stdin.flush()
        build.stdin.close()
        assert build.wait(timeout=DEADLINE_S) == 0, build_err.read_text()
        for reader, err in readers:
            assert reader.wait(timeout=DEADLINE_S) == 0, err.read_text()
        assert fit.wait(timeout=DEADLINE_S) == 0, fit_err.read_text()
    finally:
        for child in children:
            stop(child)
        for f in files:
            f.close()

    with s3.as_identity("reader"):
        final = open_store(url)
        assert final.meta.build.status == "complete" and final.n_sequences == N_SEQ
        truth = row_digests(final, final.n_sequences)
    for log in logs:
        reads = logged(log)
        counts = [r["n"] for r in reads]
        assert counts == sorted(counts), f"{log.name}: the committed count went back: {counts}"
        assert {*(g - 2 for g in GATES), N_SEQ} <= set(counts), counts  # it saw the store grow
        assert reads[-1]["status"] == "complete"
        for r in reads:
            assert len(r["rows"]) == r["n"] and r["refused"], r["n"]  # never a row past the committed count
            assert r["rows"] == truth[: r["n"]], f"{log.name}: a row read at committed={r['n']} differs"
    # the fit used the rows committed when it opened the store, and no others: the train split of 4
    # sequences (one held out) of 16 tokens
    fitted = json.loads((fit_out / "lens.json").read_text())
    assert fitted["kind"] == "affine" and fitted["fit"]["tokens"] == 3 * 16


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released: connecting to it is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_endpoint_gets_one_clear_line(s3, llama_dir, text_file):
    """`info` and `build` against an endpoint where nothing listens: one line naming the store and the
    endpoint, exit 2, no traceback, quickly (one attempt: AWS_MAX_ATTEMPTS=1; botocore's default of five
    attempts with backoff makes it about ten seconds)."""
    endpoint = f"http://127.0.0.1:{closed_port()}"
    env = {**s3.env("writer", ENV), "AWS_ENDPOINT_URL": endpoint, "AWS_MAX_ATTEMPTS": "1"}
    url = f"s3://{BUCKET}/unreachable.zarr"
    for command in (["info", url], ["build", *build_args(llama_dir, text_file), "--out", url]):
        run = subprocess.run([*CLI, *command], env=env, capture_output=True, text=True, timeout=DEADLINE_S)
        code, err = run.returncode, run.stderr
        assert code == 2, err
        assert err.startswith(f"error: {url}: cannot reach the storage service"), err
        assert endpoint in err and "AWS_ENDPOINT_URL" in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not [k for k in s3.objects(BUCKET) if k.startswith("unreachable.zarr")]
