"""``sasa eval --tokens all --workers N``: one pass over the whole cache, split over Ray actors.

The committed chunks are cut into ``units`` disjoint work units with the reader's rank split
(unit u of U takes what rank u of world size U would read, unshuffled). Each actor opens the
cache and loads the SAEs once, then scans unit after unit (``sasa.analysis.scan``), returning
one ``Partial`` per SAE per unit; the driver keeps two units in flight per actor and merges the
results in unit order at the end, so the merge does not depend on which actor finished first.
Partials merge exactly (see ``scan``): the result equals the single-process scan, integer
fields and top-k rows identically, float64 sums to rounding.

A worker that dies mid-unit (OOM kill, lost node, ``ray.kill``) is restarted by Ray
(``max_restarts``) and its unfinished calls are retried (``max_task_retries``); a unit's result
is only used once it has come back whole, so a retried unit counts once. Should an actor run
out of restarts, its units go back to the queue for the others.

Units outnumber actors (4 per actor by default) so that a slow or restarted actor delays the
end by one unit, not by a whole rank's share; each unit's partial is small (G x (k + H) numbers
per SAE), so more units cost little.
"""

from __future__ import annotations

import os
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from sasa.analysis.scan import Partial, ScanSettings, merge_all, scan_chunks
from sasa.errors import SasaError

IN_FLIGHT_PER_ACTOR = 2
UNITS_PER_ACTOR = 4
MAX_RESTARTS = 4


@dataclass
class ScanJob:
    """What every actor needs to scan its units: small, sent once per actor."""

    cache: str
    """Cache URL."""
    saes: list[str]
    """SAE folders, one per member."""
    hookpoints: list[str]
    """The hookpoint each SAE reads."""
    settings: ScanSettings
    """What to keep."""
    storage_options: dict | None = field(default=None, repr=False)
    """fsspec options for the cache."""
    device: str = "cpu"
    """Where the SAEs run inside an actor."""


def unit_chunks(cache, unit: int, units: int) -> list[int]:
    """The chunks of work unit ``unit``: the reader's rank split with world size ``units``."""
    hp = next(iter(cache.hookpoints))
    return sorted(int(c) for c in cache.batches(hp, 1, shuffle=False, rank=unit, world_size=units).epoch_chunks(0))


def load_members(job: ScanJob):
    from sasa.analysis.evaluate import load_eval_sae
    from sasa.devices import resolve_device

    device = resolve_device(job.device)
    return [(load_eval_sae(s).to(device), hp) for s, hp in zip(job.saes, job.hookpoints)], device


class EvalActor:
    """Ray actor body: opens the cache and loads the SAEs once, then scans units."""

    def __init__(self, job: ScanJob, threads: int):
        import torch

        from sasa.store import open_cache

        torch.set_num_threads(threads)
        self.job = job
        self.cache = open_cache(job.cache, job.storage_options)
        self.members, self.device = load_members(job)

    def scan(self, unit: int, units: int) -> tuple[int, int, list[Partial]]:
        """(unit, this process's pid, one Partial per SAE)."""
        chunks = unit_chunks(self.cache, unit, units)
        return unit, os.getpid(), scan_chunks(self.cache, self.members, chunks, self.job.settings,
                                              device=self.device)


class RayScan:
    """The outcome of ``scan_on_ray``: merged partials and who computed them."""

    def __init__(self, partials: list[Partial], pids: dict[int, int]):
        self.partials = partials
        """One merged Partial per SAE."""
        self.pids = pids
        """unit -> pid of the worker process whose result was used."""


def scan_on_ray(job: ScanJob, *, workers: int, address: str | None = None, units: int | None = None,
                on_unit: Callable[[int, int], None] | None = None) -> RayScan:
    """Scan every committed chunk of ``job.cache`` with ``workers`` Ray actors.

    ``on_unit(done, total)`` is called on the driver after each unit comes back."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from sasa.store import open_cache

    cache = open_cache(job.cache, job.storage_options)
    n_chunks = len(cache.committed_shards()) * cache.layout.chunks_per_shard
    if n_chunks == 0:
        raise SasaError(f"{job.cache} has no committed shards yet; wait for the harvest or check the URL")
    units = min(units or workers * UNITS_PER_ACTOR, n_chunks)

    started = False
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, logging_level="warning", log_to_driver=False)
        except ConnectionError as err:
            raise SasaError(f"cannot join the Ray cluster at {address!r} ({err}); start it with "
                            "`ray start --head` or drop --address to run locally") from None
        started = True
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0)) if job.device != "cpu" else 0
    threads = 1 if gpus else max(1, int(resources.get("CPU", 1)) // workers)
    run = uuid.uuid4().hex[:8]
    actor_cls = ray.remote(EvalActor)
    options = dict(num_cpus=1, num_gpus=1 if gpus else 0, max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)
    actors = [actor_cls.options(name=f"sasa-eval-{run}-{k}", **options).remote(job, threads) for k in range(workers)]
    queue, inflight, results, pids = deque(range(units)), {}, {}, {}
    load = {a: 0 for a in actors}

    def feed(actor):
        while load[actor] < IN_FLIGHT_PER_ACTOR and queue:
            u = queue.popleft()
            inflight[actor.scan.remote(u, units)] = (actor, u)
            load[actor] += 1

    try:
        for a in actors:
            feed(a)
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            actor, u = inflight.pop(ready[0])
            load[actor] -= 1
            try:
                unit, pid, parts = ray.get(ready[0])
            except RayActorError:  # out of restarts: its units go to the others
                queue.appendleft(u)
                del load[actor]
                if not load:
                    raise SasaError(f"every Ray eval worker died ({MAX_RESTARTS} restarts each); check "
                                    "the workers' memory and the Ray logs") from None
                for other in load:
                    feed(other)
                continue
            except RayTaskError as err:
                cause = getattr(err, "cause", None)
                raise (SasaError(str(cause)) if isinstance(cause, SasaError) else err) from None
            results[unit], pids[unit] = parts, pid
            if on_unit is not None:
                on_unit(len(results), units)
            feed(actor)
    finally:
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()
    return RayScan(merge_all([results[u] for u in range(units)]), pids)
