"""A small training loop over an in-memory tensor, for tests and toy experiments.

The streaming trainer (``sasa.trainer.loop``) reads the Zarr cache; this loop exercises and
measures the model without one. Both take their learning-rate schedule from
``sasa.trainer.schedule``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sasa.trainer.consolidate import after_step, schedule_at
from sasa.trainer.sae import SAE
from sasa.trainer.schedule import lr_factor

class TrainLog(NamedTuple):
    """What ``train_in_memory`` reports."""

    fvu: list[float]
    """FVU of each step's batch."""
    dead_fraction: float
    """Fraction of dead units at the end."""


def train_in_memory(sae: SAE, x_ND: torch.Tensor, *, steps: int, batch_size: int = 512,
                    lr: float = 1e-3, seed: int = 0, warmup: int = 0,
                    decay_frac: float = 0.0, log_every: int = 0,
                    stop: int | None = None) -> TrainLog:
    """Adam on random minibatches of an in-memory tensor (tests and toy experiments).

    ``warmup`` steps of linear lr warm-up and a linear decay to 0 over the last ``decay_frac``
    of the steps (``sasa.trainer.schedule``); the consolidation schedules follow the SAE's
    config over ``steps`` (``sasa.trainer.consolidate``). ``stop``: train only the first that
    many of the ``steps`` (the schedules still span ``steps``)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(steps, warmup, decay_frac))
    sae.train()
    fvus: list[torch.Tensor] = []
    for step in range(steps if stop is None else min(stop, steps)):
        idx = torch.randint(0, x_ND.shape[0], (batch_size,), generator=gen)
        plan = schedule_at(sae.cfg, step, steps, batch_size)
        out = sae(x_ND[idx], **plan._asdict())
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
        sae.post_step()
        after_step(sae, x_ND[idx], opt, step, steps, plan)
        fvus.append(out.fvu.detach())
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}: fvu {float(out.fvu):.4f} l0 {float(out.l0_groups):.2f}")
    sae.eval()
    return TrainLog(fvu=torch.stack(fvus).tolist() if fvus else [],
                    dead_fraction=float(sae.dead_mask().float().mean()))
