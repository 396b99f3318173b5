"""Spreading a run's SAEs over Ray actors: one GPU each on a cluster, CPU actors otherwise.

Members are dealt round-robin to ``workers`` actors; each actor streams the cache itself (one
read pass per actor, shared by its members) and writes its SAEs, metrics and checkpoint
(``checkpoints/worker-<k>.pt``) under the same output folder, which must therefore be shared
storage on a multi-node cluster. Resume works per actor, exactly as in one process. The driver
holds the folder's lock (``sasa.trainer.outdir``) for the whole run; the actors write under it.
"""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from sasa.trainer.config import TrainConfig
from sasa.trainer.loop import TrainResult, train
from sasa.trainer.outdir import claim


class TrainWorker:
    """A Ray actor that runs ``train`` on a subset of members."""

    def run(self, cfg: TrainConfig, out: str, member_ids: list[int], worker: int, resume: bool):
        return train(cfg, out, resume=resume, member_ids=member_ids, worker=worker, progress=False)


def train_distributed(cfg: TrainConfig, out: str | Path, *, resume: bool = False,
                      overwrite: bool = False, address: str | None = None) -> TrainResult:
    """Train with ``cfg.workers`` Ray actors; returns the merged result."""
    with claim(out, cfg.to_json(), resume=resume, overwrite=overwrite):
        return _run_actors(cfg, out, resume, address)


def _run_actors(cfg: TrainConfig, out: str | Path, resume: bool, address: str | None) -> TrainResult:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True)
    n = min(cfg.workers, len(cfg.members))
    groups = [list(range(k, len(cfg.members), n)) for k in range(n)]
    use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    actor_cls = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=1)(TrainWorker)
    actors = [actor_cls.remote() for _ in groups]
    pending = {a.run.remote(cfg, str(out), g, k, resume): k for k, (a, g) in enumerate(zip(actors, groups))}
    results = {}
    with tqdm(total=len(pending), desc="workers", unit="worker") as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            results[pending.pop(done[0])] = ray.get(done[0])
            bar.update(1)
    for a in actors:
        ray.kill(a)
    merged = [results[k] for k in sorted(results)]
    return TrainResult(
        saes={k: v for r in merged for k, v in r.saes.items()}, steps=merged[0].steps,
        tokens=merged[0].tokens, chunks_read=sum(r.chunks_read for r in merged),
        final={k: v for r in merged for k, v in r.final.items()})
