"""Closed-form affine lenses from streamed second moments (Din et al. 2023, arXiv 2303.09435).

For every layer boundary l, an affine map ``y ≈ A x + c`` from the layer's residual state x to the
last boundary y (the last block's output before the final norm, exact) is fitted by ridge least
squares. Only sufficient statistics are needed: per chunk-aligned block of sequences, the means
and centred cross-products Σ(x-μx)(x-μx)ᵀ, Σ(x-μx)(y-μy)ᵀ and Σ|y-μy|² are computed (float32
matmuls on centred data), and blocks are merged in float64 with the pairwise update of Chan et al.,
which keeps the massive outlier dimensions of these models from cancelling precision away. The
map over blocks and the tree reduction run on Dask (a `dask.bag` fold): the threaded scheduler by
default, or whatever scheduler is active, a distributed cluster included. Memory is one block per
worker plus (d+1)² numbers per layer per partial sum; the data are never materialised.

The ridge strength is chosen per layer from a small relative grid by the squared error on a
validation slice of the train split (the last 10% of its sequences), computed from that slice's
moments alone; the lens is then solved once more on all train moments. The result is stored as a
lens of kind ``affine`` in the tuned-lens parametrisation ``h + (W h + b)``: W = A - I, b = c.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass

import dask
import dask.bag
import numpy as np
import torch
from tqdm.auto import tqdm
from tqdm.dask import TqdmCallback

from lenscache.errors import LensCacheError
from lenscache.reader import Store, open_store

from .lens import Lens
from .stream import chunk_aligned_blocks, split_sequences

RIDGE_GRID = (1e-8, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # relative to the mean variance of x


@dataclass
class Moments:
    """Centred sufficient statistics of (x_l, y) pairs for every fitted layer."""

    n: int
    mx: np.ndarray  # (L, d) means of x
    my: np.ndarray  # (d,) mean of y
    cxx: np.ndarray  # (L, d, d) Σ (x-μx)(x-μx)ᵀ
    cxy: np.ndarray  # (L, d, d) Σ (x-μx)(y-μy)ᵀ
    cyy: float  # Σ |y-μy|²

    def merge(self, other: Moments | None) -> Moments:
        """Chan et al.'s pairwise update: exact, and stable when means are large."""
        if other is None or other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        dx = other.mx - self.mx  # (L, d)
        dy = other.my - self.my  # (d,)
        w = self.n * other.n / n
        return Moments(
            n=n,
            mx=self.mx + dx * (other.n / n),
            my=self.my + dy * (other.n / n),
            cxx=self.cxx + other.cxx + w * np.einsum("li,lj->lij", dx, dx),
            cxy=self.cxy + other.cxy + w * np.einsum("li,j->lij", dx, dy),
            cyy=self.cyy + other.cyy + w * float(dy @ dy),
        )


def moments_of(xs: list[np.ndarray], y: np.ndarray) -> Moments:
    """Moments of one block: xs[l] and y are (N, d) float32 arrays of the same tokens."""
    y64_mean = y.mean(0, dtype=np.float64)
    yc = torch.from_numpy(y - y64_mean.astype(np.float32))
    mx, cxx, cxy = [], [], []
    for x in xs:
        mean = x.mean(0, dtype=np.float64)
        xc = torch.from_numpy(x - mean.astype(np.float32))
        mx.append(mean)
        cxx.append((xc.T @ xc).double().numpy())
        cxy.append((xc.T @ yc).double().numpy())
    return Moments(
        n=y.shape[0],
        mx=np.stack(mx),
        my=y64_mean,
        cxx=np.stack(cxx),
        cxy=np.stack(cxy),
        cyy=float((yc.double() ** 2).sum()),
    )


@functools.lru_cache(maxsize=8)
def _open(url: str) -> Store:
    # one open store per worker process and URL; tasks carry only the URL, so they pickle
    return open_store(url)


def block_moments(url: str, start: int, stop: int, layers: tuple[int, ...]) -> Moments:
    """Read one block of sequences from the store and reduce it to moments (a Dask task)."""
    store = _open(url)
    seqs = range(start, stop)
    d = store.d_model
    y = store.final_resid(seqs).reshape(-1, d)
    xs = [store.resid(layer, seqs).reshape(-1, d) for layer in layers]
    return moments_of(xs, y)


def _block_task(block: tuple[int, int], url: str, layers: tuple[int, ...]) -> Moments:
    return block_moments(url, block[0], block[1], layers)


def _merge(a: Moments, b: Moments) -> Moments:
    return a.merge(b)


def _fold(store: Store, seqs: range, layers: list[int], partitions: int) -> dask.delayed:
    blocks = [(b.start, b.stop) for b in chunk_aligned_blocks(seqs, store.meta.build.seqs_per_chunk)]
    if not blocks:
        return None
    bag = dask.bag.from_sequence(blocks, npartitions=min(len(blocks), partitions))
    per_block = bag.map(_block_task, url=store.url, layers=tuple(layers))
    return per_block.fold(_merge, _merge)


def stream_moments(
    store: Store,
    seqs: range,
    layers: list[int],
    scheduler: str | None = None,
    partitions: int | None = None,
    progress: str | None = None,
) -> Moments:
    """Moments over `seqs`, map-reduced with Dask (threads unless another scheduler is active).

    `progress`: a label for a progress bar over the Dask tasks (local schedulers; a distributed
    cluster has its own dashboard)."""
    scheduler = scheduler or dask.config.get("scheduler", None) or "threads"
    bar = TqdmCallback(desc=progress, unit="task") if progress else contextlib.nullcontext()
    with bar:
        (result,) = dask.compute(_fold(store, seqs, layers, partitions or 4), scheduler=scheduler)
    return result


def solve(m: Moments, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """(A, c) per layer with y ≈ A x + c, ridge relative to each layer's mean variance of x."""
    d = m.mx.shape[1]
    a_all, c_all = [], []
    for i in range(m.mx.shape[0]):
        cxx = torch.from_numpy(m.cxx[i])
        scale = float(torch.trace(cxx)) / d
        reg = cxx + (ridge * scale + 1e-12) * torch.eye(d, dtype=torch.float64)
        a = torch.linalg.solve(reg, torch.from_numpy(m.cxy[i])).T.numpy()  # (d_y, d_x)
        a_all.append(a)
        c_all.append(m.my - a @ m.mx[i])
    return np.stack(a_all), np.stack(c_all)


def squared_error(m: Moments, a: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Σ |y - A x - c|² over the tokens summarised by `m`, per layer, from moments alone."""
    out = []
    for i in range(a.shape[0]):
        ai = a[i]
        centred = m.cyy - 2 * np.trace(ai @ m.cxy[i]) + np.trace(ai @ m.cxx[i] @ ai.T)
        bias = m.my - ai @ m.mx[i] - c[i]
        out.append(centred + m.n * float(bias @ bias))
    return np.asarray(out)


def fit_affine(
    store: Store,
    layers: list[int] | None = None,
    ridge: float | None = None,
    scheduler: str | None = None,
    partitions: int | None = None,
    held_out_fraction: float = 0.1,
    max_sequences: int | None = None,
    progress: bool = False,
) -> Lens:
    """Fit the closed-form affine lens on the store's train split (`ridge=None`: choose per layer)."""
    meta = store.meta
    if layers is None:
        layers = [b for b in store.layers if b != meta.n_layers]
    for layer in layers:
        store.layer_index(layer)
    train = split_sequences(store.n_sequences, held_out_fraction).train
    if max_sequences is not None:
        train = range(train.start, min(train.stop, train.start + max_sequences))
    if len(train) < 2:
        raise LensCacheError(f"the train split of {store.url} has {len(train)} sequences; need at least 2")
    inner = split_sequences(len(train), held_out_fraction)
    fit_seqs = range(train.start + inner.train.start, train.start + inner.train.stop)
    val_seqs = range(train.start + inner.held_out.start, train.start + inner.held_out.stop)

    started = time.perf_counter()
    fit_m = stream_moments(store, fit_seqs, layers, scheduler, partitions, "affine: moments" if progress else None)
    val_m = stream_moments(
        store, val_seqs, layers, scheduler, partitions, "affine: validation moments" if progress else None
    )
    moments_s = time.perf_counter() - started

    n_layers = len(layers)
    if ridge is None:
        grid = tqdm(RIDGE_GRID, desc="affine: ridge per layer", disable=not progress, leave=False)
        errors = np.stack([squared_error(val_m, *solve(fit_m, r)) for r in grid])  # (grid, L)
        chosen = [RIDGE_GRID[int(k)] for k in errors.argmin(0)]
        val_mse = (errors.min(0) / max(1, val_m.n * meta.d_model)).tolist()
    else:
        chosen = [ridge] * n_layers
        val_mse = None
    full = fit_m.merge(val_m)
    a = np.empty((n_layers, meta.d_model, meta.d_model))
    c = np.empty((n_layers, meta.d_model))
    for r in sorted(set(chosen)):
        sel = [i for i, x in enumerate(chosen) if x == r]
        a_r, c_r = solve(full, r)
        a[sel], c[sel] = a_r[sel], c_r[sel]

    lens = Lens.identity(
        store,
        layers,
        kind="affine",
        method="affine",
        target=f"boundary {meta.n_layers} (last block output, before the final norm)",
        tokens=full.n,
        ridge_per_layer={str(k): v for k, v in zip(layers, chosen, strict=True)},
        validation_mse_per_layer=(
            {str(k): round(v, 6) for k, v in zip(layers, val_mse, strict=True)} if val_mse else None
        ),
        moments_seconds=round(moments_s, 2),
        seconds=round(time.perf_counter() - started, 2),
    )
    with torch.no_grad():
        lens.weight.copy_(torch.from_numpy(a - np.eye(meta.d_model)))
        lens.bias.copy_(torch.from_numpy(c))
    return lens
