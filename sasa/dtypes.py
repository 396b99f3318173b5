"""Dtype names: the one table of spellings and the one map to torch dtypes.

Every layer names dtypes by the store's canonical strings (``bfloat16``, ``float16``,
``float32``); the CLI spellings (``bf16``, ``fp16``, ``fp32``) and ``torch.`` prefixes resolve
here. torch is imported only when a torch dtype is asked for, so configs and the CLI stay light.
"""

from __future__ import annotations

from sasa.errors import SasaError

#: The dtypes activations are computed and stored in.
NAMES = ("bfloat16", "float16", "float32")

#: Other spellings of the same dtypes.
ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32",
           "half": "float16", "float": "float32"}


def canonical_dtype(dtype, what: str = "dtype") -> str:
    """``bf16`` / ``torch.bfloat16`` / ``bfloat16`` -> ``bfloat16``; anything else is an error."""
    name = str(dtype).removeprefix("torch.")
    name = ALIASES.get(name, name)
    if name not in NAMES:
        raise SasaError(f"unknown {what} {dtype!r}; use bf16, fp16 or fp32 "
                        "(or bfloat16, float16, float32)")
    return name


def torch_dtype(dtype):
    """The torch dtype of a name or alias (``bf16`` -> ``torch.bfloat16``)."""
    import torch
    return getattr(torch, canonical_dtype(dtype))
