"""Reading and writing whole uncompressed chunks as their stored objects, outside zarr.

When an array's only codec is ``bytes`` in little-endian order (no compressor, no filter, no
sharding codec), the object of a chunk is exactly the C-order bytes of that chunk's rows, so code
that covers whole chunks can move those bytes under the chunk's key itself: same objects, same
bytes, as ``array[rows] = data`` would store (tests/test_store_write_path.py writes a cache both
ways and compares every object) and the same rows as zarr reads back (tests/test_store_read_path.py
compares every batch). The writer (store/writer.py) does this for a shard's activations and norms;
``Cache.read_into`` for the activation chunks it reads on a local disk (the reader's windows,
``Cache.read_rows``, analysis scans). Every other array, and every array of a ``shard_objects`` or
compressed layout, keeps zarr's own path.

Why, writing: every zarr write of a process runs through zarr's one event-loop thread, which encodes
the chunks and hands them to the store, so two shards written from two threads queue behind each
other there. A local chunk written here goes from a thread of the writer's own (its disk queue,
``CacheWriter._disk_queue``; ``os.write`` releases the GIL), beside zarr's loop and the shards' CPU
work. Measured on a 64 MiB bf16 shard at d = 4096 (``python bench/harvest.py --stages``, figures in
bench/RESULTS_harvest.md). A local chunk whose size is a multiple of 4 KiB is written past the page
cache (``O_DIRECT``; ``CacheWriter.direct_io``), straight from the caller's array when it starts on
a page (the harvester's host buffers do: ``sasa.harvester.runner.host_tensor``): a harvest writes
each byte once and never reads it back, and through the page cache every new page is allocated,
dirtied and flushed later; at d = 4096, 10 GB written, 1.70 and 1.90 against 1.14 and 1.11 GB/s
through the page cache in two runs (``python bench/harvest.py [--ceiling-only]``,
bench/RESULTS_harvest.md). Why, reading: zarr reads a local chunk into a new bytes object and copies
it into the caller's buffer; ``readinto`` puts the file's bytes straight into the window, one copy
instead of two and no fresh allocation per chunk: 2.2x zarr's rate on one thread from a warm page
cache on one 2-core VM and 0.7x on another (not understood; ``python bench/store_micro.py``,
bench/RESULTS.md); over a cold epoch of the reader 0.93-1.27x in five runs on the first VM
(``python bench/store_read.py``; bench/RESULTS_store.md), 1.15x on an H200 machine
(bench/RESULTS.md, "On a GPU").

Safety is the same as zarr's LocalStore: a local object is written to
``<key>.<uuid4 hex>.partial`` and renamed over the key, so a writer killed mid-write leaves at
worst such a temporary (``CacheWriter.remove_stray_temporaries`` removes them), never a torn
chunk under a real key. Each local put or get goes through ``remote.fs_call`` (a full disk is
one line); on any other store the objects go through the cache's ``CacheStore.set`` (retries
for transient faults, one-line errors for the rest), concurrently on zarr's loop like the other
writes. A read never turns damage into rows: an absent chunk file is left to zarr's path, which
reports it (``Cache``), and a file of the wrong size is one line naming it.
"""

from __future__ import annotations

import errno
import mmap
import os
import sys
import threading
import uuid
from pathlib import Path
from typing import NamedTuple

import numpy as np
import zarr
from zarr.codecs import BytesCodec
from zarr.core.buffer import default_buffer_prototype

from sasa.errors import SasaError
from sasa.store.remote import CacheStore, fs_call


class ChunkPut(NamedTuple):
    """One chunk object to store: its key in the store and its bytes (a view, no copy)."""

    key: str
    data: memoryview


def plain_bytes(array: zarr.Array) -> bool:
    """True when a chunk object of ``array`` is exactly the C-order bytes of the chunk: zarr v3,
    a regular chunk grid, the ``bytes`` codec alone, and little-endian data on a little-endian
    machine (or one-byte items)."""
    meta = array.metadata
    if getattr(meta, "zarr_format", None) != 3 or len(meta.codecs) != 1:
        return False
    codec = meta.codecs[0]
    if type(codec) is not BytesCodec or not hasattr(meta.chunk_grid, "chunk_shape"):
        return False
    little = codec.endian is None or codec.endian.value == "little"
    return np.dtype(array.dtype).itemsize == 1 or (little and sys.byteorder == "little")


def whole_chunks(array: zarr.Array, rows: slice) -> list[tuple[str, slice]] | None:
    """The chunk objects that hold exactly ``array[rows]``: (key, the part of ``rows`` it holds,
    counted from ``rows.start``) per chunk, in order, when ``rows`` covers whole chunks along the
    first axis and a chunk spans every other axis; None when zarr must do it (``plain_bytes``
    false, a partial chunk, or a chunk split across the other axes)."""
    if not plain_bytes(array):
        return None
    chunk = tuple(array.metadata.chunk_grid.chunk_shape)
    start, stop, per = rows.start, rows.stop, chunk[0]
    if tuple(array.shape[1:]) != chunk[1:] or start % per or (stop - start) % per \
            or stop > array.shape[0]:
        return None
    tail = (0,) * (array.ndim - 1)
    return [(f"{array.path}/{array.metadata.encode_chunk_key((c, *tail))}",
             slice(c * per - start, (c + 1) * per - start))
            for c in range(start // per, stop // per)]


def chunk_puts(array: zarr.Array, rows: slice, data: np.ndarray) -> list[ChunkPut] | None:
    """The chunk objects of ``array[rows] = data`` (``whole_chunks``), or None when zarr must
    write it."""
    chunks = whole_chunks(array, rows)
    if chunks is None or tuple(data.shape) != (rows.stop - rows.start, *array.shape[1:]):
        return None
    data = np.ascontiguousarray(data, dtype=array.dtype)
    return [ChunkPut(key, memoryview(data[part]).cast("B")) for key, part in chunks]


#: O_DIRECT needs the buffer's address, the file offset and the length aligned to the device's
#: logical block size: 4096 covers 512-byte and 4K-native devices alike.
ALIGN = 4096
_bounce = threading.local()


def put_local(url: str, root: Path, put: ChunkPut, direct_io: bool = True) -> None:
    """Write one chunk object under ``root`` as zarr's LocalStore does: a temporary
    ``<key>.<uuid>.partial`` renamed over the key (a storage error is one line naming ``url``).
    ``direct_io``: past the page cache (``O_DIRECT``) where the file system and the chunk's size
    allow, else through it."""
    fs_call(url, "write", _put, root / put.key, put.data, direct_io)


def _put(path: Path, data: memoryview, direct_io: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.partial")
    try:
        if not (direct_io and _write_direct(tmp, data)):
            with open(tmp, "wb") as f:
                f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_direct(path: Path, data: memoryview) -> bool:
    """Write ``data`` as the new file ``path`` with ``O_DIRECT``, from ``data`` itself when its
    address is aligned (the harvester's host buffers are), else from a page-aligned copy kept per
    thread.
    False, having written nothing that counts, when this system, file system or size does not
    allow it: the caller then writes the file through the page cache."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag or not len(data) or len(data) % ALIGN:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o644)
    except OSError as err:
        if err.errno == errno.EINVAL:  # a file system without O_DIRECT
            return False
        raise
    try:
        aligned = np.frombuffer(data, np.uint8).ctypes.data % ALIGN == 0
        src = data if aligned else _aligned_copy(data)
        done = 0
        while done < len(src):
            done += os.write(fd, src[done:])
    except OSError as err:
        if err.errno == errno.EINVAL:  # a device with larger blocks: write it buffered
            return False
        raise
    finally:
        os.close(fd)
    return True


def _aligned_copy(data: memoryview) -> memoryview:
    """``data`` copied into this thread's page-aligned buffer (grown as needed, then reused)."""
    buf = getattr(_bounce, "buf", None)
    if buf is None or len(buf) < len(data):
        _bounce.buf = buf = mmap.mmap(-1, len(data))
    view = memoryview(buf)[:len(data)]
    view[:] = data
    return view


async def put_store(store: CacheStore, put: ChunkPut) -> None:
    """Put one chunk object through the cache's store (retries and one-line errors included)."""
    await store.set(put.key, default_buffer_prototype().buffer.from_bytes(put.data))


def get_local(url: str, root: Path, key: str, out: np.ndarray) -> bool:
    """Read the chunk object ``key`` under ``root`` straight into ``out`` (C-contiguous, the
    chunk's shape and dtype): one copy, from the page cache into ``out``. False when the object
    is absent, so that the caller's zarr read reports it as such (``Cache``: never zeros for a
    committed shard). A chunk object of the wrong size is damage: one line naming it."""
    return fs_call(url, "read", _get, root / key, memoryview(out).cast("B"), url)


def _get(path: Path, out: memoryview, url: str) -> bool:
    try:
        f = open(path, "rb", buffering=0)
    except FileNotFoundError:
        return False
    with f:
        size, done = os.fstat(f.fileno()).st_size, 0
        if size == len(out):
            while done < size and (got := f.readinto(out[done:])):
                done += got
    if done != len(out):
        raise SasaError(f"chunk object {path} of {url} holds {size} bytes where a whole chunk has "
                        f"{len(out)} (damaged or truncated); sasa never trains on it: run "
                        f"`sasa info --verify {url}` and re-harvest the shard")
    return True
