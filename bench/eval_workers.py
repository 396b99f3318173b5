"""Whole-cache eval throughput: one process against 1 and 2 Ray workers, beside the bare read.

    nice -n 10 python bench/eval_workers.py --cache /tmp/democache [--repeats 1]

The SAEs are the demo sweep's seven (SASA r = 1, 2, 4, 8, TopK and ReLU on resid_post.4, TopK on
resid_post.2; 1536 coordinates, 32 active), randomly initialised: an evaluation's cost depends on
their shapes, not their training. One pass evaluates all seven (``sasa.analysis.scan``). Rows:
- read only: every committed chunk of both hookpoints read and decoded to float32, nothing else
  (what the pass reads; the ceiling the SAEs cannot beat);
- 1 process: ``scan_chunks`` in this process (torch on all cores);
- Ray, N workers: ``scan_on_ray`` on a local Ray with 2 CPUs, wall time including actor start-up.
tokens/s counts kept rows (BOS excluded) per second of wall time.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from sasa.analysis.distributed import ScanJob, load_members, scan_on_ray, unit_chunks
from sasa.analysis.scan import ScanSettings, read_chunk, scan_chunks
from sasa.store import open_cache
from sasa.trainer import SAE, SAEConfig, save_sae

DEEP, SHALLOW = "resid_post.4", "resid_post.2"


def demo_saes(folder: str, d: int, width: int = 1536, active: int = 32) -> tuple[list[str], list[str]]:
    shapes = [(DEEP, dict(arch="sasa", rank=r, groups=width // r, top_s=active // r)) for r in (1, 2, 4, 8)]
    shapes += [(DEEP, dict(arch="topk", groups=width, top_s=active)), (DEEP, dict(arch="relu", groups=width)),
               (SHALLOW, dict(arch="topk", groups=width, top_s=active))]
    dirs, hps = [], []
    for i, (hp, kw) in enumerate(shapes):
        path = os.path.join(folder, f"sae{i}")
        save_sae(SAE(SAEConfig(d_in=d, **kw), seed=i), path)
        dirs.append(path)
        hps.append(hp)
    return dirs, hps


def read_only(cache, hookpoints, exclude) -> int:
    rows = 0
    with ThreadPoolExecutor(1) as io:
        chunks = unit_chunks(cache, 0, 1)
        nxt = io.submit(read_chunk, cache, chunks[0], hookpoints, exclude)
        for i in range(len(chunks)):
            chunk = nxt.result()
            if i + 1 < len(chunks):
                nxt = io.submit(read_chunk, cache, chunks[i + 1], hookpoints, exclude)
            rows += len(chunk.rows)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cache = open_cache(args.cache)
    settings = ScanSettings()
    tmp = tempfile.mkdtemp(prefix="bench-eval-")
    dirs, hps = demo_saes(tmp, cache.hookpoints[DEEP])
    job = ScanJob(cache=args.cache, saes=dirs, hookpoints=hps, settings=settings)
    print(f"cache {args.cache}: {cache.n_tokens:,} rows, {len(unit_chunks(cache, 0, 1))} chunks; "
          f"{len(dirs)} SAEs; torch threads {torch.get_num_threads()}")
    results = {}

    def timed(name, fn):
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            n = fn()
            dt = time.perf_counter() - t0
            results.setdefault(name, []).append(n / dt)
            print(f"  {name}: {n:,} tokens in {dt:.1f} s = {n / dt:,.0f} tokens/s", flush=True)

    timed("read only (both hookpoints)", lambda: read_only(cache, sorted(set(hps)), settings.exclude))
    members, _ = load_members(job)
    timed("1 process", lambda: scan_chunks(cache, members, unit_chunks(cache, 0, 1), settings)[0].recon.n)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    try:
        for w in (1, 2):
            timed(f"Ray, {w} worker{'s' * (w > 1)}", lambda w=w: scan_on_ray(job, workers=w).partials[0].recon.n)
    finally:
        ray.shutdown()
    best = {k: max(v) for k, v in results.items()}
    one = best["Ray, 1 worker"]
    print("\n| run | tokens/s | x Ray 1 worker | x read only |\n|---|---:|---:|---:|")
    for k, v in best.items():
        print(f"| {k} | {v:,.0f} | {v / one:.2f} | {v / best['read only (both hookpoints)']:.3f} |")


if __name__ == "__main__":
    main()
