"""Conversions between user arrays, the stored representation and torch tensors.

bfloat16 is stored as its raw uint16 bits, so a bf16 activation round-trips bit-exactly and
a reader that asks for bf16 gets a zero-cost view instead of a float32 copy (half the bytes to
move to the GPU).
"""

from __future__ import annotations

import numpy as np
import torch

from sasa.dtypes import torch_dtype
from sasa.errors import SasaError



def to_storage(x, dtype: str, what: str) -> np.ndarray:
    """Any float array or tensor -> a C-contiguous numpy array of the storage dtype."""
    if isinstance(x, torch.Tensor):
        t = x.detach().to("cpu")
    elif isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise SasaError(f"{what} has dtype {x.dtype}; activations must be floating point")
        t = torch.from_numpy(np.ascontiguousarray(x))
    else:
        raise SasaError(f"{what} is a {type(x).__name__}; pass a numpy array or a torch tensor")
    if not t.is_floating_point():
        raise SasaError(f"{what} has dtype {t.dtype}; activations must be floating point")
    t = t.to(torch_dtype(dtype)).contiguous()
    if dtype == "bfloat16":
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def storage_to_torch(a: np.ndarray, stored_dtype: str, out_dtype: torch.dtype) -> torch.Tensor:
    """Stored rows -> a torch tensor of ``out_dtype`` (a view when no conversion is needed)."""
    t = torch.from_numpy(a)
    if stored_dtype == "bfloat16":
        t = t.view(torch.int16).view(torch.bfloat16)
    return t if t.dtype == out_dtype else t.to(out_dtype)


def storage_to_float32(a: np.ndarray, stored_dtype: str) -> np.ndarray:
    return storage_to_torch(a, stored_dtype, torch.float32).numpy()
