"""sasa: harvest transformer activations once, train many sparse autoencoders from the cache.

One import namespace over four packages with one job each (their folders sit at the repository
root; pyproject's ``package-dir`` maps them under ``sasa``):
- ``sasa.store``: the Zarr v3 activation cache (the contract between the others);
- ``sasa.harvester``: Ray-parallel forward passes that write caches;
- ``sasa.trainer``: SASA and SAE baselines streamed from a cache;
- ``sasa.analysis``: metrics, feature splitting, contexts and reports;
and this package itself: the ``sasa`` command, the error type every part raises, and the
pieces the others share (model loading, devices, dtypes).
"""

from pathlib import Path

from sasa.errors import SasaError

# Run from a source checkout (``python -m pytest`` in the repository root puts the root first on
# sys.path), this folder shadows an installed sasa and its subpackages are the root's siblings:
# look for them there. An installed wheel has them inside this folder and skips this.
_ROOT = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "store").is_dir() and (_ROOT / "store" / "layout.py").is_file():
    __path__.append(str(_ROOT))  # noqa: F821 (a package's __path__)

__all__ = ["SasaError"]
__version__ = "0.1.0"
