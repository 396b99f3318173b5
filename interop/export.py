"""``export_sae``: one SAE of ours -> a SAELens or sparsify folder that applies to raw activations.

Saved SAEs already have the trainer's normalisation folded in (``SAE.fold_normalisation``), so
the exported weights are the saved ones, reshaped and renamed; nothing is recomputed. Model and
hook names come from ``train.json`` and the cache it names (``sasa.interop.provenance``).
"""

from __future__ import annotations

from pathlib import Path

from sasa.errors import SasaError

TARGETS = ("saelens", "sparsify")


def export_sae(sae_dir: str | Path, to: str, out: str | Path, *, model: str | None = None,
               storage_options: dict | None = None, overwrite: bool = False) -> Path:
    """Write the SAE saved in ``sae_dir`` as a ``to`` folder at ``out``; returns ``out``."""
    from sasa.interop.provenance import provenance
    from sasa.trainer import load_sae

    if to not in TARGETS:
        raise SasaError(f"unknown export format {to!r}; use one of {', '.join(TARGETS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SasaError(f"{out} exists and is not empty; pick another --out or pass --overwrite")
    sae = load_sae(sae_dir)
    if to == "sparsify":
        from sasa.interop.sparsify import export_sparsify, sparsify_refusal
        reason = sparsify_refusal(sae.cfg)
        if reason:  # before touching the cache or the output folder
            raise SasaError(f"cannot export {Path(sae_dir).name} ({sae.cfg.arch}) to sparsify: {reason}")
        return export_sparsify(sae, out, provenance(sae_dir, model=model, storage_options=storage_options))
    from sasa.interop.saelens import export_saelens
    return export_saelens(sae, out, provenance(sae_dir, model=model, storage_options=storage_options))
