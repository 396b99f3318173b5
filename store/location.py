"""Opening a zarr group at any fsspec URL, with errors a user can act on.

zarr resolves a plain path to a LocalStore and a URL (``s3://``, ``memory://``, ``gs://``...)
to an FsspecStore. Credentials travel only in ``storage_options`` (or the environment) and are
never written anywhere by sasa.
"""

from __future__ import annotations

import enum

import fsspec
import zarr

from sasa.errors import SasaError


class Kind(enum.Enum):
    MISSING = "missing"
    EMPTY = "empty"
    SASA = "sasa"
    OTHER = "other"


def probe(url: str, storage_options: dict | None = None) -> Kind:
    """What lives at ``url``: nothing, an empty folder, a sasa cache, or something else."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as err:
        raise SasaError(f"cannot use {url!r}: {err}; install the filesystem's package (e.g. s3fs) "
                        f"or check the URL") from None
    try:
        if not fs.exists(path):
            return Kind.MISSING
        if not fs.isdir(path):
            return Kind.OTHER
        entries = fs.ls(path, detail=False)
    except PermissionError as err:
        raise SasaError(f"no permission to read {url!r} ({err}); check the credentials") from None
    except OSError as err:
        raise SasaError(f"cannot reach {url!r}: {err}") from None
    if not entries:
        return Kind.EMPTY
    try:
        group = zarr.open_group(url, mode="r", storage_options=storage_options)
    except Exception:
        return Kind.OTHER
    return Kind.SASA if "sasa" in group.attrs else Kind.OTHER


def open_group(url: str, mode: str, storage_options: dict | None = None) -> zarr.Group:
    """Open an existing sasa cache's group, or explain why ``url`` is not one."""
    kind = probe(url, storage_options)
    if kind in (Kind.MISSING, Kind.EMPTY):
        raise SasaError(f"no sasa cache at {url!r} (the location {'does not exist' if kind is Kind.MISSING else 'is empty'}); "
                        f"check the URL, or create one with `sasa harvest --out {url}`")
    if kind is Kind.OTHER:
        raise SasaError(f"{url!r} is not a sasa cache (no zarr group with 'sasa' attributes there); "
                        f"point at the cache's root folder")
    return zarr.open_group(url, mode=mode, storage_options=storage_options)


def url_fs(url: str, storage_options: dict | None = None):
    """(filesystem, path) for ``url``: used for sizes on disk and removal."""
    return fsspec.core.url_to_fs(url, **(storage_options or {}))
