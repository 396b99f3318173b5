"""The trainer: SASA and SAE baselines streamed from a cache, many SAEs per read pass.

Names are imported on first use, so ``from sasa.trainer import cli`` does not pay for torch.
"""

from importlib import import_module

_HOMES = {
    "MemberConfig": "config", "TrainConfig": "config", "load_sweep": "config",
    "TrainResult": "loop", "train": "loop",
    "SAE": "sae", "SAEConfig": "sae_config", "load_sae": "persist", "save_sae": "persist",
    "train_in_memory": "in_memory",
}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
