"""Multi-worker builds on Dask distributed: ``lenscache build --workers N`` (a LocalCluster of N
worker processes that this process starts) or ``--scheduler ADDRESS`` (the workers of an existing cluster).

The driver (the process that runs `build_store`) holds the writer lock and lays out the store exactly
as a one-process build does: the same metadata, head check, tokenizer and token ids. It then cuts the
sequences not yet committed into tasks of one row each (`seqs_per_chunk` sequences, the row chunk of the
activation arrays) and submits them with ``client.submit``. A task runs on a worker: it loads the model
once per worker process (kept for the worker's later tasks), runs `build_rows`, the one-process build's
own forward, encoding and write code, and writes its row's chunks into the store, which it opens
itself by URL. Workers on one host split its cores (``torch.set_num_threads``); with several GPUs,
each takes one by its place among the host's workers.

Arrays whose chunks hold more than one row (log-sum-exp and top-k, about 0.4 % of a SmolLM2 row's
bytes) cannot be written by the tasks, since two tasks would then write one chunk: each task returns its
rows of them and the driver writes them, in order, then commits. The committed count moves past a row
only when every row before it is done, so a reader never sees a row past one that is not finished, and
rows written past the count are invisible (readers stop at it) and rewritten by ``--resume``: a driver
killed mid-build resumes like a one-process build.

A worker that dies is Dask's to handle: the scheduler reruns its task on another worker (at most
``distributed.scheduler.allowed-failures`` times, then the build fails with the rows committed so far).
Every run of a row's task writes the same bytes, so a rerun that replaces a dead task's chunks, or a
task that outlived its driver, cannot make a store differ; and a task stops before writing when its
driver no longer holds the writer lock (it died, or another writer took over).

Fault injection for tests: with ``LENSCACHE_WORKER_CRASH_AT=ROW`` in the driver's environment (it travels
with each task, so a cluster's workers need not be started with it), the worker that runs the task of
the row starting at sequence ROW SIGKILLs itself once that row's chunks are written, before it returns;
``ROW@PATH`` does so once: the dying worker creates PATH first, and one that finds PATH there carries on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import CancelledError
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lenscache import __version__, location
from lenscache.encoding import get_preset
from lenscache.errors import DataError, LensCacheError, ModelError, StoreLocked
from lenscache.lock import read_lock
from lenscache.schema import RESID, RESID_SCALE, StoreMeta

from .chunk_writer import available_cores
from .faults import CrashPointError
from .model import ModelSpec
from .writer import StoreWriter, plan_arrays

if TYPE_CHECKING:
    from lenscache.encoding import CodecPreset
    from lenscache.lock import WriterLock

    from .build import BuildConfig, BuildSummary

CONNECT_TIMEOUT_S = 10.0  # a scheduler (or a cluster's first worker) that takes longer counts as absent
PRELOAD_POLL_S = 0.25
WORKER_CRASH_ENV = "LENSCACHE_WORKER_CRASH_AT"
INSTALL_HINT = "pip install 'lenscache[distributed]'"
SEQ_AXIS_1 = (RESID, RESID_SCALE)  # arrays whose sequence axis is 1 (0 for the others)


class ClusterError(LensCacheError):
    """The Dask cluster cannot be reached or started, or lost the build's work."""


def require_distributed() -> Any:
    """The `distributed` package, or a ClusterError saying how to install it."""
    try:
        import distributed
    except ImportError:
        raise ClusterError(
            f"multi-worker builds (--workers, --scheduler) need Dask distributed: {INSTALL_HINT}"
        ) from None
    return distributed


def check_distributed(cfg: BuildConfig) -> None:
    """The checks of a distributed build that need no cluster: the package, the address, the store."""
    require_distributed()
    if cfg.scheduler is not None:
        check_address(cfg.scheduler)
    worker_crash_point()
    if str(cfg.out).startswith("memory://"):
        raise DataError(
            f"out (--out) {cfg.out}: a memory:// store lives in one process, and Dask workers write from "
            "their own; use a directory or an object store"
        )


def check_address(address: str) -> None:
    """Refuse a scheduler address Dask cannot parse (tcp://HOST:PORT and the like)."""
    from distributed.comm.addressing import parse_address, parse_host_port

    where = f"scheduler (--scheduler) {address!r}"
    if not address or address != address.strip():
        raise DataError(f"{where} is not an address like tcp://HOST:PORT")
    try:
        scheme, loc = parse_address(address)
        if scheme in ("tcp", "tls"):
            parse_host_port(loc)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{where} is not an address like tcp://HOST:PORT ({exc})") from None


def worker_crash_point() -> str | None:
    """The value of LENSCACHE_WORKER_CRASH_AT (see the module docstring), checked; None when unset."""
    value = os.environ.get(WORKER_CRASH_ENV, "").strip()
    if not value:
        return None
    row, sep, once = value.partition("@")
    if not row.isdigit() or (sep and not once):
        raise CrashPointError(
            f"{WORKER_CRASH_ENV}={value!r}: give the first sequence of a row, as in '8', or '8@PATH' to kill "
            "one worker only"
        )
    return value


def probe_scheduler(address: str, timeout: float | None = None) -> dict:
    """The identity of the Dask scheduler at `address`, asked for with one deadline.

    `distributed.Client` bounds the TCP connect by its timeout but waits without one for the
    handshake, so a port that accepts and never answers (another protocol's server, a stopped
    process) would hang it: this asks first, and gives up after `timeout` seconds (default
    `CONNECT_TIMEOUT_S`) whatever the step.
    """
    from distributed.comm import connect as comm_connect

    timeout = CONNECT_TIMEOUT_S if timeout is None else timeout

    async def ask() -> dict:
        comm = await asyncio.wait_for(comm_connect(address, timeout=timeout), timeout)
        try:
            await comm.write({"op": "identity"})
            return await asyncio.wait_for(comm.read(), timeout)
        finally:
            comm.abort()

    try:
        reply = asyncio.run(ask())
    except (asyncio.TimeoutError, TimeoutError):
        reason = f"no answer within {timeout:g} s"
    except Exception as exc:  # refused, unreachable, or a server that speaks something else
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    else:
        if isinstance(reply, dict) and reply.get("type") == "Scheduler":
            return reply
        kind = reply.get("type") if isinstance(reply, dict) else None
        reason = f"it is a Dask {kind}, not a scheduler" if kind else "it did not answer as a Dask scheduler"
    raise ClusterError(f"no Dask scheduler at {address} ({reason}); nothing was written")


# ---- the driver ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """What every task of one build needs besides its row (small: it travels with each task)."""

    url: str  # the store, as the workers open it (an absolute path, or the URL)
    model: ModelSpec
    codec: str
    fsync: bool
    lock_token: str  # the driver's writer lock: a task whose driver no longer holds it writes nothing
    expect: dict[str, Any]  # what the worker's model must match (weights hash, dtype, device type)
    slots: dict[str, tuple[int, int]]  # worker name -> (its place among its host's workers, their number)
    keep_freed_memory: bool = False  # workers started for this build only: see cache/host_memory.py
    crash_at: str | None = None  # LENSCACHE_WORKER_CRASH_AT of the driver (tests)


class Cluster:
    """A client of the Dask cluster that builds the rows, and the LocalCluster when this process started it."""

    def __init__(self, client: Any, address: str, local: Any | None):
        self.client, self.address, self.local = client, address, local
        self._preloads: dict[str, Any] = {}  # worker address -> the future of its preload

    def preload(self, model: ModelSpec) -> None:
        """Have each worker load its model copy now, while this process loads its own and lays out the store."""
        slots = self.slots()
        for address in self.client.scheduler_info()["workers"]:
            self._preloads[address] = self.client.submit(
                preload_task, model, slots, self.local is not None, workers=[address], allow_other_workers=False,
                pure=False, key=f"lenscache-preload-{uuid.uuid4().hex}",
            )  # fmt: skip

    def await_preloads(self) -> None:
        """Wait until every worker that is still there has loaded its model (or failed to: its first task
        then says why). Rows submitted before would queue on the workers loaded first and leave a
        worker that is still loading with fewer of them: 3 rows against 1 in a 4-row SmolLM2 build."""
        while True:
            waiting = {w for w, f in self._preloads.items() if f.status == "pending"}
            # a worker that died while loading comes back under another address: its preload never runs
            if not waiting & set(self.client.scheduler_info()["workers"]):
                return
            time.sleep(PRELOAD_POLL_S)

    def close(self) -> None:
        self._cancel(list(self._preloads.values()))  # a worker that has not started loading need not
        self.client.close()
        if self.local is not None:
            self.local.close()

    def _cancel(self, futures: list[Any]) -> None:
        try:
            self.client.cancel(futures)
        except Exception:  # a scheduler already gone: nothing left to cancel
            pass

    def _load_seconds(self) -> list[float]:
        """The preloads' seconds, for those that are done (a failed one: its task fails too, and says why)."""
        return [f.result() for f in self._preloads.values() if f.status == "finished"]

    def slots(self) -> dict[str, tuple[int, int]]:
        """Each worker's place among the workers of its host, by worker name (stable across restarts)."""
        by_host: dict[str, list[str]] = {}
        for info in self.client.scheduler_info()["workers"].values():
            by_host.setdefault(info["host"], []).append(str(info["name"]))
        slots: dict[str, tuple[int, int]] = {}
        for names in by_host.values():
            for i, name in enumerate(sorted(names, key=_name_order)):
                slots[name] = (i, len(names))
        return slots

    def run(
        self, cfg: BuildConfig, writer: StoreWriter, preset: CodecPreset, tokens: np.ndarray, start: int,
        lock: WriterLock,
    ) -> BuildSummary:  # fmt: skip
        """Build sequences [start, n) on the workers and commit them in order (the driver's part)."""
        from .build import _postfix, _progress, _summary

        meta = writer.meta
        n_seq, s = meta.n_sequences, meta.build.seqs_per_chunk
        identity = meta.build.identity
        slots = self.slots()
        spec = TaskSpec(
            url=worker_url(cfg.out),
            model=cfg.model,
            codec=cfg.codec,
            fsync=cfg.fsync,
            lock_token=lock.record.token,
            expect={k: identity.get(k) for k in ("weights_hash", "compute_dtype", "device_type")},
            slots=slots,
            keep_freed_memory=self.local is not None,
            crash_at=worker_crash_point(),
        )
        shared = shared_arrays(meta, preset)
        # rows in flight or done but not yet committed: bounds what the driver holds and what a kill redoes
        window = max(2, 2 * len(slots))
        starts = iter(range(start, n_seq, s))
        futures: dict[str, Any] = {}
        done: dict[int, dict] = {}
        written_before = writer.counter.bytes_written
        stats = {"tasks": 0, "bytes_written": 0, "raw_bytes": 0, "per_worker": {}}
        bar = _progress(cfg, n_seq, start, meta.seq_len)
        distributed = require_distributed()
        pending = distributed.as_completed(loop=self.client.loop)

        def top_up() -> None:
            while len(futures) + len(done) < window and (a := next(starts, None)) is not None:
                b = min(a + s, n_seq)
                future = self.client.submit(build_task, spec, a, tokens[a:b], shared, pure=False,
                                            key=f"lenscache-build-{spec.lock_token[:12]}-{a}")  # fmt: skip
                futures[future.key] = future
                pending.add(future)

        self.await_preloads()
        t0 = time.perf_counter()
        committed = start
        try:
            top_up()
            for future in pending:
                result = self._result(future, s, n_seq, cfg.out)
                del futures[future.key]
                future.release()
                done[result["row_start"]] = result
                _tally(stats, result)
                while committed in done:
                    r = done.pop(committed)
                    if r["arrays"]:
                        writer.write_rows(committed, r["arrays"])
                    writer.commit(r["row_end"])
                    if bar is not None:
                        bar.update(r["row_end"] - committed)
                        written = writer.counter.bytes_written - written_before + stats["bytes_written"]
                        _postfix(bar, r["row_end"] - start, meta.seq_len, t0, written, stats["raw_bytes"])
                    committed = r["row_end"]
                top_up()
        except BaseException:
            # queued tasks go; running ones finish their row (they cannot be stopped), which is harmless:
            # it is past the committed count, and its bytes are the ones a resume writes
            self._cancel(list(futures.values()))
            raise
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - t0
        written = writer.counter.bytes_written - written_before + stats["bytes_written"]
        summary = _summary(cfg, writer, n_seq, (committed - start) * meta.seq_len, seconds, written,
                           stats["raw_bytes"], start)  # fmt: skip
        summary.workers = {"scheduler": self.address, "local": self.local is not None, "workers": len(slots),
                           "preload_seconds": self._load_seconds(), **stats}  # fmt: skip
        return summary

    def _result(self, future: Any, s: int, n_seq: int, out: str) -> dict:
        """A task's result; its failure as the error it raised, or as a ClusterError saying what happened."""
        from distributed.scheduler import KilledWorker

        rows = _rows_of(future.key, s, n_seq)
        try:
            return future.result()
        except LensCacheError:
            raise
        except KilledWorker as exc:
            raise ClusterError(
                f"Dask workers kept dying while building sequences {rows} of {out} ({exc}); the store keeps "
                "its committed rows: rerun with --resume"
            ) from None
        except CancelledError as exc:  # the scheduler went away, or cancelled the task itself
            raise ClusterError(
                f"lost the Dask cluster at {self.address} while building sequences {rows} of {out} "
                f"({type(exc).__name__}: {exc}); the store keeps its committed rows: rerun with --resume"
            ) from None
        except Exception as exc:
            raise ClusterError(f"a Dask worker failed building sequences {rows} of {out}: {exc!r}") from exc


def _name_order(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


def _rows_of(key: str, s: int, n_seq: int) -> str:
    a = int(key.rsplit("-", 1)[1])
    return f"{a}..{min(a + s, n_seq) - 1}"


def _tally(stats: dict, result: dict) -> None:
    stats["tasks"] += 1
    stats["bytes_written"] += result["bytes_written"]
    stats["raw_bytes"] += result["raw_bytes"]
    mine = stats["per_worker"].setdefault(
        str(result["worker"]), {"tasks": 0, "seconds": 0.0, "load_seconds": 0.0}
    )
    mine["tasks"] += 1
    mine["seconds"] += result["seconds"]
    mine["load_seconds"] += result["load_seconds"]
    mine["threads"] = result["threads"]
    mine["device"] = result["device"]


def worker_url(out: str) -> str:
    """The store as a worker opens it: a local path made absolute (workers need not share the cwd)."""
    return str(out) if location.is_url(out) else str(location.local_root(out))


def shared_arrays(meta: StoreMeta, preset: CodecPreset) -> tuple[str, ...]:
    """The per-sequence arrays whose chunks span more than one row: the driver writes them."""
    s = meta.build.seqs_per_chunk
    return tuple(p.name for p in plan_arrays(meta, preset) if p.chunks[1 if p.name in SEQ_AXIS_1 else 0] > s)


@contextmanager
def connect(cfg: BuildConfig) -> Iterator[Cluster]:
    """A client of the cluster `cfg` names (started here for ``workers``), with at least one worker; closed after."""
    distributed = require_distributed()
    local = None
    if cfg.scheduler is not None:
        address = cfg.scheduler
        probe_scheduler(address)
        try:
            client = distributed.Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
        except Exception as exc:
            raise ClusterError(
                f"cannot connect to the Dask scheduler at {address} ({exc}); nothing was written"
            ) from None
    else:
        try:
            # one thread per worker: a task uses the worker's share of the cores through torch instead
            # no dashboard; its HTTP server (health, metrics) on any free port, not 8787 (maybe taken)
            local = distributed.LocalCluster(
                n_workers=cfg.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                scheduler_kwargs={"dashboard_address": ":0"}, memory_limit=0, silence_logs=logging.ERROR,
            )  # fmt: skip
            client = distributed.Client(local, set_as_default=False)
        except Exception as exc:
            if local is not None:
                local.close()
            raise ClusterError(f"cannot start a local Dask cluster of {cfg.workers} workers: {exc}") from exc
        address = local.scheduler_address
    try:
        try:
            client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
        except Exception:
            raise ClusterError(
                f"the Dask cluster at {address} has no worker (none joined within {CONNECT_TIMEOUT_S:g} s); "
                "nothing was written"
            ) from None
        _check_workers(client, address)
        cluster = Cluster(client, address, local)
    except BaseException:
        client.close()
        if local is not None:
            local.close()
        raise
    try:
        yield cluster
    finally:
        cluster.close()


def _check_workers(client: Any, address: str) -> None:
    """Every worker runs this lenscache version (a task pickles its functions by name)."""
    try:
        versions = client.run(_worker_version)
    except Exception as exc:
        raise ClusterError(
            f"the workers of the Dask cluster at {address} cannot run lenscache ({type(exc).__name__}: {exc}); "
            "install the same lenscache where they run"
        ) from None
    other = {w: v for w, v in versions.items() if v != __version__}
    if other:
        raise ClusterError(
            f"the workers of the Dask cluster at {address} run other lenscache versions than this one "
            f"({__version__}): {other}"
        )


def _worker_version() -> str:
    return __version__


# ---- the workers ---------------------------------------------------------------------------------

_models: dict[ModelSpec, tuple[Any, Any]] = {}  # this worker process's model: (LoadedModel, taps)
_writers: dict[tuple[str, str], StoreWriter] = {}  # (url, lock token) -> this build's open store
_one_task = threading.Lock()  # a worker with several threads: tasks share one model and its hooks


def _worker_slot(slots: dict[str, tuple[int, int]]) -> tuple[str, int, int]:
    """(name, place among its host's workers, their number) of the worker running this task."""
    try:
        from distributed import get_worker

        name = str(get_worker().name)
    except (ImportError, ValueError):  # not in a worker (a direct call)
        return "local", 0, 1
    # a worker that joined after the build started (a restart keeps its name) counts as one more
    fallback = (len(slots), max([count for _, count in slots.values()] or [1]) + 1)
    slot, count = slots.get(name, fallback)
    return name, slot, count


def _device_for(spec: ModelSpec, slot: int) -> ModelSpec:
    """One GPU per worker where a host has several (the spec's own cuda:N is kept)."""
    import torch

    if spec.device in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return replace(spec, device=f"cuda:{slot % torch.cuda.device_count()}")
    return spec


def _model(spec: ModelSpec) -> tuple[Any, Any, float]:
    """This process's copy of the model (loaded on first use, kept for later tasks) and the load's seconds."""
    from .arch import find_taps
    from .model import load_model

    if spec in _models:
        loaded, taps = _models[spec]
        return loaded, taps, 0.0
    _models.clear()  # another build's model goes before this one loads
    t0 = time.perf_counter()
    loaded = load_model(spec)
    taps = find_taps(loaded.model)
    _models[spec] = (loaded, taps)
    return loaded, taps, time.perf_counter() - t0


def _check_model(loaded: Any, spec: ModelSpec, expect: dict[str, Any]) -> None:
    """Refuse a worker whose model is not the store's (another revision, dtype or kind of device)."""
    got = {
        "weights_hash": loaded.provenance["weights_hash"],
        "compute_dtype": str(loaded.dtype).removeprefix("torch."),
        "device_type": loaded.device.type,
    }
    differs = sorted(k for k in expect if expect[k] != got[k])
    if differs:
        detail = "; ".join(f"{k}: store has {expect[k]!r}, this worker has {got[k]!r}" for k in differs)
        raise ModelError(f"the model {spec.name!r} this worker loaded differs from the store's ({detail})")


def _prepare(
    model: ModelSpec, slots: dict[str, tuple[int, int]], keep_memory: bool
) -> tuple[str, int, ModelSpec]:
    """Set this worker up for a task (its share of the cores, its GPU): (name, torch threads, model spec)."""
    import torch

    from .host_memory import keep_freed_memory

    name, slot, count = _worker_slot(slots)
    if keep_memory:
        keep_freed_memory()
    threads = max(1, available_cores() // count)
    torch.set_num_threads(threads)
    return name, threads, _device_for(model, slot)


def preload_task(model: ModelSpec, slots: dict[str, tuple[int, int]], keep_memory: bool) -> float:
    """On a worker, before the build's tasks: load the model copy its tasks use; the load's seconds."""
    with _one_task:
        _, _, spec = _prepare(model, slots, keep_memory)
        return _model(spec)[2]


def _writer(spec: TaskSpec) -> StoreWriter:
    key = (spec.url, spec.lock_token)
    if key not in _writers:
        _writers.clear()
        writer = StoreWriter.reopen(spec.url)
        writer.fsync = spec.fsync
        _writers[key] = writer
    return _writers[key]


def _check_lock(spec: TaskSpec) -> None:
    """Write only while the driver that sent this task holds the store's writer lock."""
    rec = read_lock(spec.url)
    if rec is None or rec.token != spec.lock_token or rec.running() is False:
        raise StoreLocked(
            f"{spec.url}: the build that sent this task no longer holds the store's writer lock; "
            "the task stops without writing"
        )


def build_task(spec: TaskSpec, row_start: int, tokens: np.ndarray, shared: tuple[str, ...]) -> dict:
    """On a worker: build sequences [row_start, row_start + len(tokens)), write their chunks except those
    of the `shared` arrays, and return those rows of the `shared` arrays with the task's figures."""
    from .build import build_rows
    from .staging import RowEncoder

    with _one_task:
        t0 = time.perf_counter()
        name, threads, model_spec = _prepare(spec.model, spec.slots, spec.keep_freed_memory)
        loaded, taps, load_seconds = _model(model_spec)
        _check_model(loaded, model_spec, spec.expect)
        writer = _writer(spec)
        written_before = writer.counter.bytes_written
        kept: dict[str, np.ndarray] = {}

        def store_row(a: int, n: int, arrays: dict[str, np.ndarray]) -> None:
            _check_lock(spec)
            writer.write_rows(a, {k: v for k, v in arrays.items() if k not in shared})
            for k in shared:
                if k in arrays:
                    kept[k] = np.concatenate([kept[k], arrays[k]]) if k in kept else arrays[k]

        meta = writer.meta
        encoder = RowEncoder(meta, get_preset(spec.codec))
        built, raw = build_rows(spec.url, loaded, taps, meta, encoder, tokens, row_start, store_row)
        if spec.crash_at is not None:
            _crash_point(spec.crash_at, row_start)
        writer.sync()  # the rows are on the device before the driver's commit names them
        return {
            "row_start": row_start,
            "row_end": row_start + built,
            "arrays": kept,
            "raw_bytes": raw,
            "bytes_written": writer.counter.bytes_written - written_before,
            "seconds": time.perf_counter() - t0,
            "load_seconds": load_seconds,
            "worker": name,
            "threads": threads,
            "device": str(loaded.device),
        }


def _crash_point(value: str, row_start: int) -> None:
    """The worker fault of the module docstring (LENSCACHE_WORKER_CRASH_AT, checked by the driver)."""
    row, _, once = value.partition("@")
    if int(row) != row_start:
        return
    if once:
        try:
            Path(once).touch(exist_ok=False)
        except FileExistsError:
            return
    os.write(2, f"lenscache: {WORKER_CRASH_ENV}: killing this worker (SIGKILL) at row {row_start}\n".encode())
    os.kill(os.getpid(), signal.SIGKILL)
