"""Where an SAE of ours came from, in the terms other libraries record: model, hookpoint, context.

``sasa train`` / ``sasa sweep`` write ``train.json`` beside each SAE (the member's hookpoint and
the run's cache URL); the cache's attributes name the model the activations were harvested
from, its context length and BOS policy. Exporters read these once here, so SAELens metadata
and folder names agree. The cache is opened only when the model is not given, and read-only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from sasa.errors import SasaError

# Our hookpoints, anywhere in a name (sweep members are named like topk-resid_post.3-G512-s32).
_OURS = re.compile(r"(resid_pre|resid_post|attn_out|mlp_out)\.(\d+)")
# A transformer block's module path, as sparsify names its hookpoints (its output = resid_post).
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)$")
# TransformerLens hook names, as SAELens records them.
_TL = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_post|attn_out|mlp_out)$")


@dataclass
class Provenance:
    """What an exported SAE says about its input."""

    hookpoint: str | None = None
    """Our hookpoint name (resid_post.3), or None when unknown."""
    model: str | None = None
    """The model the activations came from (Hugging Face name or folder)."""
    context_size: int | None = None
    """Tokens per harvested sequence."""
    prepend_bos: bool | None = None
    """Whether every harvested sequence started with BOS."""
    cache: str | None = None
    """The cache it was trained on."""
    cache_fingerprint: str | None = None
    """That cache's fingerprint."""


def tl_hook_name(hookpoint: str | None) -> str | None:
    """resid_post.3 -> blocks.3.hook_resid_post (TransformerLens, as SAELens records hook_name)."""
    m = _OURS.fullmatch(hookpoint or "")
    return f"blocks.{m.group(2)}.hook_{m.group(1)}" if m else None


def hookpoint_from_name(name: str | None) -> str | None:
    """Our hookpoint from a TransformerLens hook name, a sparsify module path (layers.3, h.3:
    a block's output, resid_post) or any name containing one of ours; None if none fits."""
    name = name or ""
    if m := _TL.match(name):
        return f"{m.group(2)}.{m.group(1)}"
    if m := _OURS.search(name):
        return m.group(0)
    if m := _BLOCK.search(name):
        return f"resid_post.{m.group(1)}"
    return None


def provenance(sae_dir: str | Path, *, model: str | None = None,
               storage_options: dict | None = None) -> Provenance:
    """Read ``train.json`` beside the SAE and, unless ``model`` is given, the cache's attributes."""
    sae_dir = Path(sae_dir)
    info_file = sae_dir / "train.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    prov = Provenance(hookpoint=info.get("member", {}).get("hookpoint") or hookpoint_from_name(sae_dir.name),
                      model=model, cache=info.get("run", {}).get("cache"),
                      cache_fingerprint=info.get("cache_fingerprint"))
    if prov.cache is None or model is not None:
        return prov
    from sasa.store import open_cache
    try:
        cache = open_cache(prov.cache, storage_options)
    except SasaError as err:
        raise SasaError(f"cannot read the cache {prov.cache} named in {info_file} for the model name "
                        f"({err}); pass --model NAME") from None
    harvest = cache.attrs.get("harvest", {}).get("config", {})
    prov.model = harvest.get("model")
    prov.context_size = cache.ctx_len
    if "bos" in harvest:
        prov.prepend_bos = harvest["bos"] != "none"
    return prov
