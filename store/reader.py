"""Streaming shuffled batches out of a cache.

Random row gathers from a chunked store are orders of magnitude slower than whole-chunk reads
(``python bench/store_micro.py``), so the reader shuffles at two levels:
1. each epoch, the committed chunks are permuted (one permutation shared by all ranks; rank k
   takes every world_size-th chunk, so ranks are disjoint and complete);
2. consecutive chunks are grouped into *windows* of about ``shuffle_rows`` rows (1 GiB of
   activations by default); a window's unmasked rows are permuted in memory and cut into
   batches. Batches run across window and epoch boundaries; only the last one may be short.

The order is a pure function of (seed, epoch, window, rank, world_size), so the position
``(epoch, window, offset)`` is the whole resumable state: restoring it reloads one window and
continues with exactly the rows that would have come. Windows are built on a background
thread while the previous one is consumed, into one of two preallocated buffer sets (fresh
GiB-sized allocations cost more than the reads: page faults); chunk reads go straight into the
buffer (on a local disk as their files: ``Cache.read_into``) from a pool of ``read_concurrency``
threads, each keeping one chunk request in flight (file reads, zarr's I/O and numpy copies
release the GIL: 4 saturate a local disk, an object store needs more to hide its per-request
latency), and batches are gathered as whole-row memcpys.

Start-up: a fresh stream would wait for a whole window (1 GiB) before its first batch, and the
last window of a finite stream is shuffled and consumed after every read is done. So the first
window of a stream is cut into windows that double in size and the last one into windows that
halve (``window_bounds``, none under RAMP_MIN_BYTES): reads then overlap consumption from the
first batch to the last. The price is shuffle quality at the two ends (more, smaller windows;
bench/RESULTS_store.md has both).

The cost of this design: two rows of a batch share a sequence more often than under a global
shuffle whenever a window is smaller than the cache. ``shuffle_quality`` measures that.
"""

from __future__ import annotations

import sys
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch

from sasa.errors import SasaError
from sasa.store.convert import storage_to_torch

DEFAULT_SHUFFLE_BYTES = 1 << 30
#: 2: windows ramp up at the start of a stream and down at its end (``window_bounds``).
STATE_VERSION = 2
#: Halvings of the first and last window of a stream (see ``window_bounds``), down to windows
#: of RAMP_MIN_BYTES: smaller ones would cost shuffle quality for no start-up time worth having.
RAMP_STEPS = 4
RAMP_MIN_BYTES = 48 << 20
#: Chunk requests in flight per reader when ``read_concurrency`` is not given: a local disk
#: saturates with a few; an object store needs many to hide each request's latency
#: (bench/RESULTS_store.md, "Concurrency").
LOCAL_READ_CONCURRENCY = 4
REMOTE_READ_CONCURRENCY = 16


def default_read_concurrency(url: str) -> int:
    """Chunk requests kept in flight for a cache at ``url``: more for object stores."""
    remote = "://" in str(url) and not str(url).startswith(("file://", "local://"))
    return REMOTE_READ_CONCURRENCY if remote else LOCAL_READ_CONCURRENCY


def _ramp(size: int, smallest: int) -> list[int]:
    """``size`` chunks cut into windows that double, none under ``smallest`` chunks:
    [5, 5, 11, 21, 43] for 85 (smallest <= 5)."""
    parts, rest = [], size
    while rest // 2 >= max(1, smallest) and len(parts) < RAMP_STEPS:
        half = rest // 2
        parts.append(rest - half)
        rest = half
    return ([rest] if rest else []) + parts[::-1]


def window_bounds(n_chunks: int, window: int, ramp_up: bool, ramp_down: bool,
                  smallest: int = 1) -> np.ndarray:
    """Offsets into an epoch's chunk order where windows start, plus ``n_chunks`` at the end.

    Windows hold ``window`` chunks, except at the start of a stream (``ramp_up``: the first
    window is cut into windows that double in size, so the first batch waits for 1/16 of a
    window, not all of it) and at its end (``ramp_down``: the mirror image, so little is left
    to shuffle after the last read). In between, reading the next window overlaps consuming
    this one. A stream of one window is split in two halves, one ramping up, one down. No
    window of a ramp is smaller than ``smallest`` chunks, so small caches are not cut at all."""
    sizes = [window] * (n_chunks // window) + ([n_chunks % window] if n_chunks % window else [])
    if len(sizes) == 1 and ramp_up and ramp_down and sizes[0] >= 4 * max(1, smallest):
        half = -(-sizes[0] // 2)
        sizes = [half, sizes[0] - half]
    if ramp_up:
        sizes = _ramp(sizes[0], smallest) + sizes[1:]
    if ramp_down:
        sizes = sizes[:-1] + _ramp(sizes[-1], smallest)[::-1]
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


class Batch(NamedTuple):
    """A batch with the cache row index of each of its rows (``with_rows=True``)."""

    acts: torch.Tensor | dict[str, torch.Tensor]
    """[B, d], or {hookpoint: [B, d]} when several hookpoints were asked for."""
    rows: torch.Tensor
    """[B] int64 rows of the cache (sequence = row // ctx_len, position = row % ctx_len)."""


class Window(NamedTuple):
    arrays: dict[str, np.ndarray]
    """{hookpoint: [n_chunks * chunk_rows, d]} stored rows of the window's chunks, in chunk order."""
    take: np.ndarray
    """[n_kept] int64 indices into ``arrays`` in this window's (shuffled) order; masked rows left out."""
    rows: np.ndarray
    """[n_kept] int64 cache row of each entry of ``take``."""
    n_chunks: int
    """Chunks read for this window."""


def _as_rows(a: np.ndarray) -> np.ndarray:
    """View [n, d] as [n] opaque records: numpy then moves whole rows with one memcpy each,
    not 2-byte elements one by one (``python bench/store_micro.py``)."""
    return a.view(np.dtype((np.void, a.shape[1] * a.itemsize))).reshape(-1)


class _WindowBuffers:
    """Two preallocated sets of window buffers used alternately: one fills while the other is
    consumed. Fresh 1 GiB allocations cost more than the reads themselves (page faults), so
    every window after the first two reuses memory."""

    def __init__(self, layout, widths: dict[str, int], window_chunks: int):
        self.sets = []
        for _ in range(2):
            arrays = {hp: np.empty((window_chunks * layout.chunk_rows, d), layout.storage_dtype)
                      for hp, d in widths.items()}
            tokens = np.empty((window_chunks * layout.chunk_seqs, layout.ctx_len), np.int32)
            self.sets.append((arrays, tokens))


class BatchStream:
    """Iterable over batches; ``state_dict()`` after any batch resumes right after it."""

    def __init__(self, cache, hookpoints: list[str], batch_size: int, *, single: bool,
                 shuffle: bool, seed: int, exclude: tuple, rank: int, world_size: int,
                 dtype: torch.dtype, epochs: int | None, resume: dict | None, with_rows: bool,
                 shuffle_rows: int | None, read_concurrency: int | None):
        if batch_size <= 0:
            raise SasaError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise SasaError(f"rank {rank} is not in [0, world_size={world_size})")
        if epochs is not None and epochs <= 0:
            raise SasaError(f"epochs must be positive or None (endless), got {epochs}")
        self.cache = cache
        self.layout = cache.layout
        self.hookpoints = hookpoints
        self.batch_size = batch_size
        self.single = single
        self.shuffle = shuffle
        self.seed = seed
        cache.exclude_ids(exclude)  # unknown kinds fail here, not in a reader thread
        self.exclude = exclude
        self.rank, self.world_size = rank, world_size
        self.dtype = dtype
        self.epochs = epochs
        self.with_rows = with_rows
        if read_concurrency is None:
            read_concurrency = default_read_concurrency(cache.url)
        if int(read_concurrency) <= 0:
            raise SasaError(f"read_concurrency must be positive, got {read_concurrency}")
        self.read_concurrency = int(read_concurrency)
        # Chunks of the windows taken so far. A read-ahead window the consumer never reached is
        # not counted, so the count depends on the batches taken, not on thread timing.
        self.chunks_read = 0

        self.shards = list(resume["shards"]) if resume else cache.committed_shards()
        self.chunks = np.array([c for s in self.shards for c in self.layout.shard_chunks(s)], dtype=np.int64)
        if len(self.chunks) == 0:
            raise SasaError(f"{cache.url} has no committed shards yet; wait for the harvest or check the URL")
        if len(self.chunks) < world_size:
            raise SasaError(f"{len(self.chunks)} committed chunks cannot feed {world_size} ranks; "
                            f"use fewer ranks or a cache with smaller chunks")
        chunk_bytes = self.layout.chunk_rows * sum(
            cache.hookpoints[hp] * self.layout.storage_dtype.itemsize for hp in hookpoints)
        if shuffle_rows is None:
            self.window_chunks = max(1, DEFAULT_SHUFFLE_BYTES // chunk_bytes)
        else:
            self.window_chunks = max(1, -(-shuffle_rows // self.layout.chunk_rows))
        if not shuffle:
            self.window_chunks = 1
        self.ramp_chunks = -(-RAMP_MIN_BYTES // chunk_bytes)
        self.rank_chunks = len(range(rank, len(self.chunks), world_size))
        self.window_chunks = min(self.window_chunks, self.rank_chunks)
        self._bounds = {}
        self.position = (0, 0, 0)  # (epoch, window, offset of the next row in that window)
        if resume:
            self._check_resume(resume)
            self.position = tuple(resume["position"])

    # -- state -------------------------------------------------------------------------
    def _identity(self) -> dict:
        return {"hookpoints": self.hookpoints, "batch_size": self.batch_size,
                "shuffle": self.shuffle, "seed": self.seed, "exclude": list(self.exclude),
                "rank": self.rank, "world_size": self.world_size,
                "window_chunks": self.window_chunks, "epochs": self.epochs,
                "cache": self.cache.fingerprint}

    def state_dict(self) -> dict:
        """JSON-able state: pass as ``resume=`` to continue after the last batch yielded."""
        return {"version": STATE_VERSION, "position": list(self.position),
                "shards": self.shards, **self._identity()}

    def _check_resume(self, resume: dict) -> None:
        if resume.get("version") != STATE_VERSION:
            raise SasaError(f"reader state version {resume.get('version')} is not {STATE_VERSION}; "
                            f"restart the run without resuming")
        mine = self._identity()
        diffs = [f"{k}: {resume.get(k)!r} -> {v!r}" for k, v in mine.items() if resume.get(k) != v]
        if diffs:
            raise SasaError(f"cannot resume: the reader settings differ from the saved state "
                            f"({'; '.join(diffs)}); use the original settings")

    # -- order -------------------------------------------------------------------------
    def epoch_chunks(self, epoch: int) -> np.ndarray:
        """This rank's chunks for an epoch, in reading order."""
        order = self.chunks
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        return order[self.rank::self.world_size]

    def window_bounds(self, epoch: int) -> np.ndarray:
        """Where this rank's windows of ``epoch`` start in its chunk order (and where they end)."""
        key = (self.shuffle and epoch == 0, self.shuffle and self.epochs is not None and epoch == self.epochs - 1)
        if key not in self._bounds:
            self._bounds[key] = window_bounds(self.rank_chunks, self.window_chunks, *key, self.ramp_chunks)
        return self._bounds[key]

    def _next(self, epoch: int, window: int) -> tuple[int, int]:
        n_windows = len(self.window_bounds(epoch)) - 1
        return (epoch, window + 1) if window + 1 < n_windows else (epoch + 1, 0)

    def _done(self, epoch: int) -> bool:
        return self.epochs is not None and epoch >= self.epochs

    # -- reading -----------------------------------------------------------------------
    def _read_into(self, path_hp: str | None, start: int, stop: int, out: np.ndarray) -> None:
        """Read rows [start, stop) of one array straight into ``out`` (no temporary copy)."""
        arr = self.cache.tokens if path_hp is None else self.cache.acts(path_hp)
        self.cache.read_into(arr, start, stop, out)

    def _build_window(self, io: ThreadPoolExecutor, buffer_set: tuple, epoch: int, window: int) -> Window:
        lay = self.layout
        bounds = self.window_bounds(epoch)
        chunks = self.epoch_chunks(epoch)[bounds[window]:bounds[window + 1]]
        arrays, tokens = buffer_set
        n = len(chunks)
        arrays = {hp: a[:n * lay.chunk_rows] for hp, a in arrays.items() if hp in self.hookpoints}
        tokens = tokens[:n * lay.chunk_seqs]
        jobs = []
        for i, c in enumerate(chunks):
            cs, cr = slice(i * lay.chunk_seqs, (i + 1) * lay.chunk_seqs), slice(i * lay.chunk_rows, (i + 1) * lay.chunk_rows)
            jobs.append(io.submit(self._read_into, None, c * lay.chunk_seqs, (c + 1) * lay.chunk_seqs, tokens[cs]))
            jobs += [io.submit(self._read_into, hp, c * lay.chunk_rows, (c + 1) * lay.chunk_rows, a[cr])
                     for hp, a in arrays.items()]
        for job in jobs:
            job.result()
        window_rows = (chunks[:, None] * lay.chunk_rows + np.arange(lay.chunk_rows)).reshape(-1)
        take = np.flatnonzero(self.cache.row_mask(tokens.reshape(-1), self.exclude,
                                                  hookpoints=self.hookpoints, rows=window_rows))
        rows = chunks[take // lay.chunk_rows] * lay.chunk_rows + take % lay.chunk_rows
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, window, self.rank, self.world_size]).permutation(len(take))
            take, rows = take[order], rows[order]
        return Window(arrays, take, rows, n)

    def _new_batch(self, size: int) -> dict:
        return {"acts": {hp: np.empty((size, self.cache.hookpoints[hp]), self.layout.storage_dtype)
                         for hp in self.hookpoints},
                "rows": np.empty(size, np.int64)}

    def _fill(self, batch: dict, at: int, win: Window, a: int, b: int) -> None:
        """Copy window entries [a, b) into batch rows [at, at + b - a) right away, so a window's
        buffer is free to be refilled as soon as its last batch has been assembled."""
        idx = win.take[a:b]
        for hp, out in batch["acts"].items():
            # mode="clip": the indices are valid by construction, and numpy buffers ``out``
            # (an extra copy of the batch) in the default mode="raise".
            np.take(_as_rows(win.arrays[hp]), idx, out=_as_rows(out)[at:at + b - a], mode="clip")
        batch["rows"][at:at + b - a] = win.rows[a:b]

    def _finish(self, batch: dict, size: int):
        acts = {hp: self._to_torch(a[:size]) for hp, a in batch["acts"].items()}
        out = acts[self.hookpoints[0]] if self.single else acts
        if self.with_rows:
            return Batch(out, torch.from_numpy(batch["rows"][:size]))
        return out

    def _to_torch(self, a: np.ndarray) -> torch.Tensor:
        if self.layout.dtype == "bfloat16" and self.dtype == torch.float32:
            wide = a.astype(np.uint32)  # bf16 bits are the high half of the float32 bits
            wide <<= 16
            return torch.from_numpy(wide.view(np.float32))
        return storage_to_torch(a, self.layout.dtype, self.dtype)

    def __iter__(self):
        epoch, window, offset = self.position
        if self._done(epoch):
            return
        widths = {hp: self.cache.hookpoints[hp] for hp in self.hookpoints}
        buffers = _WindowBuffers(self.layout, widths, self.window_chunks)
        io = ThreadPoolExecutor(self.read_concurrency, thread_name_prefix="sasa-read")
        builder = ThreadPoolExecutor(1, thread_name_prefix="sasa-window")
        try:
            submit = lambda e, w, slot: builder.submit(self._build_window, io, buffers.sets[slot], e, w)  # noqa: E731
            slot = 0
            pending: Future = submit(epoch, window, slot)
            batch, have = self._new_batch(self.batch_size), 0
            while True:
                win = pending.result()
                self.chunks_read += win.n_chunks
                nxt = self._next(epoch, window)
                if not self._done(nxt[0]):
                    # Fill the other buffer set while this window is consumed; batches copy rows
                    # out eagerly, so that set's previous window is already fully copied.
                    slot ^= 1
                    pending = submit(*nxt, slot)
                while offset < len(win.take):
                    take = min(self.batch_size - have, len(win.take) - offset)
                    self._fill(batch, have, win, offset, offset + take)
                    have, offset = have + take, offset + take
                    if have == self.batch_size:
                        done, batch, have = batch, self._new_batch(self.batch_size), 0
                        self.position = (epoch, window, offset) if offset < len(win.take) else (*nxt, 0)
                        yield self._finish(done, self.batch_size)
                epoch, window, offset = *nxt, 0
                if self._done(epoch):
                    break
            if have:
                self.position = (epoch, window, 0)
                yield self._finish(batch, have)
        finally:
            # Never wait here: a generator may be finalised on any thread (even zarr's event
            # loop thread, where waiting on a read would deadlock). Orphaned reads only touch
            # this iteration's buffers. At interpreter exit the executors are already gone.
            if not sys.is_finalizing():
                builder.shutdown(wait=False, cancel_futures=True)
                io.shutdown(wait=False, cancel_futures=True)


def shuffle_quality(rows_per_batch, ctx_len: int, n_rows: int) -> float:
    """How often two rows of a batch share a sequence, relative to a perfect global shuffle.

    Returns observed / ideal, where ideal = (ctx_len - 1) / (n_rows - 1) is the chance that two
    rows drawn without replacement from n_rows rows come from the same sequence. 1.0 is ideal;
    a reader that emits whole sequences scores ~ n_rows / ctx_len.
    """
    same = pairs = 0
    for rows in rows_per_batch:
        seqs = np.asarray(rows) // ctx_len
        _, counts = np.unique(seqs, return_counts=True)
        same += int((counts * (counts - 1) // 2).sum())
        pairs += len(seqs) * (len(seqs) - 1) // 2
    ideal = (ctx_len - 1) / (n_rows - 1)
    return (same / pairs) / ideal if pairs else float("nan")

