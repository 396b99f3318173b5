"""Run shards on Ray actors: one per GPU, or N CPU actors, pulling shards from the driver.

Why actors and not tasks: loading a model costs seconds to minutes, so each actor loads it
once and then takes shard after shard. The driver keeps two shards in flight per actor (the
actor is threaded: one shard computes while the previous one is written). An actor that dies
(``ray.kill``, a lost node, an OOM kill) fails its in-flight shards; the driver puts them back
at the front of the queue and starts a replacement, which is fed only once it has loaded the
model, so surviving actors keep draining the queue even when the replacement cannot be placed.
Shards are deterministic, so a shard run twice writes the same bytes (and the store turns a
repeat of a committed shard into a no-op).

Only small things travel: the ``WorkerSpec`` (model name, URL, layout) once per actor and each
shard's token ids once, via the object store. The driver never loads weights.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable

import numpy as np

from sasa.harvester.runner import ShardDone, ShardRunner, WorkerSpec
from sasa.errors import SasaError

IN_FLIGHT_PER_ACTOR = 2
MAX_ATTEMPTS = 4            # per shard, counting attempts lost to dead actors
START_TIMEOUT_S = 600.0     # no live actor and none able to start for this long: give up


class HarvestActor:
    """Ray actor body: loads the model in ``start`` and then runs shards."""

    def __init__(self, spec: WorkerSpec, threads: int) -> None:
        self.spec = spec
        self.threads = threads
        self.runner: ShardRunner | None = None

    def start(self) -> str:
        self.runner = ShardRunner(self.spec, threads=self.threads)
        return self.runner.device

    def run_shard(self, index: int, tokens_SC: np.ndarray) -> ShardDone:
        return self.runner.run_shard(index, tokens_SC)


def _unwrap(err: Exception) -> Exception:
    """A task's own exception, with SasaError kept as a one-line user error."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, SasaError):
        return SasaError(str(cause))
    return err


def run_on_ray(spec: WorkerSpec, tokens_NC: np.ndarray, shard_seqs: int, pending: list[int], *,
               workers: int | None, address: str | None, temp_dir: str | None,
               on_done: Callable[[ShardDone], None], name_prefix: str = "sasa-harvest") -> None:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    started_ray = False
    if not ray.is_initialized():
        kwargs = {"include_dashboard": False, "logging_level": "warning"}
        if address is None and temp_dir:
            kwargs["_temp_dir"] = temp_dir
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as err:
            raise SasaError(f"cannot join the Ray cluster at {address!r} ({err}); start it with "
                            "`ray start --head` or drop --address to run locally") from None
        started_ray = True

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    n = workers or gpus or 1
    threads = 1 if gpus else max(1, int(resources.get("CPU", 1)) // n)
    actor_cls = ray.remote(HarvestActor)
    actor_options = {"num_cpus": 1, "num_gpus": 1 if gpus else 0,
                     "max_concurrency": IN_FLIGHT_PER_ACTOR}
    run_id = uuid.uuid4().hex[:8]
    S = shard_seqs
    token_refs = {i: ray.put(np.ascontiguousarray(tokens_NC[i * S:(i + 1) * S])) for i in pending}

    queue = deque(pending)
    attempts = {i: 0 for i in pending}
    live: dict = {}        # actor -> number of shards in flight
    starting: dict = {}    # start() ref -> actor
    inflight: dict = {}    # run_shard ref -> (actor, shard)
    made = 0
    last_progress = time.monotonic()

    def new_actor():
        nonlocal made
        if made >= n * MAX_ATTEMPTS:
            raise SasaError(f"{made} Ray workers died; check the workers' memory and the Ray "
                            "logs, then rerun to resume")
        actor = actor_cls.options(name=f"{name_prefix}-{run_id}-{made}", **actor_options).remote(spec, threads)
        made += 1
        starting[actor.start.remote()] = actor

    def feed(actor):
        while live.get(actor, IN_FLIGHT_PER_ACTOR) < IN_FLIGHT_PER_ACTOR and queue:
            i = queue.popleft()
            attempts[i] += 1
            if attempts[i] > MAX_ATTEMPTS:
                raise SasaError(f"shard {i} was lost {MAX_ATTEMPTS} times as workers died; check "
                                "the workers' memory and the Ray logs, then rerun to resume")
            inflight[actor.run_shard.remote(i, token_refs[i])] = (actor, i)
            live[actor] += 1

    def drop(actor):
        if live.pop(actor, None) is not None:
            new_actor()  # replace it; the shards it held come back as errors and get requeued

    try:
        for _ in range(n):
            new_actor()
        while queue or inflight:
            refs = list(starting) + list(inflight)
            ready, _ = ray.wait(refs, num_returns=1, timeout=5.0)
            if not ready:
                if not live and time.monotonic() - last_progress > START_TIMEOUT_S:
                    raise SasaError(f"no Ray worker could start in {START_TIMEOUT_S:.0f} s; the "
                                    f"cluster needs a free {'GPU' if gpus else 'CPU'} per worker")
                continue
            ref = ready[0]
            if ref in starting:
                actor = starting.pop(ref)
                try:
                    ray.get(ref)
                except RayActorError:  # died while loading (e.g. its node went away)
                    new_actor()
                    continue
                except RayTaskError as err:
                    raise _unwrap(err) from None
                live[actor] = 0
                last_progress = time.monotonic()
                feed(actor)
                continue
            actor, i = inflight.pop(ref)
            try:
                done = ray.get(ref)
            except RayActorError:
                queue.appendleft(i)
                drop(actor)
                for other in list(live):
                    feed(other)
                continue
            except (RayTaskError, GetTimeoutError) as err:
                raise _unwrap(err) from None
            live[actor] -= 1
            last_progress = time.monotonic()
            on_done(done)
            feed(actor)
    finally:
        for actor in [*live, *starting.values()]:
            ray.kill(actor)
        if started_ray:
            ray.shutdown()
