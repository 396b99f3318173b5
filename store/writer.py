"""Writing a cache: deterministic shards and a commit protocol.

A shard is written in this order: its data objects (tokens, activations, per-row norms, the
shard's moments; concurrently), its extra rows, its checksums, and last its ``shards/committed``
flag. Each of these is a separate zarr chunk object that belongs to this shard alone, so workers
never write the same object and a crash at any point leaves at worst an uncommitted shard,
which readers ignore and a rerun rewrites with the same bytes (local objects are written to a
temporary and renamed, so a crash leaves no torn object under a real key). Rewriting a
*committed* shard is a no-op when the content is identical (a retried task) and an error when
it differs (a non-deterministic producer, or a config change that the fingerprint did not
catch).

Where a shard's write time goes (``python bench/harvest.py --stages``, 64 MiB bf16 shards at d =
4096 on this project's 2-core VM; tables in bench/RESULTS_harvest.md), costliest first: the
activations' write (1.3-2.0 GB/s from one thread to local disk), the statistics pass (5.1-5.3
GB/s on one thread, compiled; 1.5 as the numpy calls it replaced), the CRC-32 (zlib-ng, 13 GB/s;
zlib's 3.7). The activations and norms bypass zarr's codec pipeline (``sasa.store.direct``:
their chunk objects are plain bytes), because through zarr every write of a process queued on
its one event-loop thread, so two shards written from two threads gained nothing there. On a
local disk they go out through one queue per writer (``DISK_THREADS`` threads, in the order the
shards queued them): when each shard's thread wrote its own, two shards shared the disk,
finished together, and both left it idle while they took their next checksums and statistics; a
trace at d = 4096 (``python bench/harvest.py --trace``) found the disk busy 59-78% of a 4 GB run
that way and 88-95% of 2-4 GB runs with the queue, where two threads run 1.11-1.18x faster than
one. The writer against plain Python's ``O_DIRECT`` writes of the same bytes, 10 GB at d = 4096
(``python bench/harvest.py [--ceiling-only]``, five runs): 0.90-1.23; into memory:// 1.6-3.1
GB/s, depending on numpy's huge-page advice (the memory store copies each chunk into fresh
memory).
"""

from __future__ import annotations

import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor, wait
from typing import NamedTuple

import numpy as np
import zarr
from zarr.core.sync import sync

from sasa.errors import SasaError
from sasa.store import direct, extras
from sasa.store import layout as L
from sasa.store.convert import to_storage
from sasa.store.location import Kind, create_group, local_root, open_group, probe, url_fs
from sasa.store.masks import special_mask
from sasa.store.options import DEFAULT_EXCLUDE
from sasa.store.remote import fs_call, open_store
from sasa.store.stats import summarize_shard, warm_up


#: Threads that write a local cache's chunk objects (``CacheWriter._disk_queue``), shared by the
#: shards a process writes at once. One queue keeps the disk busy while the shards' threads do
#: their CPU work: each shard's objects go out in turn instead of two shards sharing the disk,
#: finishing together and then both leaving it idle for their checksums and statistics.
DISK_THREADS = 2


class ShardResult(NamedTuple):
    index: int
    rows: int
    """Rows written (shard_seqs * ctx_len)."""
    bytes: int
    """Activation bytes written over all hookpoints."""
    skipped: bool
    """True when the shard was already committed with the same content."""


def _json_roundtrip(attrs: dict) -> dict:
    try:
        return json.loads(json.dumps(attrs))
    except (TypeError, ValueError) as err:
        raise SasaError(f"cache attrs must be JSON-serialisable: {err}") from None


class CacheWriter:
    """Writes and commits the shards of one cache (create with ``create_cache``)."""

    def __init__(self, url: str, group: zarr.Group, layout: L.Layout, storage_options: dict | None):
        self.url = url
        self.layout = layout
        self.group = group
        self.attrs = {k: v for k, v in group.attrs.items() if k != "sasa"}
        self.storage_options = storage_options
        self.special_ids = self.attrs.get("special_token_ids", {})
        # Every chunk is stored, even one that equals the fill value (zarr skips those by
        # default): readers treat an absent chunk of a committed shard as damage.
        every = lambda path: group[path].with_config({"write_empty_chunks": True})  # noqa: E731
        self._tokens = every(L.TOKENS)
        self._committed = group[L.COMMITTED]
        self._crc = group[L.CHECKSUMS]
        self._acts = {hp: every(L.acts_path(hp)) for hp in layout.hookpoints}
        self._norms = {hp: every(L.norms_path(hp)) for hp in layout.hookpoints}
        self._stats = {hp: {name: group[L.stats_path(hp, name)] for name in ("count", "mean", "m2")}
                       for hp in layout.hookpoints}
        self._local_root = local_root(url, storage_options)
        """The cache's folder on a local disk (None on any other store)."""
        self._disk: tuple[int, ThreadPoolExecutor] | None = None
        """(process id, the threads that write local chunk objects): ``_disk_queue``."""
        warm_up(layout.dtype)  # the statistics pass, loaded while the producer starts
        self.direct_writes = True
        """Store whole uncompressed chunks as their objects (``sasa.store.direct``); False sends
        every object through zarr's ``setitem`` (the same bytes, slower: the reference path the
        tests and ``bench/harvest.py --stages`` compare against)."""
        self.direct_io = True
        """Write a local chunk object past the page cache (``O_DIRECT``) when the file system
        and the chunk's size (a multiple of 4 KiB) allow it (``sasa.store.direct``): a harvest
        writes each byte once and never reads it back, so caching it only costs memory and time
        (bench/RESULTS_harvest.md). False writes through the page cache."""

    @property
    def n_shards(self) -> int:
        return self.layout.n_shards

    def committed(self) -> np.ndarray:
        """[n_shards] bool: which shards are committed now."""
        return self._committed[:].astype(bool)

    def pending_shards(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.committed())]

    def remove_stray_temporaries(self) -> int:
        """Delete the temporary files that a writer killed mid-write leaves on a local disk
        (zarr's LocalStore writes ``<key>.<uuid>.partial`` and renames it). Call it only when
        no writer is running, e.g. once every shard is committed; object stores have none.
        Returns how many were removed."""
        if self._local_root is None:
            return 0
        fs, root = url_fs(self.url, self.storage_options)
        stray = [p for p in fs_call(self.url, "read", fs.find, root) if p.endswith(".partial")]
        for p in stray:
            fs_call(self.url, "write", fs.rm_file, p)
        return len(stray)

    def add_row_array(self, name: str, width: int, dtype) -> None:
        """Declare ``extra/<name>``, [n_rows, width], filled per shard by ``write_shard``."""
        extras.require_row_array(self.group, self.layout, name, width, dtype)

    def put_array(self, name: str, data) -> None:
        """Write the whole array ``extra/<name>`` once (before the shards that depend on it)."""
        extras.put_array(self.group, name, data)

    def write_shard(self, index: int, tokens, acts: dict, extra: dict | None = None) -> ShardResult:
        """Write shard ``index`` and commit it.

        tokens: [shard_seqs, ctx_len] integers; acts: {hookpoint: [shard_seqs*ctx_len, d]}
        float numpy arrays or torch tensors (bf16 allowed); extra: {name: [shard_seqs*ctx_len,
        width]} rows of declared extra arrays (``sasa.store.extras``), written before the commit.
        """
        lay = self.layout
        lay.check_shard(index)
        tokens = self._check_tokens(tokens)
        stored = self._check_acts(acts)
        extra_rows = extras.check_rows(self.group, lay, extra)
        crc = np.array([L.crc32(tokens)] + [L.crc32(stored[hp]) for hp in lay.hookpoints],
                       dtype=np.uint32)
        nbytes = sum(a.nbytes for a in stored.values())
        if self._committed[index]:
            if np.array_equal(self._crc[index], crc):
                return ShardResult(index, lay.shard_rows, nbytes, skipped=True)
            raise SasaError(
                f"shard {index} of {self.url} is already committed with different content; the "
                f"producer is not deterministic or its config changed (rerun with --overwrite to rebuild)")

        keep = ~special_mask(tokens.reshape(-1), self.special_ids, DEFAULT_EXCLUDE)
        summaries = {hp: summarize_shard(data, lay.dtype, keep) for hp, data in stored.items()}
        for hp, summary in summaries.items():
            if summary.non_finite:
                raise SasaError(f"acts[{hp!r}] hold {summary.non_finite} NaN/Inf values (as {lay.dtype}); nothing "
                                f"was written. If float16 overflowed, harvest with --dtype bf16 or fp32")

        rows = slice(index * lay.shard_rows, (index + 1) * lay.shard_rows)
        writes = [(self._tokens, slice(index * lay.shard_seqs, (index + 1) * lay.shard_seqs), tokens)]
        for hp, data in stored.items():
            m = summaries[hp].moments
            writes += [(self._acts[hp], rows, data), (self._norms[hp], rows, summaries[hp].norms),
                       (self._stats[hp]["count"], index, m.count),
                       (self._stats[hp]["mean"], index, m.mean), (self._stats[hp]["m2"], index, m.m2)]
        self._write_objects(writes)  # the shard's objects, all requests in flight at once
        extras.write_rows(self.group, lay, index, extra_rows)
        self._crc[index] = crc
        self._committed[index] = 1  # the commit: readers see the shard from here on
        return ShardResult(index, lay.shard_rows, nbytes, skipped=False)

    def _check_tokens(self, tokens) -> np.ndarray:
        lay = self.layout
        if hasattr(tokens, "numpy"):
            tokens = tokens.detach().cpu().numpy()
        tokens = np.asarray(tokens)
        if tokens.shape != (lay.shard_seqs, lay.ctx_len):
            raise SasaError(f"tokens have shape {tokens.shape}; this cache expects "
                            f"[shard_seqs, ctx_len] = {[lay.shard_seqs, lay.ctx_len]}")
        if tokens.dtype.kind not in "iu":
            raise SasaError(f"tokens have dtype {tokens.dtype}; pass integer token ids")
        if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.int32).max):
            raise SasaError("token ids must lie in [0, 2**31); got ids outside that range")
        return np.ascontiguousarray(tokens, dtype=np.int32)

    def _check_acts(self, acts: dict) -> dict[str, np.ndarray]:
        lay = self.layout
        if set(acts) != set(lay.hookpoints):
            raise SasaError(f"acts have hookpoints {sorted(acts)}; this cache expects {sorted(lay.hookpoints)}")
        stored = {}
        for hp, d in lay.hookpoints.items():
            shape = tuple(acts[hp].shape)
            if shape != (lay.shard_rows, d):
                raise SasaError(f"acts[{hp!r}] has shape {list(shape)}; this cache expects "
                                f"[shard_seqs*ctx_len, d] = {[lay.shard_rows, d]}")
            stored[hp] = to_storage(acts[hp], lay.dtype, f"acts[{hp!r}]")
        return stored


    def _write_objects(self, writes: list) -> None:
        """``array[selection] = value`` for every (array, selection, value). Whole uncompressed
        chunks (a shard's activations and norms unless ``shard_objects``) are stored as their
        objects directly (``sasa.store.direct``): on local disk by the writer's disk queue
        (``_disk_queue``) while the rest go through zarr, on any other store beside the rest on
        zarr's loop."""
        root = self._local_root
        puts, rest = [], []
        for array, sel, value in writes:
            plain = self.direct_writes and isinstance(sel, slice)
            chunks = direct.chunk_puts(array, sel, value) if plain else None
            if chunks is None:
                rest.append((array, sel, value))
            else:
                puts += chunks
        if root is None:
            _write_all(rest, [direct.put_store(self.group.store, p) for p in puts])
            return
        disk = self._disk_queue()
        done = [disk.submit(direct.put_local, self.url, root, p, self.direct_io) for p in puts]
        try:
            _write_all(rest)
        finally:
            wait(done)  # the puts read the caller's arrays: none may outlive this call
        for put in done:
            put.result()

    def _disk_queue(self) -> ThreadPoolExecutor:
        """The threads that write this writer's local chunk objects, shared by every shard it
        writes, in the order they were queued (made again in a forked child, which has none of
        the parent's threads)."""
        if self._disk is None or self._disk[0] != os.getpid():
            pool = ThreadPoolExecutor(DISK_THREADS, thread_name_prefix="sasa-disk")
            self._disk = (os.getpid(), pool)
        return self._disk[1]


def _write_all(writes: list, also: list = ()) -> None:
    """``array[selection] = value`` for every (array, selection, value), and the coroutines
    ``also``, concurrently on zarr's event loop: one round trip for a shard's objects instead of
    one per array (the object store's latency is paid once)."""
    async def put_all():
        await asyncio.gather(*(a.async_array.setitem(sel, value) for a, sel, value in writes), *also)
    sync(put_all())


def _ensure_arrays(group: zarr.Group, lay: L.Layout) -> None:
    """Create the cache's arrays that do not exist yet (idempotent: a crash during creation
    is repaired by the next open)."""

    def require(path, shape, chunks, dtype, shards=None, compressors=None):
        if path in group:
            return
        try:
            group.create_array(path, shape=shape, chunks=chunks, shards=shards, dtype=dtype,
                               compressors=compressors, fill_value=0,
                               dimension_names=L.dims(path))
        except zarr.errors.ContainsArrayError:
            pass  # a creator of the same cache made it a moment ago: the same metadata

    n_hp = len(lay.hookpoints)
    require(L.TOKENS, (lay.n_seq, lay.ctx_len), (lay.chunk_seqs, lay.ctx_len), "int32",
            compressors="auto")  # token ids compress (bench/store_micro.py) and are read rarely
    for hp, d in lay.hookpoints.items():
        shards = (lay.shard_rows, d) if lay.shard_objects else None
        require(L.acts_path(hp), (lay.n_rows, d), (lay.chunk_rows, d), lay.storage_dtype, shards)
        require(L.norms_path(hp), (lay.n_rows,), (lay.chunk_rows,), "float32")
        require(L.stats_path(hp, "count"), (lay.n_shards,), (1,), "int64")
        require(L.stats_path(hp, "mean"), (lay.n_shards, d), (1, d), "float64")
        require(L.stats_path(hp, "m2"), (lay.n_shards, d), (1, d), "float64")
    require(L.CHECKSUMS, (lay.n_shards, 1 + n_hp), (1, 1 + n_hp), "uint32")
    require(L.COMMITTED, (lay.n_shards,), (1,), "uint8")


def create_cache(url: str, *, hookpoints: dict[str, int], ctx_len: int, n_seq: int,
                 shard_seqs: int, dtype: str = "bfloat16", storage_options: dict | None = None,
                 attrs: dict | None = None, chunk_seqs: int | None = None,
                 shard_objects: bool = False, overwrite: bool = False) -> CacheWriter:
    """Create a cache at ``url`` and return its writer; reopen it (resume) if the same cache is
    already there.

    ``attrs`` is the producer's metadata (model, tokenizer, dataset, config, and
    ``special_token_ids = {"bos": [...], "pad": [...]}`` for the read-time masks); it must not
    hold secrets. A different layout or attrs at ``url`` is refused with the differences
    listed, unless ``overwrite`` replaces the old cache.
    """
    lay = L.Layout.build(hookpoints, ctx_len, n_seq, shard_seqs, dtype, chunk_seqs, shard_objects)
    attrs = _json_roundtrip(attrs or {})
    if "sasa" in attrs:
        raise SasaError("attrs key 'sasa' is reserved for the cache layout; rename it")
    sasa_attrs = {**lay.to_attrs(), "fingerprint": L.fingerprint([lay.to_attrs(), attrs])}

    kind = probe(url, storage_options)
    while kind in (Kind.MISSING, Kind.EMPTY) or (kind is Kind.OTHER and _claim_of(url, storage_options)):
        kind = _create(url, lay, attrs, sasa_attrs, storage_options)
        if kind is None:
            return CacheWriter(url, open_group(url, "r+", storage_options), lay, storage_options)
    if kind is Kind.OTHER:
        raise SasaError(f"{url!r} holds files that are not a sasa cache; choose a new or empty "
                        f"location (sasa never deletes what it did not write)")
    if kind is Kind.SASA:
        group = open_group(url, "r+", storage_options)
        old = dict(group.attrs)
        if old["sasa"].get("fingerprint") == sasa_attrs["fingerprint"]:
            _ensure_arrays(group, lay)
            return CacheWriter(url, group, lay, storage_options)
        if not overwrite:
            old_cfg = {**{k: v for k, v in old.items() if k != "sasa"}, **old["sasa"]}
            new_cfg = {**attrs, **sasa_attrs}
            diffs = [d for d in L.config_diff(old_cfg, new_cfg) if not d.startswith("fingerprint")]
            raise SasaError(f"{url!r} holds a cache with a different config ({'; '.join(diffs) or 'fingerprint'}); "
                            f"rerun with the same settings to resume, or pass --overwrite to replace it")
        fs, path = url_fs(url, storage_options)
        fs_call(url, "write", fs.rm, path, recursive=True)
    group = create_group(url, {**attrs, "sasa": sasa_attrs}, storage_options)
    _ensure_arrays(group, lay)
    return CacheWriter(url, group, lay, storage_options)


#: The creation claim: an object written with exclusive create (O_EXCL on a disk, If-None-Match
#: on S3, mode "xb" on fsspec's memory store) before anything else; removed once the cache exists.
CLAIM = ".sasa-creating"
#: Seconds a creator of a *different* cache waits for the claim's owner to finish.
CREATE_WAIT_S = 20.0


def _claim_key(url: str, storage_options: dict | None):
    fs, path = url_fs(url, storage_options)
    return fs, f"{path.rstrip('/')}/{CLAIM}"


def _claim_of(url: str, storage_options: dict | None) -> str | None:
    """The fingerprint in the creation claim at ``url``, or None when there is none."""
    fs, key = _claim_key(url, storage_options)
    fs.invalidate_cache()
    try:
        return json.loads(fs.cat_file(key)).get("fingerprint", "?")
    except FileNotFoundError:
        return None
    except ValueError:
        return "?"


def _try_claim(url: str, fingerprint: str, storage_options: dict | None) -> bool:
    """Write the claim if nobody has: True for the one creator that did."""
    fs, key = _claim_key(url, storage_options)
    data = json.dumps({"fingerprint": fingerprint}).encode()
    if "file" in fs.protocol:
        os.makedirs(os.path.dirname(key), exist_ok=True)
        try:
            fd = os.open(key, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    if "s3" in fs.protocol:
        _require_conditional_put()
    try:
        with fs.open(key, "xb") as f:
            f.write(data)
    except FileExistsError:
        return False
    return True


def _require_conditional_put() -> None:
    """An S3 claim is exclusive only if botocore knows PutObject's ``IfNoneMatch``: older ones
    drop the argument without a word (aiobotocore < 2.14), and two creators would both win."""
    import botocore.session
    model = botocore.session.get_session().get_service_model("s3").operation_model("PutObject")
    if "IfNoneMatch" not in model.input_shape.members:
        raise SasaError(f"botocore {botocore.__version__} cannot create S3 objects exclusively "
                        "(no If-None-Match on PutObject), so two runs could write one cache; "
                        "upgrade: pip install 'aiobotocore>=2.14' 's3fs>=2025.7'")


def _create(url: str, lay: L.Layout, attrs: dict, sasa_attrs: dict,
            storage_options: dict | None) -> Kind | None:
    """Create the cache at an empty ``url`` so that racing creators cannot mix two caches.

    The claim decides: its winner, and any creator of the *same* cache (same fingerprint, so
    identical metadata), create the group and arrays; a creator of a different cache waits for
    the winner to finish and then gets the usual config-difference error. Returns None once the
    cache exists, or the Kind the caller continues with."""
    import time
    fingerprint = sasa_attrs["fingerprint"]
    if not _try_claim(url, fingerprint, storage_options):
        other = _claim_of(url, storage_options)
        if other not in (fingerprint, None):
            deadline = time.monotonic() + CREATE_WAIT_S
            while time.monotonic() < deadline:
                if _claim_of(url, storage_options) is None:
                    return probe(url, storage_options)  # the other cache exists now
                time.sleep(0.1)
            fs, key = _claim_key(url, storage_options)
            raise SasaError(f"{url!r} is being created by another process with a different config "
                            f"(claim {key}, fingerprint {other}); if no other process is creating "
                            f"it, an earlier creation was interrupted: delete {key} and rerun")
    try:
        group = zarr.create_group(store=open_store(url, False, storage_options),
                                  attributes={**attrs, "sasa": sasa_attrs}, overwrite=False)
    except zarr.errors.ContainsGroupError:
        group = zarr.open_group(store=open_store(url, False, storage_options), mode="r+")
        if group.attrs.get("sasa", {}).get("fingerprint") != fingerprint:
            return Kind.SASA  # another cache won: the caller reports the difference
    _ensure_arrays(group, lay)
    fs, key = _claim_key(url, storage_options)
    try:
        fs.rm_file(key)
    except FileNotFoundError:
        pass  # a creator of the same cache removed it first
    return None
