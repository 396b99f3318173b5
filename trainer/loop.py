"""The training loop: one read pass over a cache feeds every SAE of a run.

Each batch is read and decoded once (the reader's windows), moved to the device once per
hookpoint, normalised once per hookpoint and then given to every member. The loop syncs with
the device only at log steps (metrics are accumulated as tensors) and at checkpoints.

Determinism: SAE initialisation is seeded, the reader's order is a function of its seed and
position, and a checkpoint holds every piece of state (weights, Adam moments, lr schedule,
dead-unit counters, reader position), so a run resumed from a checkpoint ends with the same
weights as one that never stopped (on the same device and software).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from sasa.devices import resolve_device
from sasa.errors import SasaError
from sasa.store import open_cache
from sasa.store.verify import refuse_damaged
from sasa.trainer.config import MemberConfig, TrainConfig
from sasa.trainer.outdir import claim
from sasa.trainer.consolidate import after_step, periodic_steps, schedule_at
from sasa.trainer.persist import save_sae
from sasa.trainer.sae import SAE
from sasa.trainer.schedule import lr_factor

CHECKPOINT_VERSION = 1


class TrainResult(NamedTuple):
    saes: dict[str, Path]
    """Member name -> folder of the saved SAE (loadable with ``sasa.trainer.load_sae``)."""
    steps: int
    tokens: int
    """Tokens each SAE was trained on."""
    chunks_read: int
    """Chunk reads of this process's read pass (each chunk once per epoch, whatever the sweep size)."""
    final: dict[str, dict]
    """Member name -> its last metrics line."""


class Member:
    """The live state of one SAE during a run."""

    def __init__(self, cfg: MemberConfig, index: int, run: TrainConfig, d_in: int, device):
        self.cfg = cfg
        self.sae_cfg = cfg.sae_config(d_in)
        # The init seed depends on this member's settings alone, never on its index in the sweep,
        # so a member trains to the same weights alone or beside any other SAEs.
        self.sae = SAE(self.sae_cfg, device=device, seed=cfg.init_seed(run.seed))
        self.lr = cfg.resolved_lr(self.sae_cfg)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=self.lr)
        warmup = min(run.warmup_steps, max(1, run.steps // 10))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_factor(run.steps, warmup, run.decay_frac))
        self.reset_sums()

    def reset_sums(self):
        self.sums = None
        self.n = 0
        # what the periodic consolidation steps changed since the last metrics line
        self.changed = dict.fromkeys(periodic_steps(self.sae_cfg), 0)

    def accumulate(self, out) -> None:
        vals = torch.stack([out.loss.detach(), out.fvu.detach(), out.l0_groups.detach(),
                            out.l0_coords.detach(), out.nuc_term.detach()]).float()
        self.sums = vals if self.sums is None else self.sums + vals
        self.n += 1

    def metrics(self, step: int, tokens: int) -> dict:
        loss, fvu, l0g, l0c, nuc_term = (self.sums / max(self.n, 1)).tolist()
        changed = self.changed
        with torch.no_grad():
            ranks = self.sae.effective_ranks()
            hist = torch.bincount(ranks.threshold_G.cpu(), minlength=self.sae_cfg.rank + 1).tolist()
            nuc = float(self.sae.nuclear_norm())
        self.reset_sums()
        return {"step": step, "tokens": tokens, "loss": loss, "fvu": fvu, "l0_groups": l0g,
                "l0_coords": l0c, "dead_fraction": float(self.sae.dead_mask().float().mean()),
                "nuclear_norm": nuc, "nuc_term": nuc_term, "lr": self.sched.get_last_lr()[0],
                "eff_rank_hist": hist, "eff_rank_entropy_mean": float(ranks.entropy_G.mean()),
                **changed}

    def state(self) -> dict:
        return {"sae": self.sae.state_dict(), "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict(), "sae_config": dataclasses.asdict(self.sae_cfg)}

    def load_state(self, state: dict) -> None:
        # The run config holds what the user wrote; the resolved SAE config also holds the
        # defaults, which a newer sasa may resolve differently (older checkpoints lack it).
        was, now = state.get("sae_config"), dataclasses.asdict(self.sae_cfg)
        if was is not None and was != now:
            gone = "(no such setting)"  # a field this sasa dropped, or one it added
            diffs = ", ".join(f"{k}: {was.get(k, gone)!r} -> {now.get(k, gone)!r}"
                              for k in [*now, *(k for k in was if k not in now)]
                              if was.get(k, gone) != now.get(k, gone))
            raise SasaError(f"--resume: {self.cfg.name} started with other defaults ({diffs}); set "
                            f"the started values in its config to continue, or start over")
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])


def normaliser(cache, hookpoint: str, device):
    """(mean_D, scale) such that (x - mean) / scale has E||.||^2 = d (docs/sasa.md)."""
    st = cache.stats(hookpoint)
    if st.count == 0:
        raise SasaError(f"{hookpoint} has no rows to compute statistics from in {cache.url}")
    d = len(st.mean)
    scale = math.sqrt(float(st.var.sum()) / d) or 1.0
    return torch.as_tensor(st.mean, dtype=torch.float32, device=device), scale


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a torn checkpoint


def _metric_lines(path: Path) -> list[dict]:
    """The metric lines of ``path``; a line torn by a crash mid-write is dropped."""
    lines = []
    for text in path.read_text().splitlines() if path.exists() else []:
        try:
            line = json.loads(text)
        except ValueError:
            continue
        if isinstance(line, dict) and isinstance(line.get("step"), int):
            lines.append(line)
    return lines


def _trim_metrics(path: Path, last_step: int) -> dict | None:
    """Drop metric lines written after the checkpoint a run resumes from; returns the last kept."""
    if path.exists():
        lines = [ln for ln in _metric_lines(path) if ln["step"] <= last_step]
        path.write_text("".join(json.dumps(ln) + "\n" for ln in lines))
        return lines[-1] if lines else None
    return None


def _load_checkpoint(path: Path, device) -> dict:
    """A checkpoint written by this loop, or a one-line error for a damaged or foreign file."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises many types for a torn or foreign file
        raise SasaError(f"checkpoint {path} is damaged or not a sasa checkpoint ({type(err).__name__}); "
                        "restore it, or rerun without --resume (add --overwrite) to start over") from None
    if not isinstance(ckpt, dict) or not {"version", "step", "reader", "config", "members"} <= set(ckpt):
        raise SasaError(f"checkpoint {path} is not a sasa training checkpoint; "
                        "rerun without --resume (add --overwrite) to start over")
    if ckpt["version"] > CHECKPOINT_VERSION:
        raise SasaError(f"checkpoint {path} has version {ckpt['version']}, newer than this sasa "
                        f"reads ({CHECKPOINT_VERSION}); upgrade sasa")
    return ckpt


def _finished(out: Path, members: list[Member], step: int, cfg: TrainConfig) -> TrainResult | None:
    """The result of a run that had already finished (every SAE saved), else None."""
    if step < cfg.steps:
        return None
    saved, final = {}, {}
    for m in members:
        folder = out / m.cfg.name
        meta = folder / "train.json"
        if not (folder / "sae.safetensors").is_file() or not meta.is_file():
            return None
        try:
            final[m.cfg.name] = json.loads(meta.read_text()).get("final")
        except ValueError:
            return None
        saved[m.cfg.name] = folder
    return TrainResult(saved, step, step * cfg.batch_size, 0, final)


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
          member_ids: list[int] | None = None, worker: int = 0, until_step: int | None = None,
          progress: bool = True) -> TrainResult:
    """Train the run's members (or the ``member_ids`` subset) from one read pass of the cache.

    ``resume`` continues from ``out/checkpoints/worker-<worker>.pt`` (a finished run is left as
    it is). ``out`` is locked for the run and a changed rerun into it is refused unless
    ``overwrite`` (``sasa.trainer.outdir``); a worker of a Ray run (``member_ids`` given) runs
    under its driver's lock. ``until_step`` stops after that step with a checkpoint and no
    final SAEs, as a preemption would (for tests).
    """
    kwargs = dict(resume=resume, member_ids=member_ids, worker=worker, until_step=until_step,
                  progress=progress)
    if member_ids is not None:
        return _train(cfg, Path(out), **kwargs)
    with claim(out, cfg.to_json(), resume=resume, overwrite=overwrite):
        return _train(cfg, Path(out), **kwargs)


def _train(cfg: TrainConfig, out: Path, *, resume: bool, member_ids: list[int] | None, worker: int,
           until_step: int | None, progress: bool) -> TrainResult:
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(cfg.cpu_threads or max(1, (os.cpu_count() or 2) - 1))
    cache = open_cache(cfg.cache, cfg.storage_options)
    for hp in cfg.hookpoints:
        cache.check_hookpoint(hp)
    refuse_damaged(cache)
    ids = list(range(len(cfg.members))) if member_ids is None else list(member_ids)
    members = [Member(cfg.members[i], i, cfg, cache.hookpoints[cfg.members[i].hookpoint], device) for i in ids]
    hookpoints = sorted({m.cfg.hookpoint for m in members})
    norm = {hp: normaliser(cache, hp, device) for hp in hookpoints}

    ckpt_path = out / "checkpoints" / f"worker-{worker}.pt"
    step, reader_state = 0, None
    if resume:
        if not ckpt_path.exists():
            raise SasaError(f"--resume: no checkpoint at {ckpt_path}; run without --resume to start")
        ckpt = _load_checkpoint(ckpt_path, device)
        names = [m.cfg.name for m in members]
        if ckpt["members"].keys() != set(names) or ckpt["config"] != cfg.to_json():
            raise SasaError(f"--resume: {ckpt_path} was written by a different run config; "
                            f"use the original settings, a new --out, or --overwrite without --resume to start over")
        for m in members:
            m.load_state(ckpt["members"][m.cfg.name])
        step, reader_state = ckpt["step"], ckpt["reader"]
        done = _finished(out, members, step, cfg)
        if done is not None:  # resuming a finished run changes nothing
            return done
    # Written only now, after every check passed: a refused run changes nothing in ``out``.
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)
    (out / "run.json").write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
    last = {}
    for m in members:
        (out / m.cfg.name).mkdir(exist_ok=True)
        kept = _trim_metrics(out / m.cfg.name / "metrics.jsonl", step if resume else -1)
        if kept is not None:
            last[m.cfg.name] = kept

    on_cuda = device.type == "cuda"
    read_dtype = torch.bfloat16 if on_cuda and cache.dtype == "bfloat16" else torch.float32
    stream = cache.batches(hookpoints, cfg.batch_size, seed=cfg.seed, exclude=cfg.exclude,
                           epochs=None, dtype=read_dtype, resume=reader_state, with_rows=True,
                           shuffle_rows=cfg.shuffle_rows)
    chunk_rows = cache.layout.chunk_rows
    total = cfg.steps if until_step is None else min(cfg.steps, until_step)
    bar = tqdm(total=cfg.steps * cfg.batch_size, initial=step * cfg.batch_size, unit="tok",
               unit_scale=True, desc=f"train[{worker}]" if member_ids is not None else "train",
               disable=not progress, dynamic_ncols=True)

    def last_good() -> str:
        if not ckpt_path.exists():
            return "no checkpoint was written yet"
        return f"the last good checkpoint is {ckpt_path} (step {_load_checkpoint(ckpt_path, 'cpu')['step']})"

    def save_checkpoint():
        _atomic_save({"version": CHECKPOINT_VERSION, "step": step, "reader": stream.state_dict(),
                      "config": cfg.to_json(), "members": {m.cfg.name: m.state() for m in members}},
                     ckpt_path)

    for m in members:
        m.sae.train()
    batches = iter(stream) if step < total else iter(())
    for batch in batches:
        xs = {}
        for hp in hookpoints:
            raw = batch.acts[hp]
            if not torch.isfinite(raw).all():
                bad_row = int(batch.rows[(~torch.isfinite(raw)).any(1)][0])
                raise SasaError(
                    f"step {step + 1}: the batch of {hp} holds NaN/Inf (row {bad_row}, chunk "
                    f"{bad_row // chunk_rows}); training stopped, {last_good()}; check the cache "
                    f"with `sasa info --verify {cache.url}`")
            if on_cuda:
                raw = raw.pin_memory().to(device, non_blocking=True)
            xs[hp] = (raw.float() - norm[hp][0]) / norm[hp][1]
        nuc_scale = float(cfg.nuc_every) if step % cfg.nuc_every == 0 else 0.0
        for m in members:
            plan = schedule_at(m.sae_cfg, step, cfg.steps, cfg.batch_size)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda and cfg.autocast):
                o = m.sae(xs[m.cfg.hookpoint], nuc_scale=nuc_scale, **plan._asdict())
            m.opt.zero_grad(set_to_none=True)
            o.loss.backward()
            m.opt.step()
            m.sched.step()
            m.sae.post_step()
            for name, n in after_step(m.sae, xs[m.cfg.hookpoint], m.opt, step, cfg.steps,
                                      plan).items():
                m.changed[name] += n
            m.accumulate(o)
        step += 1
        bar.update(cfg.batch_size)
        if step % cfg.log_every == 0 or step == cfg.steps:
            for m in members:
                last[m.cfg.name] = line = m.metrics(step, step * cfg.batch_size)
                if not math.isfinite(line["loss"]):
                    raise SasaError(f"step {step}: SAE {m.cfg.name} reached a non-finite loss; lower its lr "
                                    f"(now {m.lr:g}); {last_good()}")
                with open(out / m.cfg.name / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(line) + "\n")
            lines = list(last.values())
            bar.set_postfix_str(
                f"loss {max(l['loss'] for l in lines):.4f} fvu {min(l['fvu'] for l in lines):.3f}-"
                f"{max(l['fvu'] for l in lines):.3f} L0 {np.mean([l['l0_coords'] for l in lines]):.1f} "
                f"dead {max(l['dead_fraction'] for l in lines):.2f}")
        if step >= total:
            break
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            save_checkpoint()
    bar.close()
    if hasattr(batches, "close"):
        batches.close()  # stop the reader's prefetch threads now, not at garbage collection
    save_checkpoint()
    if step < cfg.steps:  # stopped early on purpose (until_step): no final SAEs yet
        return TrainResult({}, step, step * cfg.batch_size, stream.chunks_read, last)

    saved = {}
    for m in members:
        sae = m.sae.to("cpu").eval()
        mean, scale = norm[m.cfg.hookpoint]
        sae.fold_normalisation(mean.cpu(), scale)  # the saved SAE applies to raw activations
        folder = save_sae(sae, out / m.cfg.name)
        (folder / "train.json").write_text(json.dumps({
            "member": {"name": m.cfg.name, "hookpoint": m.cfg.hookpoint, "lr": m.lr, "sae": m.cfg.sae},
            "run": cfg.to_json(), "cache_fingerprint": cache.fingerprint,
            "normalisation": {"mean_norm": float(mean.norm()), "scale": scale},
            "steps": step, "tokens": step * cfg.batch_size, "final": last.get(m.cfg.name)}, indent=2) + "\n")
        saved[m.cfg.name] = folder
    return TrainResult(saved, step, step * cfg.batch_size, stream.chunks_read, last)
