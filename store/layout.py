"""The cache format: names, shapes and the arithmetic that maps shards to rows and chunks.

Everything a writer and a reader must agree on lives here, so the two cannot drift apart.
docs/FORMAT.md describes the same layout for people; keep the two in step.

One token axis is shared by every array: row ``r`` of ``acts/<hookpoint>`` is position
``r % ctx_len`` of sequence ``r // ctx_len``. A *shard* is the unit of work and of commit
(``shard_seqs`` sequences); a *chunk* is the unit of reading (``chunk_seqs`` sequences, a
divisor of ``shard_seqs``), so a shard always covers whole chunks and a retried shard rewrites
exactly its own objects.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
from zlib_ng import zlib_ng

from sasa.dtypes import canonical_dtype
from sasa.errors import SasaError

#: 2: every array names its dimensions (zarr v3 ``dimension_names``; see ``dims``), so
#: ``xarray.open_zarr`` opens a cache. Version 1 caches (no names) read the same.
FORMAT_VERSION = 2

#: Storage dtypes. bfloat16 has no numpy dtype: its bits are stored as uint16 and the attrs
#: name the real dtype, so plain zarr readers still get every bit.
STORAGE_DTYPES = {"bfloat16": "uint16", "float16": "float16", "float32": "float32"}

#: Default chunk size: ~16 MiB of activations per chunk object. Whole chunks read in random
#: order run near the disk's sequential rate, while much smaller objects pay per-request cost
#: on S3 (see bench/RESULTS.md).
DEFAULT_CHUNK_BYTES = 16 << 20

# Array paths inside the group.
TOKENS = "tokens"
COMMITTED = "shards/committed"
CHECKSUMS = "shards/crc32"


def crc32(data) -> int:
    """The checksum stored in ``shards/crc32``: CRC-32 (zlib's polynomial) of an array's C-order
    bytes, computed by zlib-ng: the same values as the standard library's ``zlib.crc32``, at
    several times its rate (``python bench/harvest.py --stages`` measures both; figures in
    bench/RESULTS_harvest.md)."""
    return zlib_ng.crc32(data)


def acts_path(hookpoint: str) -> str:
    return f"acts/{hookpoint}"


def norms_path(hookpoint: str) -> str:
    return f"norms/{hookpoint}"


def stats_path(hookpoint: str, name: str) -> str:
    return f"stats/{hookpoint}/{name}"


def dims(path: str) -> tuple[str, ...]:
    """The dimension names of the array at ``path``: one token axis ``row`` shared by acts and
    norms, ``seq`` x ``pos`` for tokens, ``shard`` for per-shard arrays, and a width axis
    ``d_<hookpoint>`` per hookpoint (hookpoints may differ in width)."""
    if path == TOKENS:
        return ("seq", "pos")
    if path == COMMITTED:
        return ("shard",)
    if path == CHECKSUMS:
        return ("shard", "crc")
    kind, _, rest = path.partition("/")
    if kind == "stats":
        hp, _, name = rest.rpartition("/")
        return ("shard",) if name == "count" else ("shard", f"d_{hp}")
    if kind == "acts":
        return ("row", f"d_{rest}")
    if kind == "norms":
        return ("row",)
    raise SasaError(f"{path!r} is not an array of the cache layout")


def fingerprint(obj) -> str:
    """A short, stable hash of a JSON-able object (keys sorted)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every key that differs (nested dicts as ``a.b``), sorted."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {json.dumps(a, default=str)} -> {json.dumps(b, default=str)}")
    return diffs


@dataclass(frozen=True)
class Layout:
    """The shape of one cache; stored under the group attribute ``sasa``."""

    hookpoints: dict[str, int]
    """Hookpoint name -> activation width d."""
    ctx_len: int
    """Tokens per sequence."""
    n_seq: int
    """Sequences planned; ``n_seq * ctx_len`` rows per array once complete."""
    shard_seqs: int
    """Sequences per shard: the unit of writing and committing."""
    chunk_seqs: int
    """Sequences per chunk: the unit of reading; divides ``shard_seqs``."""
    dtype: str = "bfloat16"
    """Activation dtype: bfloat16 (stored as uint16 bits), float16 or float32."""
    shard_objects: bool = False
    """Pack each shard's chunks of an array into one object with zarr's sharding codec."""
    format_version: int = FORMAT_VERSION
    """Version of this layout; readers refuse versions newer than they know."""

    def __post_init__(self):
        if not self.hookpoints:
            raise SasaError("a cache needs at least one hookpoint, e.g. hookpoints={'resid_post.3': 768}")
        for name, d in self.hookpoints.items():
            if not name or "/" in name or name.startswith("__") or name in (".", ".."):
                raise SasaError(f"hookpoint name {name!r} cannot be a zarr node name; avoid '/' and leading '__'")
            if int(d) <= 0:
                raise SasaError(f"hookpoint {name!r} has width {d}; widths must be positive")
        for key in ("ctx_len", "n_seq", "shard_seqs", "chunk_seqs"):
            if int(getattr(self, key)) <= 0:
                raise SasaError(f"{key} must be positive, got {getattr(self, key)}")
        if self.n_seq % self.shard_seqs:
            raise SasaError(
                f"n_seq={self.n_seq} is not a multiple of shard_seqs={self.shard_seqs}; "
                f"zarr stores partial edge chunks at full size, so round n_seq to whole shards")
        if self.shard_seqs % self.chunk_seqs:
            raise SasaError(f"chunk_seqs={self.chunk_seqs} must divide shard_seqs={self.shard_seqs}")
        canonical_dtype(self.dtype, "storage dtype")

    @classmethod
    def build(cls, hookpoints, ctx_len, n_seq, shard_seqs, dtype="bfloat16", chunk_seqs=None,
              shard_objects=False) -> "Layout":
        dtype = canonical_dtype(dtype, "storage dtype")
        # Checked before the chunk arithmetic below: a zero or fractional size is one line here,
        # not a ZeroDivisionError there nor a silent int() truncation.
        sizes = {"ctx_len": ctx_len, "n_seq": n_seq, "shard_seqs": shard_seqs,
                 **({"chunk_seqs": chunk_seqs} if chunk_seqs is not None else {}),
                 **{f"width of hookpoint {k!r}": v for k, v in dict(hookpoints).items()}}
        for key, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, (int, np.integer, float)) \
                    or not 1 <= value < 2**62 or value != int(value):
                raise SasaError(f"{key} must be a whole number >= 1, got {value!r}")
        hookpoints = {str(k): int(v) for k, v in hookpoints.items()}
        if chunk_seqs is None:
            chunk_seqs = auto_chunk_seqs(hookpoints, ctx_len, shard_seqs, dtype)
        return cls(hookpoints, int(ctx_len), int(n_seq), int(shard_seqs), int(chunk_seqs),
                   dtype, bool(shard_objects))

    @classmethod
    def from_attrs(cls, attrs: dict) -> "Layout":
        return cls(**attrs)

    def to_attrs(self) -> dict:
        return asdict(self)

    @property
    def n_shards(self) -> int:
        return self.n_seq // self.shard_seqs

    @property
    def n_rows(self) -> int:
        return self.n_seq * self.ctx_len

    @property
    def shard_rows(self) -> int:
        return self.shard_seqs * self.ctx_len

    @property
    def chunk_rows(self) -> int:
        return self.chunk_seqs * self.ctx_len

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_seqs // self.chunk_seqs

    @property
    def storage_dtype(self) -> np.dtype:
        return np.dtype(STORAGE_DTYPES[self.dtype])

    def shard_chunks(self, shard: int) -> range:
        return range(shard * self.chunks_per_shard, (shard + 1) * self.chunks_per_shard)

    def check_shard(self, index: int) -> None:
        if not 0 <= index < self.n_shards:
            raise SasaError(f"shard {index} is out of range; this cache has shards 0..{self.n_shards - 1}")

    # -- chunk objects (zarr's default chunk keys: ``<array>/c/<i>/<j>``) ---------------
    def data_arrays(self) -> list[str]:
        """Arrays whose rows belong to shards: tokens, and acts and norms of every hookpoint."""
        return [TOKENS, *(f(hp) for hp in self.hookpoints for f in (acts_path, norms_path))]

    def chunk_keys(self, shard: int) -> list[str]:
        """Every chunk object of one shard, over all data arrays."""
        keys = [f"{TOKENS}/c/{c}/0" for c in self.shard_chunks(shard)]
        for hp in self.hookpoints:
            acts = [shard] if self.shard_objects else self.shard_chunks(shard)
            keys += [f"{acts_path(hp)}/c/{c}/0" for c in acts]
            keys += [f"{norms_path(hp)}/c/{c}" for c in self.shard_chunks(shard)]
        return keys

    def shard_of_key(self, key: str) -> int | None:
        """The shard a data array's chunk object belongs to; None for any other key."""
        array, sep, rest = key.rpartition("/c/")
        if not sep or array not in self.data_arrays():
            return None
        first = rest.split("/", 1)[0]
        if not first.isdigit():
            return None
        if self.shard_objects and array.startswith("acts/"):
            return int(first)
        return int(first) // self.chunks_per_shard


def auto_chunk_seqs(hookpoints: dict[str, int], ctx_len: int, shard_seqs: int, dtype: str) -> int:
    """The largest divisor of ``shard_seqs`` whose chunk of the widest hookpoint fits
    DEFAULT_CHUNK_BYTES (at least one sequence)."""
    row_bytes = max(hookpoints.values()) * np.dtype(STORAGE_DTYPES[dtype]).itemsize
    limit = max(1, DEFAULT_CHUNK_BYTES // (row_bytes * ctx_len))
    return max(c for c in range(1, shard_seqs + 1) if shard_seqs % c == 0 and c <= limit)

