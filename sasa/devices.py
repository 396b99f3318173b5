"""Picking the torch device of a local process (trainer, evaluation)."""

from __future__ import annotations

import torch

from sasa.errors import SasaError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when torch sees one, else cpu; a CUDA name without CUDA is a clear error.

    (The harvester resolves devices on its Ray workers instead, where the GPUs are.)"""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SasaError(f"device {name!r} asked for, but torch sees no CUDA device; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SasaError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise SasaError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device
