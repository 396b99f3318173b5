"""The activation cache: a Zarr v3 group on any fsspec URL (format in docs/FORMAT.md).

``create_cache`` returns a writer that commits deterministic shards; ``open_cache`` returns a
read-only ``Cache`` that streams shuffled batches, exact statistics and tokens.
"""

from sasa.errors import SasaError
from store.cache import Cache, open_cache
from store.layout import FORMAT_VERSION, Layout
from store.reader import Batch, BatchStream, shuffle_quality
from store.stats import HookpointStats
from store.writer import CacheWriter, ShardResult, create_cache

__all__ = [
    "FORMAT_VERSION", "Batch", "BatchStream", "Cache", "CacheWriter", "HookpointStats", "Layout",
    "SasaError", "ShardResult", "create_cache", "open_cache", "shuffle_quality",
]
