"""SAEs that travel: export ours to SAELens and sparsify folders, and read theirs for evaluation.

- ``export_sae(sae_dir, "saelens" | "sparsify", out)`` (``sasa export``);
- ``load_any_sae(folder)``: a sasa, SAELens or sparsify folder as our ``SAE`` (``sasa eval``);
- ``import sasa.interop.saelens_sasa`` registers the ``sasa`` architecture with SAELens.

Neither SAELens nor sparsify is needed for any of this except the registration; both are the
``interop`` extra. Names are imported on first use (no torch for ``sasa --help``).
"""

from importlib import import_module

_HOMES = {"export_sae": "export", "load_any_sae": "foreign", "LoadedSAE": "foreign", "sae_info": "foreign",
          "sae_format": "detect", "is_sae_folder": "detect"}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
