"""SAELens folders (``cfg.json`` + ``sae_weights.safetensors``), both ways, without importing SAELens.

Export writes the files SAELens 6's ``SAE.save_model`` writes, with its key names and shapes
(``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``W_dec`` [d_sae, d_in], ``b_dec`` [d_in]) and its
config fields (``SAEConfig.to_dict()``: d_in, d_sae, dtype, device, apply_b_dec_to_input,
normalize_activations, reshape_activations, metadata, the architecture's own fields,
architecture). Our ``W_enc_GRD`` / ``W_dec_GRD`` [G, r, d] flatten to d_sae = G * r latents,
group g owning latents g*r .. g*r + r - 1. Which architecture:

- ReLU -> ``standard``; TopK (ReLU codes, per-token gate) -> ``topk`` (k = s; SAELens takes the
  top k pre-activations then ReLU, we ReLU then take the top k: the same codes);
- SASA, and TopK with signed codes or the batch gate (also late in training,
  ``batch_gate_from``: its threshold is the ``gate_threshold`` field) -> ``sasa``, the
  architecture that ``sasa.interop.saelens_sasa`` registers with SAELens (import it before
  ``SAE.load_from_disk``).

Import reads ``standard``, ``topk``, ``jumprelu``, ``batchtopk`` (a training checkpoint; its
``topk_threshold`` becomes the JumpReLU threshold of every latent, as SAELens itself does when it
saves one for inference) and ``sasa`` into our ``SAE`` (``JumpReLUSAE`` for the thresholds).
Two SAELens options are folded into the weights rather than refused (exact up to float32
rounding): ``apply_b_dec_to_input: false`` (b_enc += b_dec W_enc) and
``rescale_acts_by_decoder_norm`` (W_enc and b_enc times, W_dec divided by, each latent's decoder
norm). Options that need the input at run time (``normalize_activations`` other than none,
``hook_z`` reshaping, per-head hooks, a finetuning scaling factor) are refused in one line.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import metadata as _pkg_metadata
from pathlib import Path

from sasa.errors import SasaError
from sasa.interop.detect import SAELENS_CONFIG, SAELENS_WEIGHTS
from sasa.interop.provenance import Provenance, hookpoint_from_name, tl_hook_name

#: The SAELens major version whose folder layout this module writes and reads.
SAELENS_MAJOR = 6
IMPORTABLE = ("standard", "topk", "jumprelu", "batchtopk", "sasa")


def saelens_version() -> str:
    """The installed SAELens version (recorded in exported metadata), or the major we target."""
    try:
        return _pkg_metadata.version("sae-lens")
    except _pkg_metadata.PackageNotFoundError:
        return f"{SAELENS_MAJOR}.0.0"


def saelens_architecture(cfg) -> str:
    """The SAELens architecture an SAE of ours exports to (see the module docstring)."""
    if cfg.arch == "relu":
        return "standard"
    if (cfg.arch == "topk" and cfg.codes == "relu" and cfg.gate == "token"
            and cfg.batch_gate_from is None):
        return "topk"
    return "sasa"


def export_saelens(sae, out: str | Path, prov: Provenance) -> Path:
    """Write ``sae`` (ours) as a SAELens folder ``out`` that applies to the same raw activations."""
    from safetensors.torch import save_file

    cfg = sae.cfg
    G, R, D = sae.W_enc_GRD.shape
    arch = saelens_architecture(cfg)
    tensors = {
        "W_dec": sae.W_dec_GRD.detach().reshape(G * R, D),
        "W_enc": sae.W_enc_GRD.detach().reshape(G * R, D).T,
        "b_dec": sae.b_dec_D.detach(),
        "b_enc": sae.b_enc_GR.detach().reshape(G * R),
    }
    version = saelens_version()
    meta = {"sae_lens_version": version, "sae_lens_training_version": version,
            "model_name": prov.model, "hook_name": tl_hook_name(prov.hookpoint), "hook_head_index": None,
            "context_size": prov.context_size, "prepend_bos": prov.prepend_bos,
            "model_from_pretrained_kwargs": {},
            "sasa_config": dataclasses.asdict(cfg), "sasa_hookpoint": prov.hookpoint, "sasa_cache": prov.cache,
            "sasa_cache_fingerprint": prov.cache_fingerprint}
    config = {"d_in": D, "d_sae": G * R, "dtype": _dtype_str(sae.W_enc_GRD.dtype), "device": "cpu",
              "apply_b_dec_to_input": True, "normalize_activations": "none",
              "reshape_activations": "none", "metadata": meta}
    if arch == "topk":
        config.update(k=cfg.top_s, rescale_acts_by_decoder_norm=False)
    elif arch == "sasa":
        config.update(rank=R, top_s=cfg.top_s, codes=cfg.codes, gate=cfg.gate,
                      gate_threshold=float(sae.gate_threshold), sasa_arch=cfg.arch)
    config["architecture"] = arch
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(out / SAELENS_WEIGHTS))
    (out / SAELENS_CONFIG).write_text(json.dumps(config))
    return out


def _dtype_str(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def import_saelens(folder: str | Path):
    """Our SAE for a SAELens folder: (sae, source)."""
    import torch
    from safetensors.torch import load_file

    from sasa.trainer.sae import SAE
    from sasa.trainer.sae_config import SAEConfig

    folder = Path(folder)
    cfg = upgrade_pre6(json.loads((folder / SAELENS_CONFIG).read_text()))
    meta = cfg.get("metadata") or {}
    arch = cfg["architecture"]
    where = f"{folder / SAELENS_CONFIG}"
    if arch not in IMPORTABLE:
        raise SasaError(f"{where}: SAELens architecture {arch!r} has no sasa equivalent; "
                        f"sasa reads {', '.join(IMPORTABLE)}")
    if cfg.get("normalize_activations", "none") != "none":
        raise SasaError(f"{where}: normalize_activations={cfg['normalize_activations']!r} rescales inputs "
                        "at run time; fold it into the weights in SAELens first (normalize_activations: none)")
    if cfg.get("reshape_activations", "none") != "none" or meta.get("hook_head_index") is not None:
        raise SasaError(f"{where}: per-head (hook_z / hook_head_index) SAEs read attention heads, which "
                        "sasa caches do not hold")
    t = load_file(str(folder / SAELENS_WEIGHTS))
    missing = {"W_enc", "W_dec", "b_dec", "b_enc"} - t.keys()
    if arch == "jumprelu":
        missing |= {"threshold"} - t.keys()
    if arch == "batchtopk":
        missing |= {"topk_threshold"} - t.keys()
    if missing:
        raise SasaError(f"{folder / SAELENS_WEIGHTS} lacks {', '.join(sorted(missing))} for a SAELens "
                        f"{arch} SAE")
    if "scaling_factor" in t and not torch.all(t["scaling_factor"] == 1):
        raise SasaError(f"{where}: a finetuning scaling factor is not supported; fold it in SAELens first")
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    W_enc, b_enc, W_dec, b_dec = t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"]
    if W_enc.shape != (d_in, d_sae) or W_dec.shape != (d_sae, d_in) or b_enc.shape != (d_sae,) \
            or b_dec.shape != (d_in,):
        raise SasaError(f"{folder}: weight shapes W_enc {tuple(W_enc.shape)}, W_dec {tuple(W_dec.shape)} do not "
                        f"match d_in={d_in}, d_sae={d_sae} in {SAELENS_CONFIG}")
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ W_enc  # x W_enc + b_enc = (x - b_dec) W_enc + (b_enc + b_dec W_enc)
    threshold = t.get("threshold")
    if arch == "batchtopk":
        threshold = torch.full((d_sae,), float(t["topk_threshold"]), dtype=W_enc.dtype)
    if cfg.get("rescale_acts_by_decoder_norm", False):
        norm = W_dec.norm(dim=-1)
        W_enc, b_enc, W_dec = W_enc * norm, b_enc * norm, W_dec / norm[:, None]

    rank = 1
    if arch == "sasa":
        rank = int(cfg["rank"])
        if d_sae % rank:
            raise SasaError(f"{where}: d_sae={d_sae} is not a multiple of rank={rank}")
        ours = SAEConfig(d_in=d_in, groups=d_sae // rank, arch=cfg.get("sasa_arch", "sasa"), rank=rank,
                         top_s=int(cfg["top_s"]), codes=cfg["codes"], gate=cfg["gate"])
    elif arch == "topk":
        ours = SAEConfig(d_in=d_in, groups=d_sae, arch="topk", top_s=int(cfg["k"]))
    else:
        ours = SAEConfig(d_in=d_in, groups=d_sae, arch="relu", l1_coeff=0.0)
    ours = restore_config(meta.get("sasa_config"), ours)
    if arch in ("jumprelu", "batchtopk"):
        from sasa.interop.jumprelu import JumpReLUSAE
        sae = JumpReLUSAE(ours, dtype=W_enc.dtype)
    else:
        sae = SAE(ours, dtype=W_enc.dtype, seed=0)
    G = d_sae // rank
    with torch.no_grad():
        sae.W_enc_GRD.copy_(W_enc.T.reshape(G, rank, d_in))
        sae.b_enc_GR.copy_(b_enc.reshape(G, rank))
        sae.W_dec_GRD.copy_(W_dec.reshape(G, rank, d_in))
        sae.b_dec_D.copy_(b_dec)
        if threshold is not None:
            sae.threshold_GR.copy_(threshold.reshape(G, 1))
        if arch == "sasa":
            sae.gate_threshold.fill_(float(cfg.get("gate_threshold", 0.0)))
    return sae, f"saelens:{arch}"


def upgrade_pre6(cfg: dict) -> dict:
    """A SAELens < 6 config (flat, no ``architecture``) in the 6.x shape, as SAELens's own
    ``handle_pre_6_0_config`` reads it: ``hook_point`` -> ``metadata.hook_name``, ReLU ->
    ``standard``, ``activation_fn: topk`` -> ``topk`` with its ``k``."""
    if "architecture" in cfg and "metadata" in cfg:
        return cfg
    cfg = dict(cfg)
    meta = dict(cfg.get("metadata") or {})
    meta.setdefault("hook_name", cfg.get("hook_name", cfg.get("hook_point")))
    meta.setdefault("hook_head_index", cfg.get("hook_head_index", cfg.get("hook_point_head_index")))
    cfg["metadata"] = meta
    if "architecture" not in cfg:
        act = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
        cfg["architecture"] = "topk" if act == "topk" else "standard" if act == "relu" else f"activation {act}"
        if act == "topk":
            cfg.setdefault("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    return cfg


def saelens_hookpoint(cfg: dict, folder: Path) -> str | None:
    """Our hookpoint for a SAELens config: the one we exported, its TransformerLens hook name,
    or one in the folder's name."""
    meta = upgrade_pre6(cfg)["metadata"]
    return (meta.get("sasa_hookpoint") or hookpoint_from_name(meta.get("hook_name"))
            or hookpoint_from_name(folder.name))


#: The fields that decide what an SAE computes; the others only steer training.
INFERENCE_FIELDS = ("d_in", "groups", "arch", "rank", "top_s", "codes", "gate")


def restore_config(saved: dict | None, derived):
    """Our full SAEConfig (training fields too) when an export recorded it and it still agrees
    with what the folder's own fields say the SAE computes; else ``derived``."""
    from sasa.trainer.sae_config import SAEConfig

    if not isinstance(saved, dict):
        return derived
    try:
        full = SAEConfig(**saved)
    except (TypeError, SasaError):
        return derived
    same = all(getattr(full, k) == getattr(derived, k) for k in INFERENCE_FIELDS)
    return full if same else derived
