"""Writes regions made of whole chunks straight to the store, byte for byte what zarr would store.

A build row covers whole chunks of the residual arrays (31 chunks of 4.7 MB per 4,096 SmolLM2
tokens). Zarr 3.1 writes a multi-chunk region by filling a fresh buffer per chunk with the fill
value, copying the region into it, and running each chunk's codecs in event-loop worker threads
that contend for the GIL: about 0.40 core-seconds per row where blosc itself needs 0.25. Here each
chunk goes from the row buffer to numcodecs' blosc (which releases the GIL) on one thread per core,
gets its crc32c appended as zarr's crc32c codec does, and is handed to the store's own `set`
(atomic for a local store; any fsspec store otherwise).

Only arrays whose codecs are exactly bytes (little-endian) → blosc → crc32c and that are opened to
write every chunk (``write_empty_chunks``, as the build's are), and regions made of whole chunks
inside the array, are written here; `write_whole_chunks` hands everything else back for
zarr to write. tests/test_chunk_writer.py checks the stored bytes against zarr's own.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import google_crc32c
import numpy as np
import zarr
from numcodecs import Blosc
from zarr.codecs import BloscCodec, BloscShuffle, BytesCodec, Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from .faults import fault_point

_SHUFFLE = {BloscShuffle.noshuffle: Blosc.NOSHUFFLE, BloscShuffle.shuffle: Blosc.SHUFFLE,
            BloscShuffle.bitshuffle: Blosc.BITSHUFFLE}  # fmt: skip


@dataclass
class RegionWrite:
    """`block` goes to `array` at `offset` (one start index per dimension)."""

    array: zarr.Array
    offset: tuple[int, ...]
    block: np.ndarray


def available_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def chunk_encoder(array: zarr.Array) -> Callable[[np.ndarray], bytes] | None:
    """The array's codecs as one function of a chunk-shaped block, or None if they are not ours to do."""
    codecs = array.metadata.codecs
    if len(codecs) != 3 or sys.byteorder != "little" or not array.config.write_empty_chunks:
        return None
    serializer, blosc, crc = codecs
    if not (
        isinstance(serializer, BytesCodec)
        and (serializer.endian is None or serializer.endian.value == "little")
        and isinstance(blosc, BloscCodec)
        and isinstance(crc, Crc32cCodec)
        and blosc.typesize is not None
        and blosc.blocksize is not None
    ):
        return None
    codec = Blosc(
        cname=blosc.cname.value,
        clevel=blosc.clevel,
        shuffle=_SHUFFLE[blosc.shuffle],
        blocksize=blosc.blocksize,
        typesize=blosc.typesize,
    )

    def encode(chunk: np.ndarray) -> bytes:
        body = codec.encode(np.ascontiguousarray(chunk))
        return bytes(body) + google_crc32c.value(body).to_bytes(4, "little")

    return encode


def whole_chunks(
    array: zarr.Array, offset: Sequence[int], shape: Sequence[int]
) -> list[tuple[int, ...]] | None:
    """Chunk coordinates of the region, if it is made of whole chunks inside the array; else None."""
    if len(offset) != len(array.shape) or len(shape) != len(array.shape):
        return None
    ranges = []
    for start, extent, size, chunk in zip(offset, shape, array.shape, array.chunks, strict=True):
        if start % chunk or extent % chunk or start + extent > size or extent == 0:
            return None
        ranges.append(range(start // chunk, (start + extent) // chunk))
    return list(itertools.product(*ranges))


@functools.cache
def _encode_pool() -> ThreadPoolExecutor:
    """One pool per process, like zarr's own: a thread per core."""
    return ThreadPoolExecutor(available_cores(), thread_name_prefix="lenscache-encode")


def write_whole_chunks(writes: Sequence[RegionWrite]) -> list[RegionWrite]:
    """Write every region made of whole chunks; return the others, untouched, for zarr to write."""
    jobs, rest = [], []
    for w in writes:
        encode = chunk_encoder(w.array)
        coords = whole_chunks(w.array, w.offset, w.block.shape)
        if encode is None or coords is None or w.block.dtype != w.array.dtype:
            rest.append(w)
            continue
        chunks = w.array.chunks
        for c in coords:
            index = tuple(
                slice(ci * n - o, (ci + 1) * n - o) for ci, n, o in zip(c, chunks, w.offset, strict=True)
            )
            key = w.array.metadata.encode_chunk_key(c)
            key = f"{w.array.path}/{key}" if w.array.path else key
            jobs.append((w.array.store, key, w.block[index], encode))
    if jobs:
        sync(_put_all(jobs))
    return rest


async def _put_all(jobs) -> None:
    loop = asyncio.get_running_loop()
    buffer = default_buffer_prototype().buffer

    async def put(store, key: str, chunk: np.ndarray, encode) -> None:
        data = await loop.run_in_executor(_encode_pool(), encode, chunk)
        await store.set(key, buffer.from_bytes(data))
        fault_point("after-chunk")

    # every write finishes (or fails) before the caller goes on to commit or to report
    results = await asyncio.gather(*(put(*job) for job in jobs), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
