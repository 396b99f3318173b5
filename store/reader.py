"""Streaming shuffled batches out of a cache.

Random row gathers from a chunked store are ~100x slower than whole-chunk reads, so the
reader shuffles at two levels:
1. each epoch, the committed chunks are permuted (one permutation shared by all ranks; rank k
   takes every world_size-th chunk, so ranks are disjoint and complete);
2. consecutive chunks are grouped into *windows* of about ``shuffle_rows`` rows (1 GiB of
   activations by default); a window's unmasked rows are permuted in memory and cut into
   batches. Batches run across window and epoch boundaries; only the last one may be short.

The order is a pure function of (seed, epoch, window, rank, world_size), so the position
``(epoch, window, offset)`` is the whole resumable state: restoring it reloads one window and
continues with exactly the rows that would have come. Windows are built on a background
thread while the previous one is consumed; chunk reads run on a small thread pool (zarr's I/O
and numpy copies release the GIL).

The cost of this design: two rows of a batch share a sequence more often than under a global
shuffle whenever a window is smaller than the cache. ``shuffle_quality`` measures that.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch

from sasa.errors import SasaError
from store.convert import storage_to_torch

DEFAULT_SHUFFLE_BYTES = 1 << 30
STATE_VERSION = 1


class Batch(NamedTuple):
    """A batch with the cache row index of each of its rows (``with_rows=True``)."""

    acts: torch.Tensor | dict[str, torch.Tensor]
    """[B, d], or {hookpoint: [B, d]} when several hookpoints were asked for."""
    rows: torch.Tensor
    """[B] int64 rows of the cache (sequence = row // ctx_len, position = row % ctx_len)."""


class Window(NamedTuple):
    arrays: dict[str, np.ndarray]
    """{hookpoint: [n, d]} stored rows, already in this window's order."""
    rows: np.ndarray
    """[n] int64 cache row of each."""


class BatchStream:
    """Iterable over batches; ``state_dict()`` after any batch resumes right after it."""

    def __init__(self, cache, hookpoints: list[str], batch_size: int, *, single: bool,
                 shuffle: bool, seed: int, exclude: tuple, rank: int, world_size: int,
                 dtype: torch.dtype, epochs: int | None, resume: dict | None, with_rows: bool,
                 shuffle_rows: int | None, prefetch_threads: int):
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
        self.exclude_ids = cache.exclude_ids(exclude)
        self.exclude = exclude
        self.rank, self.world_size = rank, world_size
        self.dtype = dtype
        self.epochs = epochs
        self.with_rows = with_rows
        self.prefetch_threads = prefetch_threads
        self.chunks_read = 0
        self._lock = threading.Lock()

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
        rank_chunks = len(range(rank, len(self.chunks), world_size))
        self.n_windows = -(-rank_chunks // self.window_chunks)
        self.position = (0, 0, 0)  # (epoch, window, offset of the next row in that window)
        if resume:
            self._check_resume(resume)
            self.position = tuple(resume["position"])

    # -- state -------------------------------------------------------------------------
    def _identity(self) -> dict:
        return {"hookpoints": self.hookpoints, "batch_size": self.batch_size,
                "shuffle": self.shuffle, "seed": self.seed, "exclude": list(self.exclude),
                "rank": self.rank, "world_size": self.world_size,
                "window_chunks": self.window_chunks, "cache": self.cache.fingerprint}

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

    def _next(self, epoch: int, window: int) -> tuple[int, int]:
        return (epoch, window + 1) if window + 1 < self.n_windows else (epoch + 1, 0)

    def _done(self, epoch: int) -> bool:
        return self.epochs is not None and epoch >= self.epochs

    # -- reading -----------------------------------------------------------------------
    def _read_chunk(self, chunk: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        lay = self.layout
        seqs = slice(chunk * lay.chunk_seqs, (chunk + 1) * lay.chunk_seqs)
        tokens = self.cache.tokens[seqs].reshape(-1)
        keep = self.cache.row_mask(tokens, self.exclude)
        rows = np.arange(chunk * lay.chunk_rows, (chunk + 1) * lay.chunk_rows, dtype=np.int64)
        arrays = {}
        for hp in self.hookpoints:
            data = self.cache.acts(hp)[rows[0]:rows[-1] + 1]
            arrays[hp] = data if keep.all() else data[keep]
        with self._lock:
            self.chunks_read += 1
        return arrays, rows[keep]

    def _build_window(self, io: ThreadPoolExecutor, epoch: int, window: int) -> Window:
        chunks = self.epoch_chunks(epoch)[window * self.window_chunks:(window + 1) * self.window_chunks]
        parts = list(io.map(self._read_chunk, chunks))
        rows = np.concatenate([p[1] for p in parts])
        order = None
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch, window, self.rank, self.world_size])
            order = rng.permutation(len(rows))
            rows = rows[order]
        arrays = {}
        for hp in self.hookpoints:
            data = np.concatenate([p[0][hp] for p in parts]) if len(parts) > 1 else parts[0][0][hp]
            arrays[hp] = data[order] if order is not None else data
        return Window(arrays, rows)

    def _batch(self, pieces: list[tuple[Window, int, int]]):
        def cat(get):
            parts = [get(w)[a:b] for w, a, b in pieces]
            return parts[0] if len(parts) == 1 else np.concatenate(parts)

        acts = {hp: storage_to_torch(cat(lambda w: w.arrays[hp]), self.layout.dtype, self.dtype)
                for hp in self.hookpoints}
        out = acts[self.hookpoints[0]] if self.single else acts
        if self.with_rows:
            return Batch(out, torch.from_numpy(cat(lambda w: w.rows)))
        return out

    def __iter__(self):
        epoch, window, offset = self.position
        if self._done(epoch):
            return
        with ThreadPoolExecutor(self.prefetch_threads, thread_name_prefix="sasa-read") as io, \
                ThreadPoolExecutor(1, thread_name_prefix="sasa-window") as builder:
            submit = lambda e, w: builder.submit(self._build_window, io, e, w)  # noqa: E731
            pending: Future = submit(epoch, window)
            pieces, have = [], 0
            while True:
                win = pending.result()
                nxt = self._next(epoch, window)
                if not self._done(nxt[0]):
                    pending = submit(*nxt)  # build the next window while this one is consumed
                while offset < len(win.rows):
                    take = min(self.batch_size - have, len(win.rows) - offset)
                    pieces.append((win, offset, offset + take))
                    have, offset = have + take, offset + take
                    if have == self.batch_size:
                        batch = self._batch(pieces)
                        pieces, have = [], 0
                        self.position = (epoch, window, offset) if offset < len(win.rows) else (*nxt, 0)
                        yield batch
                epoch, window, offset = *nxt, 0
                if self._done(epoch):
                    break
            if pieces:
                self.position = (epoch, window, 0)
                yield self._batch(pieces)


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

