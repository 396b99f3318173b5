"""Load any SAE folder (ours, SAELens, sparsify) as one of our ``SAE`` modules, for evaluation.

Every analysis (``sasa eval``, absorption, splitting, splice-in, the report) works on our
``SAE``'s interface: ``forward`` -> codes [B, G, r] and reconstruction, ``decoder_GDR``,
``effective_ranks``. Rather than a second interface, foreign SAEs are converted into that class
on load (SAELens ``jumprelu``/``batchtopk`` into a subclass that thresholds the codes), so the
same code scores them, with r = 1, where the geometry metrics reduce to their per-latent forms.
Conversion reads config JSON and safetensors directly: neither SAELens nor sparsify is
imported, and loading costs what ``load_sae`` costs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from sasa.errors import SasaError
from sasa.interop.detect import SAELENS_CONFIG, sae_format


class LoadedSAE(NamedTuple):
    """An SAE of any known format, as our module, with what its folder says about it."""

    sae: object
    """``sasa.trainer.SAE`` (dtype as saved)."""
    info: dict
    """``sae_info``: train.json's keys (member.hookpoint, member.name) and ``source``."""


def _format(folder: Path) -> str:
    fmt = sae_format(folder) if folder.is_dir() else None
    if fmt is None:
        raise SasaError(f"{folder} is not a saved SAE: it needs sasa's config.json + sae.safetensors, "
                        "SAELens's cfg.json + sae_weights.safetensors or sparsify's cfg.json + sae.safetensors")
    return fmt


def sae_info(folder: str | Path) -> dict:
    """What a folder says about its SAE, without loading weights: our ``train.json`` (plus
    ``source: "sasa"``), or for a foreign folder ``{"member": {"name", "hookpoint"}, "source"}``
    with the hookpoint from its config (None when it names none)."""
    folder = Path(folder)
    fmt = _format(folder)
    if fmt == "sasa":
        p = folder / "train.json"
        return {**(_read_json(p) if p.is_file() else {}), "source": "sasa"}
    cfg = _read_json(folder / SAELENS_CONFIG)
    if fmt == "saelens":
        from sasa.interop.saelens import saelens_hookpoint, upgrade_pre6
        hookpoint, source = saelens_hookpoint(cfg, folder), f"saelens:{upgrade_pre6(cfg)['architecture']}"
    else:
        from sasa.interop.sparsify import sparsify_hookpoint
        hookpoint, source = sparsify_hookpoint(cfg, folder), "sparsify:topk"
    return {"member": {"name": folder.name, "hookpoint": hookpoint}, "source": source}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SasaError(f"{path} is not valid JSON ({err})") from None


def load_any_sae(folder: str | Path) -> LoadedSAE:
    """Load ``folder`` whichever library wrote it; one-line ``SasaError`` when none did."""
    folder = Path(folder)
    info = sae_info(folder)
    fmt = _format(folder)
    if fmt == "sasa":
        from sasa.trainer import load_sae
        return LoadedSAE(load_sae(folder), info)
    try:
        if fmt == "saelens":
            from sasa.interop.saelens import import_saelens
            sae, _ = import_saelens(folder)
        else:
            from sasa.interop.sparsify import import_sparsify
            sae, _ = import_sparsify(folder)
    except (KeyError, ValueError, TypeError) as err:  # a config field or tensor missing or malformed
        raise SasaError(f"{folder} is not a readable {fmt} SAE ({type(err).__name__}: {err})") from None
    return LoadedSAE(sae, info)
