"""The activation cache: a Zarr v3 group on any fsspec URL (format in docs/FORMAT.md).

``create_cache`` returns a writer that commits deterministic shards; ``open_cache`` returns a
read-only ``Cache`` that streams shuffled batches, exact statistics and tokens.

Names are imported on first use, so ``from sasa.store import cli`` (the ``sasa`` command's
start-up) does not pay for zarr and numpy.
"""

from importlib import import_module

_HOMES = {
    "Cache": "cache", "open_cache": "cache", "FORMAT_VERSION": "layout", "Layout": "layout",
    "Batch": "reader", "BatchStream": "reader", "shuffle_quality": "reader",
    "HookpointStats": "stats", "CacheWriter": "writer", "ShardResult": "writer",
    "create_cache": "writer",
}
__all__ = [*_HOMES, "SasaError"]

from sasa.errors import SasaError  # noqa: E402


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
