"""Which library wrote an SAE folder, from its file names alone (no torch, no sae_lens import).

| format   | config file                        | weights file              |
|----------|------------------------------------|---------------------------|
| sasa     | ``config.json`` (format sasa-sae)  | ``sae.safetensors``       |
| saelens  | ``cfg.json``                       | ``sae_weights.safetensors`` |
| sparsify | ``cfg.json``                       | ``sae.safetensors``       |

SAELens and sparsify share the config name and differ in the weights name, so a ``cfg.json``
beside neither weights file is an incomplete folder, reported as such rather than guessed.
"""

from __future__ import annotations

from pathlib import Path

from sasa.errors import SasaError

SASA_CONFIG, SASA_WEIGHTS = "config.json", "sae.safetensors"
SAELENS_CONFIG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
SPARSIFY_CONFIG, SPARSIFY_WEIGHTS = "cfg.json", "sae.safetensors"
FORMATS = ("sasa", "saelens", "sparsify")


def sae_format(folder: str | Path) -> str | None:
    """"sasa", "saelens" or "sparsify" for a folder holding an SAE config, else None.

    A folder with a config file but no matching weights raises a one-line error."""
    folder = Path(folder)
    if (folder / SASA_CONFIG).is_file():
        return "sasa"
    if not (folder / SAELENS_CONFIG).is_file():
        return None
    if (folder / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if (folder / SPARSIFY_WEIGHTS).is_file():
        return "sparsify"
    raise SasaError(f"{folder} has {SAELENS_CONFIG} but no weights: a SAELens folder needs "
                    f"{SAELENS_WEIGHTS}, a sparsify folder {SPARSIFY_WEIGHTS}")


def is_sae_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds an SAE config of any known format (weights are checked on load)."""
    folder = Path(folder)
    return (folder / SASA_CONFIG).is_file() or (folder / SAELENS_CONFIG).is_file()
