"""Reading a cache: the read-only ``Cache`` that trainers and analysis jobs open.

A ``Cache`` is a snapshot: it sees the shards committed when it was opened (``refresh()``
takes a new snapshot), so an analysis job can mount a cache while a harvest still writes it.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
import zarr
from zarr.core.buffer import cpu

from sasa.errors import SasaError
from sasa.store import direct
from sasa.store import layout as L
from sasa.store.convert import storage_to_float32
from sasa.store.extras import open_extra
from sasa.store.location import local_root, open_group, url_fs
from sasa.store.reader import BatchStream
from sasa.store.remote import CacheStore, fs_call
from sasa.store.stats import HookpointStats, Moments, merge, summarize
from sasa.store.masks import high_norm_mask, parse_exclude, special_mask
from sasa.store.options import DEFAULT_EXCLUDE


#: Shards whose norms are read for norm quantiles (all of them up to this many).
NORM_SAMPLE_SHARDS = 64


class Cache:
    """A read-only view of the committed shards of a cache."""

    def __init__(self, url: str, group: zarr.Group, storage_options: dict | None = None):
        self.url = url
        self.group = group
        self.storage_options = storage_options
        sasa = dict(group.attrs["sasa"])
        version = sasa.get("format_version")
        if not isinstance(version, int) or version > L.FORMAT_VERSION:
            raise SasaError(f"{url!r} has cache format version {version}, newer than this sasa "
                            f"reads (<= {L.FORMAT_VERSION}); upgrade sasa (pip install -U sasa)")
        self.fingerprint = sasa.pop("fingerprint", None)
        self.layout = L.Layout.from_attrs(sasa)
        self.attrs = {k: v for k, v in group.attrs.items() if k != "sasa"}
        self._arrays: dict[str, zarr.Array] = {}
        self.refresh()
        self._local_root = local_root(url, storage_options)
        """The cache's folder on a local disk (None on any other store)."""
        self.direct_reads = True
        """Read whole uncompressed chunks on a local disk as their files (``sasa.store.direct``);
        False reads every chunk through zarr (the same rows, slower: the reference path the
        tests and ``bench/store_read.py`` compare against)."""
        if isinstance(group.store, CacheStore):  # every absent chunk object is checked here
            group.store.on_missing = self._missing_object

    def refresh(self) -> None:
        """Take a new snapshot of which shards are committed."""
        self._committed = self.group[L.COMMITTED][:].astype(bool)
        self._stats_cache = {}

    # -- shape -------------------------------------------------------------------------
    @property
    def hookpoints(self) -> dict[str, int]:
        return dict(self.layout.hookpoints)

    @property
    def ctx_len(self) -> int:
        return self.layout.ctx_len

    @property
    def n_seq(self) -> int:
        return self.layout.n_seq

    @property
    def shard_seqs(self) -> int:
        return self.layout.shard_seqs

    @property
    def n_shards(self) -> int:
        return self.layout.n_shards

    @property
    def dtype(self) -> str:
        return self.layout.dtype

    def committed_shards(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self._committed)]

    def pending_shards(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self._committed)]

    @property
    def complete(self) -> bool:
        return bool(self._committed.all())

    @property
    def n_tokens(self) -> int:
        """Committed rows."""
        return int(self._committed.sum()) * self.layout.shard_rows

    @property
    def tokens(self) -> zarr.Array:
        """[n_seq, ctx_len] int32 (rows of uncommitted shards are undefined)."""
        return self._array(L.TOKENS)

    def acts(self, hookpoint: str) -> zarr.Array:
        """[n_tokens, d] in the storage dtype (bf16 as uint16 bits)."""
        return self._array(L.acts_path(self.check_hookpoint(hookpoint)))

    def _array(self, path: str) -> zarr.Array:
        """The array at ``path``, opened once: opening reads its metadata object, a request
        each time on an object store, and the reader asks for its arrays once per chunk."""
        if path not in self._arrays:
            self._arrays[path] = self.group[path]
        return self._arrays[path]

    def check_hookpoint(self, hookpoint: str) -> str:
        if hookpoint not in self.layout.hookpoints:
            raise SasaError(f"hookpoint {hookpoint!r} is not in {self.url}; it has "
                            f"{', '.join(self.layout.hookpoints)}")
        return hookpoint

    def exclude_ids(self, exclude) -> dict[str, list[int]]:
        """Special-token ids per excluded kind (``sasa.store.masks``); unknown kinds are an error."""
        special = self.attrs.get("special_token_ids", {})
        kinds = parse_exclude(exclude).special
        unknown = [k for k in kinds if k not in special and k not in DEFAULT_EXCLUDE]
        if unknown:
            raise SasaError(f"cannot exclude {unknown}: this cache records special tokens "
                            f"{sorted(special) or 'none'} (and high_norm[:K] excludes outlier norms)")
        return {k: list(special.get(k, [])) for k in kinds}

    def row_mask(self, tokens_flat: np.ndarray, exclude=DEFAULT_EXCLUDE, *, hookpoints=(),
                 rows: np.ndarray | None = None) -> np.ndarray:
        """True for rows that are kept under the exclusion policy.

        A ``high_norm`` exclusion needs ``rows`` (the cache row of each entry of
        ``tokens_flat``) and the ``hookpoints`` being read: it reads their ``norms`` rows."""
        ids = self.exclude_ids(exclude)
        keep = ~special_mask(tokens_flat, ids, list(ids))
        factor = parse_exclude(exclude).norm_factor
        if factor is not None:
            if rows is None or not hookpoints:
                raise SasaError("a high_norm exclusion needs the rows and hookpoints being read")
            rows = np.asarray(rows)
            norms_HN = np.stack([self.group[L.norms_path(hp)].get_orthogonal_selection(rows)
                                 for hp in hookpoints])
            medians = [self.stats(hp).norm_quantiles[0.5] for hp in hookpoints]
            keep &= ~high_norm_mask(norms_HN, medians, factor)
        return keep

    def extra(self, name: str) -> zarr.Array:
        """The producer array ``extra/<name>`` (``sasa.store.extras``); rows of uncommitted
        shards are undefined."""
        return open_extra(self.group, name, self.url)

    # -- reading -----------------------------------------------------------------------
    def read_into(self, array: zarr.Array, start: int, stop: int, out: np.ndarray) -> None:
        """Rows [start, stop) of one of this cache's arrays straight into ``out`` (no temporary
        copy). Whole uncompressed chunks on a local disk are read as their files, from the page
        cache into ``out`` (``sasa.store.direct``); anything else, and an absent chunk (reported
        as damage, never read as zeros), goes through zarr."""
        root = self._local_root if self.direct_reads and out.flags.c_contiguous else None
        chunks = None if root is None else direct.whole_chunks(array, slice(start, stop))
        if chunks is not None and all(direct.get_local(self.url, root, key, out[part])
                                      for key, part in chunks):
            return
        try:
            array.get_basic_selection((slice(start, stop),), out=cpu.NDBuffer.from_numpy_array(out))
        except ValueError as err:  # a chunk that does not decode: truncated, or a bad checksum
            raise SasaError(f"cannot read rows [{start}, {stop}) of {array.path} in {self.url} "
                            f"({type(err).__name__}: {err}); a chunk object is damaged: run "
                            f"`sasa info --verify {self.url}` and re-harvest the shard") from None

    def read_rows(self, hookpoint: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a hookpoint as float32 (sequential reads, for analysis); every
        row must lie in a committed shard."""
        array = self.acts(hookpoint)
        self.check_rows(start, stop)
        out = np.empty((stop - start, self.hookpoints[hookpoint]), self.layout.storage_dtype)
        self.read_into(array, start, stop, out)
        return storage_to_float32(out, self.dtype)

    def check_rows(self, start: int, stop: int) -> None:
        """Refuse rows past the end, or rows of shards that are not committed (zarr would
        return zeros for both)."""
        lay = self.layout
        if not 0 <= start <= stop <= lay.n_rows:
            raise SasaError(f"rows [{start}, {stop}) are outside {self.url}, which has rows "
                            f"[0, {lay.n_rows}); ask for rows inside that range")
        shards = range(start // lay.shard_rows, -(-stop // lay.shard_rows))
        pending = [s for s in shards if not self._committed[s]]
        if pending:
            raise SasaError(f"rows [{start}, {stop}) include shard(s) {pending[:8]} of {self.url}, "
                            f"which are not committed yet; read rows of committed shards only "
                            f"(Cache.committed_shards(), or refresh() once the harvest committed them)")

    def _missing_object(self, key: str) -> None:
        """Called by the store for every absent object: one of a data array is an error."""
        shard = self.layout.shard_of_key(key)
        if shard is None or not 0 <= shard < self.layout.n_shards:
            return
        if self._committed[shard]:
            raise SasaError(
                f"shard {shard} of {self.url} is committed but its chunk object {key} is missing "
                f"(deleted, or not yet visible on the object store); sasa never reads zeros in its "
                f"place: run `sasa info --verify {self.url}` and re-harvest the shard")
        raise SasaError(f"shard {shard} of {self.url} is not committed yet ({key} is not written); "
                        f"read rows of committed shards only (Cache.committed_shards())")

    def missing_chunks(self) -> list[str]:
        """Chunk objects of committed shards that are absent, from one listing of the cache
        (the listing ``size_bytes`` makes anyway): cheap next to reading the chunks."""
        present = set(self._listing)
        return [f"shard {s}: {key}" for s in self.committed_shards()
                for key in self.layout.chunk_keys(s) if key not in present]

    @cached_property
    def _listing(self) -> dict[str, int]:
        """Every object under the cache's root (key relative to the root) -> its size."""
        fs, path = url_fs(self.url, self.storage_options)
        found = fs_call(self.url, "read", fs.find, path, detail=True)
        root = fs._strip_protocol(path).rstrip("/") + "/"
        return {k[len(root):] if k.startswith(root) else k: int(v.get("size") or 0)
                for k, v in found.items()}

    def stats(self, hookpoint: str) -> HookpointStats:
        """Statistics over the committed rows, BOS and padding excluded.

        Mean and variance are exact (merged per-shard moments). The mean norm and the norm
        quantiles are exact up to NORM_SAMPLE_SHARDS shards and estimated from that many evenly
        spaced shards beyond, so opening a terabyte cache reads megabytes, not gigabytes."""
        self.check_hookpoint(hookpoint)
        if hookpoint not in self._stats_cache:
            shards = self.committed_shards()
            g = lambda name: self.group[L.stats_path(hookpoint, name)]  # noqa: E731
            counts, means, m2s = g("count")[:], g("mean")[:], g("m2")[:]
            total = Moments(0, np.zeros(self.hookpoints[hookpoint]), np.zeros(self.hookpoints[hookpoint]))
            for s in shards:
                total = merge(total, Moments(int(counts[s]), means[s], m2s[s]))
            sample = shards
            if len(shards) > NORM_SAMPLE_SHARDS:
                sample = [shards[i] for i in np.linspace(0, len(shards) - 1, NORM_SAMPLE_SHARDS).round().astype(int)]
            norms = []
            for s in sample:
                rows = slice(s * self.layout.shard_rows, (s + 1) * self.layout.shard_rows)
                seqs = slice(s * self.shard_seqs, (s + 1) * self.shard_seqs)
                keep = self.row_mask(self.tokens[seqs].reshape(-1), DEFAULT_EXCLUDE)
                norms.append(self.group[L.norms_path(hookpoint)][rows][keep])
            self._stats_cache[hookpoint] = summarize(total, np.concatenate(norms) if norms else np.zeros(0))
        return self._stats_cache[hookpoint]

    def batches(self, hookpoint, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                exclude=DEFAULT_EXCLUDE, rank: int = 0, world_size: int = 1,
                dtype: torch.dtype = torch.float32, epochs: int | None = 1, resume: dict | None = None,
                with_rows: bool = False, shuffle_rows: int | None = None,
                read_concurrency: int | None = None) -> BatchStream:
        """Stream batches of rows; see ``sasa.store.reader.BatchStream`` for the order and state.

        ``read_concurrency``: chunk requests kept in flight (default: 4 for a local folder, 16
        for an object store URL, from bench/store_read.py; raise it for high-latency stores)."""
        hookpoints = [hookpoint] if isinstance(hookpoint, str) else list(hookpoint)
        for hp in hookpoints:
            self.check_hookpoint(hp)
        return BatchStream(self, hookpoints, batch_size, single=isinstance(hookpoint, str),
                           shuffle=shuffle, seed=seed, exclude=tuple(exclude), rank=rank,
                           world_size=world_size, dtype=dtype, epochs=epochs, resume=resume,
                           with_rows=with_rows, shuffle_rows=shuffle_rows,
                           read_concurrency=read_concurrency)

    def float_view(self, hookpoint: str):
        """A lazy [n_rows, d] float32 dask array of a hookpoint, decoded chunk by chunk
        (``sasa.store.lazy``; blocks of uncommitted shards raise when computed)."""
        from sasa.store.lazy import float_view
        return float_view(self, self.check_hookpoint(hookpoint))

    def to_xarray(self, *, committed_only: bool = True):
        """A lazy ``xarray.Dataset`` of the cache on one ``row`` dimension (``sasa.store.lazy``);
        rows of committed shards only unless ``committed_only=False``."""
        from sasa.store.lazy import to_xarray
        return to_xarray(self, committed_only=committed_only)

    @cached_property
    def size_bytes(self) -> int:
        """Bytes on disk (or in the bucket) under the cache's root."""
        return sum(self._listing.values())

    def __repr__(self) -> str:
        return (f"Cache({self.url!r}, hookpoints={self.hookpoints}, tokens={self.n_tokens:,}, "
                f"shards={len(self.committed_shards())}/{self.n_shards})")


def open_cache(url: str, storage_options: dict | None = None) -> Cache:
    """Open the cache at ``url`` (a path or any fsspec URL) read-only."""
    return Cache(url, open_group(str(url), "r", storage_options), storage_options)
