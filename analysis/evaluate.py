"""``sasa eval``: evaluate trained SAEs on a cache, all of them in one read pass.

The cache is opened read-only (``open_cache``), so an evaluation can run while a harvest is
still writing: it sees the shards committed when it starts. Nothing is ever written under the
cache; outputs go beside the SAE (``eval.json``, ``contexts.parquet``, ``codes.parquet``,
``groups.npz``) or to ``--out``.

The pass is ``sasa.analysis.scan`` (whole chunks in row order, exact mergeable partial results),
in this process or, for ``tokens=None`` (the whole cache), over Ray actors
(``sasa.analysis.distributed``) with the same result.

What one pass accumulates (see ``sasa.analysis.metrics`` for the definitions): FVU and SAEBench's
explained variance, L0 in groups and coordinates, per-unit firing (dead fraction), a
histogram of log2 activation and the max activation per group, top contexts per group and the
first codes of each group for 2-D views; then from the weights:
effective ranks and the largest decoder overlap between groups. On a synthetic cache, the
first ``synth_samples`` evaluated tokens are also scored against the planted features
(splitting, subspace recovery, effective rank against the true dimension). For causal LMs the
splice-in scores run the model with the reconstruction in place (``sasa.analysis.splice``).

Trade-off: there is no held-out split in a cache, so the evaluated tokens are the cache's first
rows in order; a trained SAE may have seen them. Harvest a separate cache
for a strict held-out number.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from sasa.analysis import metrics as M
from sasa.analysis.contexts import context_table, load_tokenizer_for
from sasa.analysis.eval_config import EvalConfig
from sasa.devices import resolve_device
from sasa.errors import SasaError, check_writable

EVAL_VERSION = 1


class EvalResult(NamedTuple):
    report: dict
    """Everything written to eval.json."""
    path: Path
    """eval.json."""
    contexts: Path | None
    codes: Path | None


def _train_info(sae_dir: Path) -> dict:
    """train.json beside our SAEs; for SAELens / sparsify folders, their hookpoint in its keys."""
    from sasa.interop.foreign import sae_info

    return sae_info(sae_dir)


def _resolve_hookpoint(cfg: EvalConfig, cache, info: dict) -> str:
    if cfg.hookpoint:
        return cache.check_hookpoint(cfg.hookpoint)
    hp = info.get("member", {}).get("hookpoint")
    if hp:
        return cache.check_hookpoint(hp)
    if len(cache.hookpoints) == 1:
        return next(iter(cache.hookpoints))
    raise SasaError(f"{cache.url} has several hookpoints ({', '.join(cache.hookpoints)}) and the SAE "
                    "names none; pass --hookpoint")


def cache_model(cache, override: str | None = None) -> str | None:
    """The model a cache was harvested from (the harvester's config), or ``override``."""
    if override:
        return override
    return cache.attrs.get("harvest", {}).get("config", {}).get("model")


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def load_eval_sae(sae_dir):
    """The SAE in ``sae_dir`` (ours, SAELens or sparsify) as evaluation runs it: float32, eval
    mode, on the CPU."""
    from sasa.interop.foreign import load_any_sae

    return load_any_sae(Path(sae_dir)).sae.float().eval()


def evaluate(cfg: EvalConfig) -> EvalResult:
    """Evaluate ``cfg.sae`` on ``cfg.cache`` and write eval.json (and Parquet files) beside it."""
    return evaluate_many([cfg])[0]


#: EvalConfig fields that every SAE of one pass must share.
PASS_FIELDS = ("cache", "tokens", "batch_size", "exclude", "contexts", "view_tokens", "synth_samples", "device")


def evaluate_many(cfgs: list[EvalConfig], *, workers: int = 0, address: str | None = None,
                  on_unit=None) -> list[EvalResult]:
    """Evaluate several SAEs on one cache in one read pass (``sasa.analysis.scan``).

    ``workers`` > 0 spreads the pass over that many Ray actors (``sasa.analysis.distributed``;
    whole cache only, ``tokens=None``), on the cluster at ``address`` or a local one; the result
    is the single-process one. ``on_unit(done, total)`` reports finished work units."""
    from sasa.analysis.distributed import ScanJob, scan_on_ray, unit_chunks
    from sasa.analysis.scan import ScanSettings, scan_chunks
    from sasa.store import open_cache

    first = cfgs[0]
    for cfg in cfgs:  # before any work: an unwritable output must not cost a pass, nor leave files
        check_writable(cfg.out_path, "eval output", folder=False)
    for cfg in cfgs[1:]:
        diffs = [k for k in PASS_FIELDS if getattr(cfg, k) != getattr(first, k)]
        if diffs:
            raise SasaError(f"SAEs evaluated in one pass must share {', '.join(diffs)}; evaluate them separately")
    if workers and first.tokens is not None:
        raise SasaError("--workers evaluates the whole cache; pass --tokens all (or drop --workers)")
    cache = open_cache(first.cache, first.storage_options)
    members = []
    for cfg in cfgs:
        sae_dir = Path(cfg.sae)
        sae = load_eval_sae(sae_dir)
        info = _train_info(sae_dir)
        hp = _resolve_hookpoint(cfg, cache, info)
        if cache.hookpoints[hp] != sae.cfg.d_in:
            raise SasaError(f"the SAE reads width {sae.cfg.d_in} but {hp} in {cache.url} has width "
                            f"{cache.hookpoints[hp]}; pick the matching hookpoint or cache")
        members.append((sae, hp, info))
    synthetic = "synthetic" in cache.attrs
    settings = ScanSettings(batch_size=first.batch_size, exclude=tuple(first.exclude), contexts=first.contexts,
                            view_tokens=first.view_tokens, synth_samples=first.synth_samples if synthetic else 0)
    if workers:
        job = ScanJob(cache=first.cache, saes=[c.sae for c in cfgs], hookpoints=[hp for _, hp, _ in members],
                      settings=settings, storage_options=first.storage_options, device=first.device)
        parts = scan_on_ray(job, workers=workers, address=address, on_unit=on_unit).partials
    else:
        device = resolve_device(first.device)
        budget = cache.n_tokens if first.tokens is None else min(first.tokens, cache.n_tokens)
        with tqdm(total=budget, unit="tok", unit_scale=True, desc="eval", disable=not first.progress) as bar:
            parts = scan_chunks(cache, [(sae.to(device), hp) for sae, hp, _ in members], unit_chunks(cache, 0, 1),
                                settings, device=device, budget=first.tokens, on_rows=bar.update)
    return [_report(cfg, cache, sae.cpu(), hp, info, part) for cfg, (sae, hp, info), part in zip(cfgs, members, parts)]


def _report(cfg: EvalConfig, cache, sae, hp: str, info: dict, part) -> EvalResult:
    """Everything after the pass for one SAE: weight metrics, ground truth, splice-in, files."""
    sae_dir = Path(cfg.sae)
    G, R = sae.cfg.groups, sae.cfg.rank
    synthetic = "synthetic" in cache.attrs
    top, views = part.top, part.views
    rm, sp = part.recon.result(), part.sparse.result()
    with torch.no_grad():
        ranks = sae.effective_ranks()
        overlap = M.max_subspace_overlap(sae.decoder_GDR) if G > 1 else None
    live = sp.frequency_G > 0
    report = {
        "version": EVAL_VERSION,
        "sae": str(sae_dir), "name": info.get("member", {}).get("name", sae_dir.name),
        "source": info.get("source", "sasa"),
        "sae_config": asdict(sae.cfg), "cache": str(cfg.cache), "cache_fingerprint": cache.fingerprint,
        "hookpoint": hp, "train_tokens": info.get("tokens"),
        "eval_config": {k: v for k, v in asdict(cfg).items() if k != "storage_options"},
        "n_tokens": rm.n_tokens,
        "fvu": rm.fvu, "explained_variance": rm.explained_variance,
        "explained_variance_legacy": rm.explained_variance_legacy, "mse": rm.mse, "cosine": rm.cosine,
        "l2_ratio": rm.l2_ratio, "l0_groups": sp.l0_groups, "l0_coords": sp.l0_coords,
        "dead_fraction": sp.dead_fraction,
        "dead_fraction_train": float(sae.dead_mask().float().mean()),
        "eff_rank_hist": M.rank_histogram(ranks.threshold_G.numpy(), R),
        "eff_rank_hist_live": M.rank_histogram(ranks.threshold_G.numpy()[live], R),
        "eff_rank_entropy_mean": float(ranks.entropy_G.mean()),
        "max_overlap_mean": float(overlap.max_overlap_G.mean()) if overlap else None,
        "max_overlap_max": float(overlap.max_overlap_G.max()) if overlap else None,
        "overlap_above_0.9": float((overlap.max_overlap_G > 0.9).mean()) if overlap else None,
    }
    if synthetic and part.first is not None and part.first.codes is not None:
        report["synthetic"] = synthetic_scores(cache, sae, torch.from_numpy(part.first.codes),
                                               torch.from_numpy(part.first.rows))

    model = cache_model(cache, cfg.model)
    if cfg.splice_seqs and model:
        from sasa.analysis.splice import is_causal_lm
        if is_causal_lm(model):
            report["splice"] = splice_for_cache(cache, sae, hp, model, cfg.splice_seqs,
                                                cfg.exclude, progress=cfg.progress)._asdict()
        else:
            report["splice"] = {"skipped": f"{model} is not a causal LM"}
    if cfg.absorption:
        if not model:
            raise SasaError(f"{cache.url} names no model; pass --model for the absorption eval")
        from sasa.analysis.absorption import AbsorptionConfig, absorption, word_activations
        acfg = AbsorptionConfig(model=model, hookpoint=hp)
        report["absorption"] = absorption(sae, word_activations(acfg, progress=cfg.progress), acfg).to_json()

    out = cfg.out_path
    out.parent.mkdir(parents=True, exist_ok=True)
    ctx_path = codes_path = None
    import pyarrow.parquet as pq
    if top is not None:
        tokenizer, tok_name = load_tokenizer_for(cache, cfg.tokenizer)
        ctx_path = _beside(out, "contexts")
        pq.write_table(context_table(cache, top, tokenizer=tokenizer, window=cfg.window), ctx_path)
        report["contexts"] = {"path": ctx_path.name, "tokenizer": tok_name, "per_group": cfg.contexts}
    if views is not None:
        codes_path = _beside(out, "codes")
        table = views.table(n_groups=cfg.view_groups)
        pq.write_table(table, codes_path)
        report["codes"] = {"path": codes_path.name, "groups": sorted(set(table.column("group").to_pylist()))}
    groups_path = out.with_name("groups.npz" if out.stem == "eval" else f"{out.stem}.groups.npz")
    with torch.no_grad():
        sv_GR = sae.map_singular_values().reshape(G, -1).double().numpy()
    _write_groups(groups_path, part, sp.frequency_G, ranks.threshold_G.numpy(), sv_GR)
    report["groups"] = {"path": groups_path.name}
    report = _json_safe(report)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return EvalResult(report, out, ctx_path, codes_path)


def _write_groups(path: Path, part, frequency_G, eff_rank_G, sv_GR) -> None:
    """Per-group arrays for the browser: firing frequency, max activation, log2-binned
    activation histogram, effective rank and the singular values of each group's map."""
    from sasa.analysis.scan import hist_edges

    np.savez_compressed(path, frequency_G=frequency_G, max_G=part.max_G, hist_GH=part.hist_GH,
                        edges_H1=hist_edges(), eff_rank_G=eff_rank_G, singular_values_GR=sv_GR)


def _beside(out: Path, kind: str) -> Path:
    """contexts.parquet beside eval.json; <stem>.contexts.parquet beside any other name."""
    return out.with_name(f"{kind}.parquet" if out.stem == "eval" else f"{out.stem}.{kind}.parquet")


def synthetic_scores(cache, sae, codes_NGR: torch.Tensor, rows_N: torch.Tensor) -> dict:
    """Splitting, subspace recovery and effective rank per planted feature."""
    from sasa.analysis.splitting import splitting
    from sasa.analysis.synth import load_truth

    truth = load_truth(cache)
    rows = rows_N.numpy()
    lo, hi = int(rows.min()), int(rows.max()) + 1
    active_NF = truth.active(cache, lo, hi)[rows - lo]
    coords_NK = truth.coords(cache, lo, hi)[rows - lo]
    decoder_GDR = sae.decoder_GDR.detach().double()
    split = splitting(codes_NGR.double(), decoder_GDR, active_NF, truth.bases, coords_NK=coords_NK)
    rec = M.subspace_recovery(decoder_GDR, truth.bases)
    eff_G = sae.effective_ranks().threshold_G.numpy()
    eff_best_F = eff_G[rec.best_unit_F]
    dims = truth.dims_F

    def by_dim(v):
        return {int(k): float(np.nanmean(v[dims == k])) if np.isfinite(v[dims == k]).any() else None
                for k in sorted(set(dims.tolist()))}

    return {
        "n_samples": int(len(rows)),
        "dims_F": dims, "units_F": split.units_F, "capture_F": split.capture_F,
        "n_on_F": split.n_on_F, "recovery_F": rec.recovery_F, "best_unit_F": rec.best_unit_F,
        "eff_rank_best_F": eff_best_F,
        "units_by_dim": split.units_by_dim, "recovery_by_dim": by_dim(rec.recovery_F),
        "capture_by_dim": by_dim(split.capture_F), "eff_rank_by_dim": by_dim(eff_best_F.astype(float)),
        "eff_rank_matches_dim": float(np.mean(eff_best_F == np.minimum(dims, sae.cfg.rank))),
    }


def splice_for_cache(cache, sae, hookpoint: str, model: str, n_seqs: int, exclude, *, progress=False):
    """Splice-in scores on the cache's first committed sequences."""
    from sasa.analysis.splice import load_causal_lm, sae_reconstruct, splice_scores
    from sasa.store.masks import special_mask

    seqs = []
    for s in cache.committed_shards():
        start = s * cache.shard_seqs
        seqs.extend(range(start, start + cache.shard_seqs))
        if len(seqs) >= n_seqs:
            break
    tokens_NT = cache.tokens.get_orthogonal_selection((np.array(seqs[:n_seqs]), slice(None)))
    keep_NT = cache.row_mask(tokens_NT.reshape(-1), exclude).reshape(tokens_NT.shape)
    pad = cache.attrs.get("special_token_ids", {}).get("pad", [])
    target_ok_NT = ~special_mask(tokens_NT.reshape(-1), {"pad": pad}, ["pad"]).reshape(tokens_NT.shape)
    lm = load_causal_lm(model)
    return splice_scores(lm, hookpoint, sae_reconstruct(sae), tokens_NT, keep_NT=keep_NT,
                         target_ok_NT=target_ok_NT, progress=progress)
