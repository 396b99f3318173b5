"""Load any SAE folder (ours, SAELens, sparsify) as one of our ``SAE`` modules, for evaluation.

Every analysis (``sasa eval``, absorption, splitting, splice-in, the report) works on our
``SAE``'s interface: ``forward`` -> codes [B, G, r] and reconstruction, ``decoder_GDR``,
``effective_ranks``. Rather than a second interface, foreign SAEs are converted into that class
on load (SAELens ``jumprelu``/``batchtopk`` into a subclass that thresholds the codes), so they
are scored by the same code with r = 1, where the geometry metrics reduce to their per-latent
forms. Conversion reads config JSON and safetensors directly: neither SAELens nor sparsify is
imported, and loading costs what ``load_sae`` costs.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from sasa.errors import SasaError
from sasa.interop.detect import sae_format


class LoadedSAE(NamedTuple):
    """An SAE of any known format, as our module."""

    sae: object
    """``sasa.trainer.SAE`` (float dtype as saved)."""
    hookpoint: str | None
    """Our hookpoint it reads, when the folder says (train.json, SAELens metadata, a name)."""
    source: str
    """"sasa", "saelens:<architecture>" or "sparsify:topk"."""


def load_any_sae(folder: str | Path) -> LoadedSAE:
    """Load ``folder`` whichever library wrote it; one-line ``SasaError`` when none did."""
    import json

    folder = Path(folder)
    fmt = sae_format(folder) if folder.is_dir() else None
    if fmt is None:
        raise SasaError(f"{folder} is not an SAE folder: expected sasa's config.json + sae.safetensors, "
                        "SAELens's cfg.json + sae_weights.safetensors or sparsify's cfg.json + sae.safetensors")
    if fmt == "sasa":
        from sasa.trainer import load_sae
        info_file = folder / "train.json"
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        return LoadedSAE(load_sae(folder), info.get("member", {}).get("hookpoint"), "sasa")
    try:
        if fmt == "saelens":
            from sasa.interop.saelens import import_saelens
            return LoadedSAE(*import_saelens(folder))
        from sasa.interop.sparsify import import_sparsify
        return LoadedSAE(*import_sparsify(folder))
    except (KeyError, ValueError, json.JSONDecodeError) as err:  # malformed config or weights
        raise SasaError(f"{folder} is not a readable {fmt} SAE ({type(err).__name__}: {err})") from None
