"""Saving and loading SAEs: a folder with ``config.json`` and ``sae.safetensors``.

``config.json`` holds the format name, its version and the resolved ``SAEConfig``; loading
refuses a newer version or unknown fields with a one-line error instead of guessing, and a
damaged file (torn, truncated, not JSON / not safetensors) with one naming the file.

Saving is crash-safe: both files are written under temporary names, the old ``config.json`` is
removed, the weights are renamed into place and ``config.json`` last. ``config.json`` is the
commit: a crash at any point leaves either the previous SAE, or a folder without
``config.json`` that ``load_sae`` refuses, never new weights beside an old config that loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
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
    tag = f".tmp-{uuid.uuid4().hex[:8]}"
    tmp_cfg, tmp_weights = out / (CONFIG_NAME + tag), out / (WEIGHTS_NAME + tag)
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}
        save_file(tensors, str(tmp_weights))
        with open(tmp_cfg, "w") as f:
            f.write(json.dumps(meta, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        (out / CONFIG_NAME).unlink(missing_ok=True)
        os.replace(tmp_weights, out / WEIGHTS_NAME)
        os.replace(tmp_cfg, out / CONFIG_NAME)  # the commit
    finally:
        tmp_cfg.unlink(missing_ok=True)
        tmp_weights.unlink(missing_ok=True)
    return out


def _folder(path: str | Path) -> Path:
    """The SAE folder named by ``path`` (the folder or one of its two files)."""
    path = Path(path)
    return path.parent if path.name in (CONFIG_NAME, WEIGHTS_NAME) else path


def _require(directory: Path, *names: str) -> None:
    """Refuse a folder that lacks any of ``names``: it is not an SAE ``save_sae`` wrote."""
    if not all((directory / name).is_file() for name in names):
        raise SasaError(f"{directory} is not a saved SAE: it needs {CONFIG_NAME} and "
                        f"{WEIGHTS_NAME} (write one with save_sae)")


def load_config(path: str | Path) -> SAEConfig:
    """The ``SAEConfig`` of an SAE written by ``save_sae`` (its directory or its config.json),
    checked: format, version and fields this sasa knows."""
    directory = _folder(path)
    _require(directory, CONFIG_NAME)
    cfg_file = directory / CONFIG_NAME
    try:
        meta = json.loads(cfg_file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise SasaError(f"{cfg_file} is damaged (not valid JSON: {err}); retrain the SAE or "
                        "restore the file") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        meta = {}
    if meta.get("format") != FORMAT_NAME or meta.get("version", 0) > FORMAT_VERSION:
        raise SasaError(f"{cfg_file} is not a {FORMAT_NAME} v<={FORMAT_VERSION} config; "
                        "upgrade sasa to read it")
    fields = {f.name for f in dataclasses.fields(SAEConfig)}
    unknown = set(meta["config"]) - fields
    if unknown:
        raise SasaError(f"{cfg_file} has unknown config fields {sorted(unknown)}; "
                        "upgrade sasa to read it")
    # Folders written before the batch gate existed trained without it (no "auto").
    return SAEConfig(**{"batch_gate_from": None, **meta["config"]})


def load_sae(path: str | Path, *, device=None) -> SAE:
    """Load an SAE written by ``save_sae`` from its directory (or its config.json), in eval
    mode (what inference wants: a batch-gated SAE gates by its threshold; ``.train()`` to
    train it further)."""
    from safetensors.torch import load_file

    directory = _folder(path)
    _require(directory, CONFIG_NAME, WEIGHTS_NAME)
    cfg_file, weights_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    cfg = load_config(directory)
    try:
        tensors = load_file(str(weights_file))
    except Exception as err:  # safetensors raises its own error type for a torn file
        raise SasaError(f"{weights_file} is damaged ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                        "retrain the SAE or restore the file") from None
    if "W_enc_GRD" not in tensors:
        raise SasaError(f"{weights_file} holds no SAE weights (no W_enc_GRD); retrain the SAE or restore the file")
    sae = SAE(cfg, dtype=tensors["W_enc_GRD"].dtype)
    tensors.setdefault("gate_threshold", sae.gate_threshold)  # saved before the batch gate's
    try:
        sae.load_state_dict(tensors)
    except RuntimeError as err:
        raise SasaError(f"{weights_file} does not match {cfg_file} ({str(err).splitlines()[0]}); "
                        "the folder mixes two SAEs, retrain it") from None
    sae.eval()
    return sae.to(device) if device is not None else sae
