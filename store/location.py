"""Opening a zarr group at any fsspec URL, with errors a user can act on.

A plain path is a folder (zarr's LocalStore) and a URL (``s3://``, ``memory://``, ``gs://``...)
goes through fsspec (FsspecStore); either way the store is wrapped in
``sasa.store.remote.CacheStore``, which retries transient faults and turns storage failures
into one line. Credentials travel only in ``storage_options`` (or the environment) and are
never written anywhere by sasa.
"""

from __future__ import annotations

import enum
from pathlib import Path

import fsspec
import zarr

from sasa.errors import SasaError
from sasa.store.remote import fs_call, open_store, with_defaults


class Kind(enum.Enum):
    MISSING = "missing"
    EMPTY = "empty"
    SASA = "sasa"
    OTHER = "other"


def probe(url: str, storage_options: dict | None = None) -> Kind:
    """What lives at ``url``: nothing, an empty folder, a sasa cache, or something else."""
    fs, path = url_fs(url, storage_options)
    if not fs_call(url, "read", fs.exists, path):
        bucket = path.strip("/").split("/", 1)[0]
        if _has_buckets(fs) and bucket != path.strip("/") and not fs_call(url, "read", fs.exists, bucket):
            raise SasaError(f"bucket {bucket!r} of {url} does not exist: create it, or fix the URL")
        return Kind.MISSING
    if not fs_call(url, "read", fs.isdir, path):
        return Kind.OTHER
    if not fs_call(url, "read", fs.ls, path, detail=False):
        return Kind.EMPTY
    try:
        group = zarr.open_group(store=open_store(url, True, storage_options), mode="r")
    except SasaError:
        raise
    except Exception as err:
        _refuse_damaged_root(url, fs, path, err)
        return Kind.OTHER
    return Kind.SASA if "sasa" in group.attrs else Kind.OTHER


def _refuse_damaged_root(url: str, fs, path: str, err: Exception) -> None:
    """A root zarr.json that exists but does not parse is damage, not a foreign folder."""
    import json
    meta = path.rstrip("/") + "/zarr.json"
    if not fs_call(url, "read", fs.exists, meta):
        return
    try:
        json.loads(fs_call(url, "read", fs.cat_file, meta))
    except ValueError:
        raise SasaError(f"{url!r} looks like a cache whose root metadata {meta} is damaged "
                        f"({type(err).__name__}); restore that file from a copy, or re-harvest "
                        f"into a new location") from None


def _has_buckets(fs) -> bool:
    """Object stores whose first path component is a bucket that must exist beforehand."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    return bool(protocols & {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "r2", "oss"})


def open_group(url: str, mode: str, storage_options: dict | None = None) -> zarr.Group:
    """Open an existing sasa cache's group, or explain why ``url`` is not one."""
    kind = probe(url, storage_options)
    if kind in (Kind.MISSING, Kind.EMPTY):
        raise SasaError(f"no sasa cache at {url!r} (the location {'does not exist' if kind is Kind.MISSING else 'is empty'}); "
                        f"check the URL, or create one with `sasa harvest --out {url}`")
    if kind is Kind.OTHER:
        raise SasaError(f"{url!r} is not a sasa cache (no zarr group with 'sasa' attributes there); "
                        f"point at the cache's root folder")
    return zarr.open_group(store=open_store(url, mode == "r", storage_options), mode=mode)


def create_group(url: str, attributes: dict, storage_options: dict | None = None) -> zarr.Group:
    """A new, empty group at ``url`` holding ``attributes``."""
    return zarr.open_group(store=open_store(url, False, storage_options), mode="w",
                           attributes=attributes)


def url_fs(url: str, storage_options: dict | None = None):
    """(filesystem, path) for ``url``: used for sizes on disk and removal."""
    try:
        return fsspec.core.url_to_fs(str(url), **(with_defaults(url, storage_options) or {}))
    except (ImportError, ValueError, TypeError) as err:
        raise SasaError(f"cannot use {url!r}: {err}; install the filesystem's package (e.g. s3fs) "
                        f"or check the URL and --storage-options") from None


def local_root(url: str, storage_options: dict | None = None) -> Path | None:
    """The folder of ``url`` on a local disk, or None on any other store (object stores,
    memory://): where ``sasa.store.direct`` reads and writes chunk objects itself."""
    fs, root = url_fs(url, storage_options)
    return Path(root) if "file" in fs.protocol else None
