"""sparsify folders (``cfg.json`` + ``sae.safetensors``), both ways, without importing sparsify.

EleutherAI's sparsify has one architecture: z = TopK(ReLU(W_enc (x - b_dec) + b_enc)) per token,
x_hat = W_dec^T z + b_dec, stored by ``SparseCoder.save_to_disk`` as ``encoder.weight``
[num_latents, d_in], ``encoder.bias`` [num_latents], ``W_dec`` [num_latents, d_in], ``b_dec``
[d_in], with ``cfg.json`` = ``SparseCoderConfig.to_dict()`` plus ``d_in``. That is exactly our
TopK SAE with ReLU codes and the per-token gate (rank 1: our [G, 1, d] tensors squeeze to
[G, d]), so both directions copy weights unchanged. SASA (r >= 2 subspaces, signed codes), ReLU
+ L1 (no k) and the batch gate (also late in training, ``batch_gate_from``) have no sparsify
form: export refuses them in one line (export to SAELens instead). Import refuses transcoders,
skip connections and ``groupmax``.

``cfg.json`` holds exactly the keys sparsify writes. Our full config, hookpoint, model and
cache go in the safetensors header's metadata (key ``sasa``), which sparsify never reads, so a
round trip restores the training fields and the hookpoint.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from sasa.errors import SasaError
from sasa.interop.detect import SPARSIFY_CONFIG, SPARSIFY_WEIGHTS
from sasa.interop.provenance import Provenance, hookpoint_from_name

#: The key of our record in the safetensors header (sparsify reads only the tensors).
SASA_KEY = "sasa"


def sparsify_refusal(cfg) -> str | None:
    """Why an SAE of ours cannot be a sparsify SparseCoder, or None when it can."""
    if cfg.arch == "sasa":
        return ("sparsify has one direction per latent; a SASA SAE's r-dimensional groups need "
                "--to saelens (the registered sasa architecture)")
    if cfg.arch == "relu":
        return "sparsify SAEs are TopK only; export a ReLU SAE with --to saelens (standard)"
    if cfg.codes != "relu" or cfg.gate != "token":
        return (f"sparsify's TopK is per token on ReLU codes (this SAE has codes={cfg.codes}, "
                f"gate={cfg.gate}); use --to saelens")
    if cfg.batch_gate_from is not None:
        return ("this SAE keeps the groups above a threshold (it trained with the batch gate "
                "late in the run, batch_gate_from); sparsify's TopK is per token: use --to saelens")
    return None


def export_sparsify(sae, out: str | Path, prov: Provenance) -> Path:
    """Write a TopK SAE of ours as the folder ``SparseCoder.load_from_disk`` reads."""
    from safetensors.torch import save_file

    cfg = sae.cfg
    reason = sparsify_refusal(cfg)
    if reason:
        raise SasaError(f"cannot export {cfg.arch} to sparsify: {reason}")
    G, _, D = sae.W_enc_GRD.shape
    tensors = {"encoder.weight": sae.W_enc_GRD.detach().reshape(G, D),
               "encoder.bias": sae.b_enc_GR.detach().reshape(G),
               "W_dec": sae.W_dec_GRD.detach().reshape(G, D),
               "b_dec": sae.b_dec_D.detach()}
    config = {"activation": "topk", "expansion_factor": max(1, G // D), "normalize_decoder": True,
              "num_latents": G, "k": cfg.top_s, "multi_topk": False, "skip_connection": False,
              "transcode": False, "d_in": D}
    ours = {"config": dataclasses.asdict(cfg), "hookpoint": prov.hookpoint, "model": prov.model,
            "cache": prov.cache}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(out / SPARSIFY_WEIGHTS),
              metadata={SASA_KEY: json.dumps(ours)})
    (out / SPARSIFY_CONFIG).write_text(json.dumps(config))
    return out


def import_sparsify(folder: str | Path):
    """Our TopK SAE for a sparsify folder: (sae, source)."""
    import torch
    from safetensors.torch import load_file

    from sasa.interop.saelens import restore_config
    from sasa.trainer.sae import SAE
    from sasa.trainer.sae_config import SAEConfig

    folder = Path(folder)
    where = folder / SPARSIFY_CONFIG
    cfg = json.loads(where.read_text())
    for key, why in (("transcode", "a transcoder predicts another module's output"),
                     ("skip_connection", "its linear skip connection has no sasa equivalent")):
        if cfg.get(key):
            raise SasaError(f"{where}: {key} is set; {why}")
    if cfg.get("activation", "topk") != "topk":
        raise SasaError(f"{where}: activation {cfg['activation']!r} is not supported; sasa reads topk")
    t = load_file(str(folder / SPARSIFY_WEIGHTS))
    missing = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"} - t.keys()
    if missing:
        raise SasaError(f"{folder / SPARSIFY_WEIGHTS} lacks {', '.join(sorted(missing))} for a sparsify SAE")
    W_enc, b_enc, W_dec, b_dec = t["encoder.weight"], t["encoder.bias"], t["W_dec"], t["b_dec"]
    G, D = W_enc.shape
    if "d_in" in cfg and int(cfg["d_in"]) != D or W_dec.shape != (G, D) or b_enc.shape != (G,) \
            or b_dec.shape != (D,):
        raise SasaError(f"{folder}: weight shapes encoder.weight {tuple(W_enc.shape)}, W_dec "
                        f"{tuple(W_dec.shape)} disagree with each other or with d_in in {SPARSIFY_CONFIG}")
    ours = SAEConfig(d_in=D, groups=G, arch="topk", top_s=int(cfg.get("k", 32)))
    ours = restore_config(sasa_metadata(folder).get("config"), ours)
    sae = SAE(ours, dtype=W_enc.dtype, seed=0)
    with torch.no_grad():
        sae.W_enc_GRD.copy_(W_enc.reshape(G, 1, D))
        sae.b_enc_GR.copy_(b_enc.reshape(G, 1))
        sae.W_dec_GRD.copy_(W_dec.reshape(G, 1, D))
        sae.b_dec_D.copy_(b_dec)
    return sae, "sparsify:topk"


def sparsify_hookpoint(cfg: dict, folder: Path) -> str | None:
    """Our hookpoint for a sparsify config: the one we exported, else from the folder's name
    (sparsify names it by module path: layers.3 is block 3's output, resid_post.3)."""
    return sasa_metadata(folder).get("hookpoint") or hookpoint_from_name(folder.name)


def sasa_metadata(folder: Path) -> dict:
    """What ``export_sparsify`` recorded in the weights file's header (our config, hookpoint,
    model, cache), or {} for a folder sparsify wrote."""
    from safetensors import safe_open

    with safe_open(str(folder / SPARSIFY_WEIGHTS), framework="pt") as f:
        text = (f.metadata() or {}).get(SASA_KEY)
    return json.loads(text) if text else {}
