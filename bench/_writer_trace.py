"""Where the writer's threads spend a harvest, and when the disk waits (``bench/harvest.py
--trace``): the write ceiling's pipeline (a free model, d = 4096, bf16, into a local folder),
with the writer's parts timed on every thread that runs them.

Parts: the checksum (``layout.crc32``), the statistics pass (``summarize_shard``), each chunk
object's put (``direct.put_local``) and zarr's writes of the small objects (tokens, moments:
``writer._write_all``). The disk is busy while a put runs; its idle time is the run minus the
union of the puts, split into the start (before the first put) and the gaps after it. Shards
whose threads start their checksums together and then put together leave the disk idle
during every such CPU phase: the trace shows that as gaps.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench import _write_ceiling as ceiling
from bench._write_ceiling import FreeRunner, drop, time_pipeline
from sasa.harvester.runner import WorkerSpec
from sasa.store import direct, writer
from sasa.store import layout as L

PARTS = ((L, "crc32", "checksum"), (writer, "summarize_shard", "statistics"),
         (direct, "put_local", "chunk puts"), (writer, "_write_all", "zarr's small writes"),
         (ceiling, "run_local", "the run"))


def trace_writer(root: Path, gb: float = 4.0, disk_threads: int = writer.DISK_THREADS,
                 shard_seqs: int = 512, ctx: int = 128, d: int = 4096) -> str:
    """Run the pipeline once on ``gb`` GB with ``disk_threads`` threads in the writer's disk
    queue and return its trace as markdown."""
    seqs = max(1, int(gb * 1e9) // (ctx * d * 2 * shard_seqs)) * shard_seqs
    cache = dict(hookpoints={"resid_post.3": d}, ctx_len=ctx, n_seq=seqs,
                 shard_seqs=shard_seqs, dtype="bfloat16", attrs={})
    spec = WorkerSpec(url=str(root / "trace"), model_source="", hookpoints=("x.0",),
                      model_dtype="float32", batch_size=32, cache=cache)
    spans = []  # (thread, part, start, end)
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in PARTS]
    saved.append((writer, "DISK_THREADS", writer.DISK_THREADS))
    writer.DISK_THREADS = disk_threads

    def timed(fn, part):
        def run(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spans.append((threading.current_thread().name, part, t, time.perf_counter()))
        return run
    for mod, name, part in PARTS:
        setattr(mod, name, timed(getattr(mod, name), part))
    try:
        os.sync()
        seconds = time_pipeline(FreeRunner, spec, np.ones((seqs, ctx), np.int64), shard_seqs, root)
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)
        drop(spec.url)
    nbytes = seqs * ctx * d * 2
    (t0, t1), = [(a, b) for _, part, a, b in spans if part == "the run"]
    puts = sorted((a - t0, b - t0) for _, part, a, b in spans if part == "chunk puts")
    busy, gaps, end = 0.0, [], puts[0][0]
    for a, b in puts:
        if a > end:
            gaps.append(a - end)
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    long_gaps = [g for g in gaps if g > 1e-3]
    per_part = defaultdict(float)
    threads = defaultdict(set)
    for thread, part, a, b in spans:
        per_part[part] += b - a
        threads[part].add(thread.rsplit("_", 1)[0])
    lines = [f"{disk_threads} disk thread{'s' * (disk_threads > 1)}: "
             f"{nbytes / 1e9:.1f} GB in {seconds:.2f} s: **{nbytes / seconds / 1e9:.2f} GB/s**; "
             f"the disk busy (a put running) {busy:.2f} s = {busy / seconds:.0%} of the run; "
             f"idle {puts[0][0]:.2f} s before the first put, {sum(gaps):.2f} s between puts "
             f"({len(long_gaps)} gaps over 1 ms, the longest {max(gaps, default=0) * 1e3:.0f} "
             f"ms), {t1 - t0 - end:.2f} s after the last.", "",
             "| part | seconds, summed over threads | threads |", "|---|---:|---|"]
    for _, _, part in PARTS[:-1]:
        lines.append(f"| {part} | {per_part[part]:.2f} | {', '.join(sorted(threads[part]))} |")
    return "\n".join(lines)
