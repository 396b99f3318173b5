"""Saving and loading SAEs: a folder with ``config.json`` and ``sae.safetensors``.

``config.json`` holds the format name, its version and the resolved ``SAEConfig``; loading
refuses a newer version or unknown fields with a one-line error instead of guessing.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from sasa.errors import SasaError
from sasa.trainer.sae import SAE
from sasa.trainer.sae_config import SAEConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "sae.safetensors"
FORMAT_NAME = "sasa-sae"
FORMAT_VERSION = 1


def save_sae(sae: SAE, directory: str | Path) -> Path:
    """Write ``config.json`` (format name, version, resolved config) and ``sae.safetensors``."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
            "config": dataclasses.asdict(sae.cfg)}
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    tensors = {k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_NAME))
    return out


def load_sae(path: str | Path, *, device=None) -> SAE:
    """Load an SAE written by ``save_sae`` from its directory (or its config.json)."""
    from safetensors.torch import load_file

    path = Path(path)
    directory = path.parent if path.name in (CONFIG_NAME, WEIGHTS_NAME) else path
    cfg_file, weights_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not cfg_file.is_file() or not weights_file.is_file():
        raise SasaError(f"{directory} is not a saved SAE: it needs {CONFIG_NAME} and "
                        f"{WEIGHTS_NAME} (write one with save_sae)")
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != FORMAT_NAME or meta.get("version", 0) > FORMAT_VERSION:
        raise SasaError(f"{cfg_file} is not a {FORMAT_NAME} v<={FORMAT_VERSION} config; "
                        "upgrade sasa to read it")
    fields = {f.name for f in dataclasses.fields(SAEConfig)}
    unknown = set(meta["config"]) - fields
    if unknown:
        raise SasaError(f"{cfg_file} has unknown config fields {sorted(unknown)}; "
                        "upgrade sasa to read it")
    cfg = SAEConfig(**meta["config"])
    tensors = load_file(str(weights_file))
    dtype = tensors["W_enc_GRD"].dtype
    sae = SAE(cfg, dtype=dtype)
    sae.load_state_dict(tensors)
    return sae.to(device) if device is not None else sae
