"""The harvest driver: check everything, pack the tokens, create the cache, run the shards.

Order matters for failing cleanly: the model's config, the hookpoints, the context length,
the output location and the dataset are all checked before anything is written, so a bad
input leaves nothing behind. After that the store's commit protocol guarantees a reader never
sees a half-written shard, and a rerun of the same command resumes with the same bytes.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from sasa import models
from sasa.devices import resolve_device
from sasa.errors import SasaError
from sasa.harvester import corpus, packing
from sasa.harvester.config import HarvestConfig
from sasa.harvester.runner import ShardDone, ShardRunner, WorkerSpec

#: Format of the harvester's own attrs; bump when packing or attrs change meaning.
HARVESTER_VERSION = 1
#: Default shard size in tokens: big enough that per-shard overheads vanish, small enough that a
#: lost shard costs little and the progress bar moves.
SHARD_TOKENS = 1 << 16


class HarvestResult(NamedTuple):
    url: str
    n_tokens: int            # tokens in the finished cache
    n_shards: int
    shards_run: int          # shards computed by this call (the rest were already committed)
    seconds: float
    tokens_per_s: float      # over the shards run by this call
    stats: dict              # {hookpoint: sasa.store.HookpointStats}
    tokens_asked: int        # what the dataset was asked for: --tokens in whole shards


class Plan(NamedTuple):
    spec: WorkerSpec
    tokens_NC: np.ndarray
    shard_seqs: int
    attrs: dict
    seqs_asked: int          # sequences asked of the dataset (fewer in tokens_NC: it ran out)


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_out(config: HarvestConfig) -> None:
    """Refuse a location that holds something else, or a cache made with another config,
    before any work (the store refuses again at creation, after packing)."""
    from sasa.store import open_cache
    from sasa.store.layout import config_diff
    from sasa.store.location import Kind, probe
    kind = probe(config.out, config.storage_options or None)
    if kind is Kind.OTHER:
        raise SasaError(f"{config.out!r} holds files that are not a sasa cache; choose a new or "
                        "empty location (sasa never deletes what it did not write)")
    if kind is Kind.SASA and not config.overwrite:
        old = open_cache(config.out, config.storage_options or None).attrs.get("harvest", {})
        old_cfg, new_cfg = old.get("config", {}), config.content()
        diffs = config_diff(old_cfg, new_cfg)
        if diffs:
            raise SasaError(f"{config.out!r} holds a cache made with a different config "
                            f"({'; '.join(diffs)}); rerun with the same settings to resume, or "
                            "pass --overwrite to replace it")


def plan(config: HarvestConfig, *, gpus: bool | None = None) -> Plan:
    """Validate the config against the model and data, and pack the tokens (no writes)."""
    info = models.model_info(config.model, revision=config.revision,
                             trust_remote_code=config.trust_remote_code)
    hps = models.check_hookpoints(info, config.hookpoints)
    models.check_ctx_len(info, config.ctx_len)
    _check_out(config)
    source = corpus.open_dataset(config.dataset, config.text_column)
    tokenizer = models.load_tokenizer(info.source, revision=config.revision,
                                      trust_remote_code=config.trust_remote_code)

    n_seq = config.tokens // config.ctx_len
    if n_seq == 0:
        raise SasaError(f"--tokens {config.tokens} is less than one sequence of ctx_len="
                        f"{config.ctx_len}; ask for more tokens")
    shard_seqs = min(config.shard_seqs or max(1, SHARD_TOKENS // config.ctx_len), n_seq)
    asked = n_seq // shard_seqs * shard_seqs
    packed = packing.pack_source(source, tokenizer, ctx_len=config.ctx_len, n_seq=asked,
                                 shard_seqs=shard_seqs, policy=config.bos,
                                 progress=config.progress)

    if gpus is None:
        gpus = resolve_device(config.device).type == "cuda"
    model_dtype = config.model_dtype
    if model_dtype == "auto":
        model_dtype = "bfloat16" if gpus else "float32"
    special = packing.special_tokens(tokenizer)
    content = config.content()
    attrs = {
        "producer": "sasa.harvester",
        "harvest": {"version": HARVESTER_VERSION, "config": content},
        "model": {"id": info.model_id, "revision": config.revision, "fingerprint": info.fingerprint,
                  "n_layers": info.n_layers, "d_model": info.d_model, "dtype": model_dtype},
        "tokenizer": {"id": info.model_id, "class": type(tokenizer).__name__,
                      "vocab_size": len(tokenizer), "fingerprint": _tokenizer_fingerprint(tokenizer)},
        "dataset": {"name": source.name, "revision": source.revision, "kind": source.kind,
                    "text_column": config.text_column if source.kind == "text" else "input_ids"},
        "ctx_len": config.ctx_len,
        "bos_policy": config.bos,
        "special_token_ids": special.attrs(config.bos),
        "hookpoints": {hp.name: info.d_model for hp in hps},
        "dtype": config.dtype,
    }
    cache_kwargs = {"hookpoints": {hp.name: info.d_model for hp in hps}, "ctx_len": config.ctx_len,
                    "n_seq": len(packed.tokens_NC), "shard_seqs": packed.shard_seqs,
                    "dtype": config.dtype, "shard_objects": config.shard_objects, "attrs": attrs}
    spec = WorkerSpec(url=config.out, cache=cache_kwargs, model_source=info.source,
                      hookpoints=tuple(config.hookpoints), model_dtype=model_dtype,
                      batch_size=config.batch_size, device=config.device,
                      revision=config.revision, trust_remote_code=config.trust_remote_code,
                      storage_options=dict(config.storage_options))
    return Plan(spec, packed.tokens_NC, packed.shard_seqs, attrs, asked)


def _cluster_has_gpus(config: HarvestConfig) -> bool:
    if config.workers == 0:
        return resolve_device(config.device).type == "cuda"
    if config.device == "cpu":
        return False
    import ray
    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    if config.address is None:
        import torch
        return torch.cuda.is_available()
    return True  # a remote cluster: its workers decide; auto means bf16 on the GPUs it has


def harvest(config: HarvestConfig) -> HarvestResult:
    """Harvest activations into ``config.out``; rerun to resume. Returns what was done."""
    from sasa.store import create_cache, open_cache
    t0 = time.perf_counter()
    p = plan(config, gpus=_cluster_has_gpus(config))
    writer = create_cache(config.out, storage_options=config.storage_options or None,
                          overwrite=config.overwrite, **p.spec.cache)
    pending = writer.pending_shards()
    S, C = p.shard_seqs, config.ctx_len
    bar = tqdm(total=len(pending) * S * C, unit="tok", unit_scale=True, desc="harvest",
               disable=not config.progress, dynamic_ncols=True)
    committed = writer.n_shards - len(pending)
    bar.set_postfix_str(f"shards {committed}/{writer.n_shards}")
    t_run = time.perf_counter()

    def on_done(done: ShardDone) -> None:
        nonlocal committed
        committed += 1
        bar.update(done.tokens)
        bar.set_postfix_str(f"shards {committed}/{writer.n_shards}")

    try:
        if pending and config.workers == 0:
            run_local(p.spec, p.tokens_NC, S, pending, on_done)
        elif pending:
            from sasa.harvester.ray_harvest import run_on_ray
            run_on_ray(p.spec, p.tokens_NC, S, pending, workers=config.workers,
                       address=config.address, temp_dir=config.ray_temp_dir, on_done=on_done)
    finally:
        bar.close()
    run_s = time.perf_counter() - t_run
    cache = open_cache(config.out, config.storage_options or None)
    if not cache.complete:
        raise SasaError(f"shards {cache.pending_shards()[:8]} of {config.out!r} are not "
                        "committed; rerun the same command to finish them")
    writer.remove_stray_temporaries()  # left by workers killed mid-write; nothing runs now
    stats = {hp: cache.stats(hp) for hp in cache.hookpoints}  # merges the shards' moments
    return HarvestResult(config.out, cache.n_tokens, cache.n_shards, len(pending),
                         time.perf_counter() - t0, len(pending) * S * C / max(run_s, 1e-9), stats,
                         p.seqs_asked * C)


def run_local(spec: WorkerSpec, tokens_NC: np.ndarray, shard_seqs: int, pending: list[int],
              on_done, runner: ShardRunner | None = None) -> None:
    """Run shards in this process: two threads, so one shard is written while the next is
    computed (the same overlap a Ray actor has)."""
    runner = runner or ShardRunner(spec)
    S = shard_seqs
    with ThreadPoolExecutor(2, thread_name_prefix="sasa-shard") as pool:
        futures = [pool.submit(runner.run_shard, i, tokens_NC[i * S:(i + 1) * S])
                   for i in pending]
        try:
            for fut in as_completed(futures):
                on_done(fut.result())
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
