"""The trainer: SASA and SAE baselines streamed from a cache, many SAEs per read pass."""

from trainer.config import MemberConfig, TrainConfig, load_sweep
from trainer.loop import TrainResult, train
from trainer.sae import SAE, SAEConfig, load_sae, save_sae

__all__ = ["SAE", "MemberConfig", "SAEConfig", "TrainConfig", "TrainResult", "load_sae", "load_sweep",
           "save_sae", "train"]
