"""sasa: harvest transformer activations once, train many sparse autoencoders from the cache.

The distribution holds five packages with one job each:
- ``store``: the Zarr v3 activation cache (the contract between the others);
- ``harvester``: Ray-parallel forward passes that write caches;
- ``trainer``: SASA and SAE baselines streamed from a cache;
- ``analysis``: metrics, feature splitting, contexts and reports;
- ``sasa``: the ``sasa`` command and the error type every part raises.
"""

from sasa.errors import SasaError

__all__ = ["SasaError"]
__version__ = "0.1.0"
