"""Icechunk (transactional Zarr) against lenscache's plain Zarr + fsspec write protocol: measured, one run.

The same arrays go through both, shaped like a store's residual stream (layers x sequences x
positions x d_model, bfloat16 bits as uint16, one chunk = 1 layer x 8 sequences x 512 x 576 = 4.7 MB,
blosc-zstd + crc32c as lenscache writes them), written row by row (a row = one chunk per layer)
with a commit after each row, as a build does:

- ``plain``: lenscache's protocol. Every chunk is one object written whole; a row is committed by
  rewriting the root ``zarr.json`` with the new committed count (readers read only that many rows).
- ``icechunk``: one writable session per row, its chunks written through the session's store, then
  ``session.commit`` (a new snapshot; readers of older snapshots are unaffected).

Measured for each, on the loopback S3 API server (`lenscache.tools.s3_loopback`, moto, objects in
memory) and on the local disk: write throughput, commit latency, objects and requests per chunk and
per commit, read throughput from a fresh open, open latency. Then icechunk's semantics are checked,
on S3 (each check is run, not assumed): uncommitted chunks invisible to readers, snapshot isolation,
two writers on one branch (conflict, rebase), fork/merge of parallel writers into one commit, time
travel to an older snapshot, and a writer killed mid-row.

    pip install icechunk      # not a lenscache dependency: only this evaluation uses it
    python -m lenscache.tools.eval_icechunk --out /tmp/icechunk.json [--store STORE]

`--store`: take the chunk values from a real store's residual stream (else synthetic bfloat16
activations). `--quick`: tiny arrays, seconds. docs/icechunk.md records a run and the decision.
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr
from zarr.storage import FsspecStore, LocalStore

from lenscache.encoding import SERIALIZER, compressors
from lenscache.errors import LensCacheError
from lenscache.tools.machine import describe_machine
from lenscache.tools.s3_loopback import KEY, REGION, loopback_s3, stats_delta
from lenscache.tools.smoke import scratch_dir

BUCKET = "icechunk-eval"
FULL = {"layers": 4, "rows": 4, "seqs": 8, "pos": 512, "d": 576, "read_rounds": 3}
QUICK = {"layers": 2, "rows": 3, "seqs": 2, "pos": 16, "d": 32, "read_rounds": 1}


def import_icechunk():
    try:
        import icechunk
    except ImportError:
        raise LensCacheError(
            "this evaluation needs icechunk, which lenscache does not depend on: pip install icechunk"
        ) from None
    return icechunk


def activations(sizes: dict, store: str | None) -> np.ndarray:
    """(layers, rows*seqs, pos, d) uint16 bfloat16 bits: a real store's resid, or synthetic ones."""
    shape = (sizes["layers"], sizes["rows"] * sizes["seqs"], sizes["pos"], sizes["d"])
    if store is not None:
        from lenscache.reader import open_store

        src = open_store(store)
        n = min(shape[1], src.n_sequences)
        layers = src.layers[: shape[0]]
        raw = np.stack([src.resid_raw(layer, slice(0, n)) for layer in layers])
        if raw.dtype != np.uint16 or raw.shape[2:] != shape[2:] or len(layers) < shape[0] or n < shape[1]:
            raise LensCacheError(
                f"{store}: need a bf16 store with >= {shape[0]} layers and {shape[1]} sequences"
            )
        return raw[:, : shape[1]]
    # activations-like: heavy-tailed floats with a few large channels, rounded to bfloat16
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32) * rng.gamma(2.0, 0.5, size=shape[-1]).astype(np.float32)
    return (x.view(np.uint32) + 0x7FFF + ((x.view(np.uint32) >> 16) & 1) >> 16).astype(np.uint16)


def create_array(group: zarr.Group, shape: tuple, sizes: dict) -> zarr.Array:
    return group.create_array("resid", shape=shape, chunks=(1, sizes["seqs"], sizes["pos"], sizes["d"]),
                              dtype="uint16", serializer=SERIALIZER, compressors=compressors(2),
                              fill_value=0, config={"write_empty_chunks": True})  # fmt: skip


class Counter:
    """Objects and requests: the S3 server's counts, or the files under a local directory (a file
    replaced by a rename counts as written again)."""

    def __init__(self, server=None, root: Path | None = None):
        self.server, self.root = server, root

    def read(self) -> dict:
        if self.server is not None:
            return self.server.stats()
        files = [p for p in self.root.rglob("*") if p.is_file()] if self.root.exists() else []
        return {str(p): (st.st_ino, st.st_mtime_ns, st.st_size) for p in files for st in [p.stat()]}

    def delta(self, after: dict, before: dict) -> dict:
        if self.server is not None:
            d = stats_delta(after, before)
            return {"requests": d["requests"], "puts": d["by_method"].get("PUT", 0), "bytes": d["bytes_in"]}
        written = [p for p, v in after.items() if before.get(p) != v]
        return {"files": len(written), "bytes": sum(after[p][2] for p in written)}


class Plain:
    """lenscache's protocol: whole-chunk objects, then the committed count in the root metadata."""

    name = "plain"

    def __init__(self, url: str | None = None, root: Path | None = None):
        self.url, self.root = url, root

    def _store(self, read_only: bool):
        if self.url is not None:
            return FsspecStore.from_url(self.url, read_only=read_only)
        return LocalStore(self.root, read_only=read_only)

    def create(self, shape: tuple, sizes: dict) -> None:
        self.group = zarr.open_group(store=self._store(False), mode="w")
        self.group.attrs.update({"lenscache": {"committed": 0}})
        self.array = create_array(self.group, shape, sizes)

    def write_row(self, i: int, seqs: int, values: np.ndarray) -> None:
        self.array[:, i * seqs : (i + 1) * seqs] = values

    def commit(self, committed: int) -> None:
        self.group.attrs.update({"lenscache": {"committed": committed}})

    def open_reader(self) -> tuple[zarr.Array, int]:
        group = zarr.open_group(store=self._store(True), mode="r")
        return group["resid"], int(group.attrs["lenscache"]["committed"])


class Ice:
    """Icechunk: a writable session per row, committed as a snapshot."""

    name = "icechunk"

    def __init__(self, prefix: str | None = None, root: Path | None = None, server=None):
        ic = import_icechunk()
        self.ic = ic
        if server is not None:
            self.storage = ic.s3_storage(bucket=BUCKET, prefix=prefix, region=REGION, endpoint_url=server.endpoint,
                                         allow_http=True, force_path_style=True, access_key_id=KEY[0],
                                         secret_access_key=KEY[1])  # fmt: skip
        else:
            self.storage = ic.local_filesystem_storage(str(root))

    def create(self, shape: tuple, sizes: dict) -> None:
        self.repo = self.ic.Repository.create(self.storage)
        session = self.repo.writable_session("main")
        create_array(zarr.group(store=session.store), shape, sizes)
        session.commit("layout")
        self.session = self.repo.writable_session("main")
        self.array = zarr.open_group(store=self.session.store, mode="r+")["resid"]

    def write_row(self, i: int, seqs: int, values: np.ndarray) -> None:
        self.array[:, i * seqs : (i + 1) * seqs] = values

    def commit(self, committed: int) -> None:
        self.session.commit(f"rows up to {committed}", metadata={"committed": committed})
        self.session = self.repo.writable_session("main")  # the next row's (part of a commit's cost)
        self.array = zarr.open_group(store=self.session.store, mode="r+")["resid"]

    def open_reader(self) -> tuple[zarr.Array, int]:
        repo = self.ic.Repository.open(self.storage)
        session = repo.readonly_session("main")
        committed = next(iter(repo.ancestry(branch="main"))).metadata.get("committed", 0)
        return zarr.open_group(store=session.store, mode="r")["resid"], int(committed)


def measure(backend, counter: Counter, data: np.ndarray, sizes: dict) -> dict:
    """Write `data` row by row with a commit after each, then read it back from fresh opens."""
    seqs, rows = sizes["seqs"], sizes["rows"]
    chunks_per_row = data.shape[0]
    start = counter.read()
    t = time.perf_counter()
    backend.create(data.shape, sizes)
    create_s = time.perf_counter() - t
    after_create = counter.read()
    write_s, commit_s, row_objects, commit_objects = 0.0, [], [], []
    for i in range(rows):
        before = counter.read()
        t = time.perf_counter()
        backend.write_row(i, seqs, data[:, i * seqs : (i + 1) * seqs])
        mid = time.perf_counter()
        written = counter.read()
        backend.commit((i + 1) * seqs)
        end = time.perf_counter()
        write_s += end - t
        commit_s.append(end - mid)
        row_objects.append(counter.delta(written, before))
        commit_objects.append(counter.delta(counter.read(), written))
    total = counter.delta(counter.read(), after_create)
    raw_mb = data.nbytes / 1e6
    reads, open_s = [], []
    for _ in range(sizes["read_rounds"]):
        before = counter.read()
        t = time.perf_counter()
        array, committed = backend.open_reader()
        open_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        back = array[:, :committed]
        reads.append(time.perf_counter() - t)
        read_counts = counter.delta(counter.read(), before)
        if not np.array_equal(back, data):
            raise LensCacheError(f"{backend.name}: read back differs from what was written")
    key = "puts" if counter.server is not None else "files"
    out = {
        "create_seconds": round(create_s, 3),
        "layout_objects": counter.delta(after_create, start),
        "write_seconds": round(write_s, 3),
        "write_MB_per_s_raw": round(raw_mb / write_s, 1),
        "commit_ms_median": round(1e3 * statistics.median(commit_s), 1),
        "commit_ms_max": round(1e3 * max(commit_s), 1),
        "chunk_objects_per_chunk": round(sum(r[key] for r in row_objects) / (rows * chunks_per_row), 2),
        "objects_per_commit": round(sum(c[key] for c in commit_objects) / rows, 2),
        "MB_written": round(total["bytes"] / 1e6, 2),
        "open_ms_median": round(1e3 * statistics.median(open_s), 1),
        "read_seconds_median": round(statistics.median(reads), 3),
        "read_MB_per_s_raw": round(raw_mb / statistics.median(reads), 1),
    }
    if counter.server is not None:
        out["requests_per_commit"] = round(sum(c["requests"] for c in commit_objects) / rows, 2)
        out["requests_per_read_of_all"] = read_counts["requests"]
    return out


def check(name: str, fn: Callable[[], object]) -> dict:
    """Run one semantics check: its outcome, or what failed."""
    try:
        return {"ok": True, "result": fn()}
    except Exception as exc:  # an evaluation records failures instead of stopping
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def semantics(server, sizes: dict) -> dict:
    """icechunk's guarantees, each exercised on the S3 server (small arrays)."""
    ic = import_icechunk()
    # chunks of 16 KiB: above icechunk's inlining threshold (chunks under 512 bytes go into the manifest)
    small = {**sizes, "pos": 64, "d": 64, "seqs": 2}
    shape = (1, 8, small["pos"], small["d"])
    # random values (that compress badly): chunks stay above icechunk's inlining threshold when compressed
    rng = np.random.default_rng(1)
    row, row2 = (rng.integers(1, 60000, size=shape[:1] + (2,) + shape[2:], dtype=np.uint16) for _ in range(2))

    def holds(array) -> list[str]:
        """For each of rows 0-1 and 2-3: 'a' (holds `row`), 'b' (holds `row2`), 'empty' or 'other'."""
        out = []
        for k in (0, 2):
            got = array[:, k : k + 2]
            out.append(next((n for n, v in (("a", row), ("b", row2)) if np.array_equal(got, v)), None)
                       or ("empty" if not got.any() else "other"))  # fmt: skip
        return out

    counter = iter(range(1000))

    def fresh():
        prefix = f"semantics/{next(counter)}"
        storage = ic.s3_storage(bucket=BUCKET, prefix=prefix, region=REGION,
                                endpoint_url=server.endpoint, allow_http=True, force_path_style=True,
                                access_key_id=KEY[0], secret_access_key=KEY[1])  # fmt: skip
        repo = ic.Repository.create(storage)
        s = repo.writable_session("main")
        create_array(zarr.group(store=s.store), shape, small)
        s.commit("layout")
        return repo, prefix

    def arr(session, mode="r"):
        return zarr.open_group(store=session.store, mode=mode)["resid"]

    def uncommitted_invisible():
        repo, _ = fresh()
        w = repo.writable_session("main")
        arr(w, "r+")[:, 0:2] = row
        reader = repo.readonly_session("main")
        seen_before = int(arr(reader)[:, 0:2].max())
        w.commit("row 0")
        return {
            "reader_sees_before_commit": seen_before,
            "after": int(arr(repo.readonly_session("main"))[:, 0:2].max()),
        }

    def snapshot_isolation():
        repo, _ = fresh()
        reader = repo.readonly_session("main")  # opened before the commit
        w = repo.writable_session("main")
        arr(w, "r+")[:, 0:2] = row
        w.commit("row 0")
        return {"old_reader_sees": int(arr(reader)[:, 0:2].max()), "new_reader_sees": int(arr(repo.readonly_session("main"))[:, 0:2].max())}  # fmt: skip

    def two_writers(same_chunk: bool):
        repo, _ = fresh()
        a, b = repo.writable_session("main"), repo.writable_session("main")
        arr(a, "r+")[:, 0:2] = row
        arr(b, "r+")[:, (0 if same_chunk else 2) : (2 if same_chunk else 4)] = row2
        a.commit("writer a")
        try:
            b.commit("writer b")
            return {"second_commit": "accepted without rebase"}
        except ic.ConflictError as exc:
            first = f"ConflictError: {str(exc).splitlines()[0][:120]}"
        try:
            b.rebase(ic.BasicConflictSolver(on_chunk_conflict=ic.VersionSelection.Fail))
            b.commit("writer b, rebased")
            values = holds(arr(repo.readonly_session("main")))
            return {"second_commit": first, "after_rebase": "committed", "rows_0_1_and_2_3": values}
        except ic.RebaseFailedError as exc:
            return {
                "second_commit": first,
                "after_rebase": f"RebaseFailedError: {str(exc).splitlines()[0][:120]}",
            }

    def fork_merge():
        repo, _ = fresh()
        session = repo.writable_session("main")
        forks = [pickle.loads(pickle.dumps(session.fork())) for _ in range(2)]  # as sent to two workers
        for k, fork in enumerate(forks):
            arr(fork, "r+")[:, 2 * k : 2 * k + 2] = (row, row2)[k]
        session.merge(*[pickle.loads(pickle.dumps(f)) for f in forks])  # sent back to the coordinator
        session.commit("two workers, one commit")
        return {"snapshots_incl_initial_and_layout": len(list(repo.ancestry(branch="main"))), "rows_0_1_and_2_3": holds(arr(repo.readonly_session("main")))}  # fmt: skip

    def time_travel():
        repo, _ = fresh()
        first = repo.lookup_branch("main")
        w = repo.writable_session("main")
        arr(w, "r+")[:, 0:2] = row
        w.commit("row 0")
        old = int(arr(repo.readonly_session(snapshot_id=first))[:, 0:2].max())
        return {"snapshots": len(list(repo.ancestry(branch="main"))), "old_snapshot_row_0": old}

    def killed_writer():
        repo, prefix = fresh()
        objects = len(server_objects(server, prefix))
        w = repo.writable_session("main")
        arr(w, "r+")[:, 0:2] = row
        del w  # dropped without a commit, as a killed process leaves it
        after = len(server_objects(server, prefix))
        reader = repo.readonly_session("main")
        return {"orphan_objects_left": after - objects, "reader_sees": int(arr(reader)[:, 0:2].max())}

    return {
        "uncommitted_chunks_invisible": check("uncommitted", uncommitted_invisible),
        "snapshot_isolation": check("snapshot", snapshot_isolation),
        "two_writers_disjoint_chunks": check("disjoint", lambda: two_writers(False)),
        "two_writers_same_chunk": check("same", lambda: two_writers(True)),
        "fork_merge_one_commit": check("fork", fork_merge),
        "time_travel": check("travel", time_travel),
        "killed_writer": check("killed", killed_writer),
    }


def server_objects(server, prefix: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=server.endpoint, region_name=REGION, aws_access_key_id=KEY[0],
                      aws_secret_access_key=KEY[1])  # fmt: skip
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=None, help="take the chunk values from this store's resid (bf16)")
    ap.add_argument("--quick", action="store_true", help="tiny arrays: seconds")
    ap.add_argument("--out", default=None, help="JSON output (default: print only)")
    args = ap.parse_args(argv)
    ic = import_icechunk()
    sizes = QUICK if args.quick else FULL
    data = activations(sizes, None if args.quick else args.store)
    result: dict = {
        "evaluation": "icechunk",
        "machine": describe_machine(),
        "icechunk": ic.__version__,
        "zarr": zarr.__version__,
        "sizes": sizes,
        "chunk_MB_raw": round(data[0, : sizes["seqs"]].nbytes / 1e6, 2),
        "data": args.store or "synthetic bfloat16 activations",
        "results": {},
    }
    work = scratch_dir("eval-icechunk")
    with loopback_s3(BUCKET) as server, server.active():
        for backend_cls in (Plain, Ice):
            for place in ("s3", "local"):
                name = f"{backend_cls.name}-{place}"
                print(f"{name} ...", flush=True)
                if place == "s3":
                    prefix = backend_cls.name
                    if backend_cls is Plain:
                        backend = Plain(url=f"s3://{BUCKET}/{prefix}")
                    else:
                        backend = Ice(prefix=prefix, server=server)
                    counter = Counter(server=server)
                else:
                    root = work / name
                    backend = backend_cls(root=root)
                    counter = Counter(root=root)
                result["results"][name] = check(name, lambda b=backend, c=counter: measure(b, c, data, sizes))
                print(json.dumps(result["results"][name]), flush=True)
        print("semantics ...", flush=True)
        result["semantics"] = semantics(server, sizes)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
