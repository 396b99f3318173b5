"""The write ceiling: the harvest pipeline with the model replaced by a free function
(``FreeRunner``), against the machine's own write rate for new files on the same bytes
(``plain_write``), side by side in one run (``write_ceilings``; bench/harvest.py's rows, and
``--ceiling-only`` / ``--page-cache`` there).

At d=4096 (a 7B model's width) into a local folder, writing twice the page cache's dirty limit
(``--long-bytes``) so that it meets the disk's sustained rate as a long harvest does (with its
chunk files past the page cache, the default, and through it), and against it plain Python on
the same bytes as files of a chunk's size: through the page cache, past it with ``O_DIRECT``,
and with ``os.fdatasync`` after each; at d=384 to local disk, and at d=4096 into memory:// (the
writer's CPU cost), the latter also with numpy's huge-page advice turned off (does fresh-memory
first touch hold the writer back?), at the run's ``--tokens``.
"""

from __future__ import annotations

import mmap
import os
import queue
import shutil
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from bench._common import set_huge_page_advice
from sasa.harvester.harvest import run_local
from sasa.harvester.runner import ShardRunner, WorkerSpec, host_tensor
from sasa.store import layout as L


class FreeRunner(ShardRunner):
    """The harvest pipeline with the model replaced by a free function of the right shape."""

    def __init__(self, spec: WorkerSpec) -> None:  # no model: only the writer
        from sasa.store import create_cache
        import threading
        self.spec = spec
        self.writer = create_cache(spec.url, **spec.cache)
        self.layout = self.writer.layout
        self.compute_lock = threading.Lock()
        self.cuda = False
        self.store_dtype = torch.bfloat16
        self._buffers = queue.SimpleQueue()
        g = torch.Generator().manual_seed(0)
        for _ in range(2):  # a set for each of run_local's threads, filled once
            bufs = {hp: host_tensor((self.layout.shard_rows, d), torch.bfloat16, False)
                    for hp, d in self.layout.hookpoints.items()}
            for acts in bufs.values():
                acts.copy_(torch.randn(acts.shape, generator=g))
            self._buffers.put(bufs)

    def compute(self, tokens_SC):
        return self._host_buffers(tokens_SC.size)  # the runner's own buffers, as they are


def drop(url: str) -> None:
    """Delete a cache written by ``time_pipeline`` (a local folder or a memory:// one)."""
    if url.startswith("memory://"):
        import fsspec
        fs = fsspec.filesystem("memory")
        if fs.exists(url):
            fs.rm(url, recursive=True)
    else:
        shutil.rmtree(url, ignore_errors=True)


def time_pipeline(runner_factory, spec, tokens_NC, shard_seqs, root) -> float:
    drop(spec.url)
    runner = runner_factory(spec)
    t0 = time.perf_counter()
    run_local(spec, tokens_NC, shard_seqs, list(range(len(tokens_NC) // shard_seqs)),
              lambda done: None, runner=runner)
    return time.perf_counter() - t0


def plain_write(folder: Path, total: int, file_bytes: int, how: str = "buffered") -> float:
    """Seconds to write ``total`` bytes as new files of ``file_bytes`` with plain Python:
    ``how`` "buffered" (through the page cache), "sync" (``os.fdatasync`` after each file) or
    "direct" (``O_DIRECT``, from one page-aligned block: what the writer does by default)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    block = mmap.mmap(-1, file_bytes)  # page-aligned, as O_DIRECT needs
    block[:] = np.random.default_rng(0).integers(0, 255, file_bytes, dtype=np.uint8).tobytes()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if how == "direct" else 0)
    os.sync()
    t0 = time.perf_counter()
    for i in range(-(-total // file_bytes)):
        fd = os.open(folder / f"{i:06d}", flags, 0o644)
        try:
            os.write(fd, block)
            if how == "sync":
                os.fdatasync(fd)
        finally:
            os.close(fd)
    elapsed = time.perf_counter() - t0
    shutil.rmtree(folder, ignore_errors=True)
    return elapsed


def page_cache_runs(runs: int = 5, files: int = 48, file_bytes: int = 16 << 20) -> str:
    """GB/s of plain Python writing new files into the page cache, per 64 MiB, in ``runs``
    back-to-back runs of ``files`` files each: how steady this machine's buffered write rate is
    from one second to the next (the rate every local write, sasa's or not, meets)."""
    lines = ["| run | GB/s per 64 MiB, in order |", "|---|---|"]
    block = np.random.default_rng(0).integers(0, 255, file_bytes, dtype=np.uint8).tobytes()
    per = max(1, (64 << 20) // file_bytes)
    root = Path(tempfile.mkdtemp(prefix="sasa-pagecache-"))
    try:
        for run in range(runs):
            rates = []
            for i in range(0, files, per):
                t0 = time.perf_counter()
                for j in range(i, i + per):
                    with open(root / f"{run}-{j:06d}", "wb") as f:
                        f.write(block)
                rates.append(per * file_bytes / (time.perf_counter() - t0) / 1e9)
            lines.append(f"| {run + 1} | {' '.join(f'{r:.2f}' for r in rates)} |")
            for p in root.iterdir():
                p.unlink()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return "\n".join(lines)


#: The memory:// ceiling rows: the writer's CPU cost alone, and the same with numpy's huge-page
#: advice turned off (bench/_common.py).
MEMORY = "write ceiling, free model, d=4096, bf16, memory:// (no disk: the writer's CPU cost)"
NO_HUGE = "... the same, numpy's huge-page advice off"


def dirty_limit() -> int:
    """Bytes of dirty page cache a writer may build up before the kernel makes it wait for the
    disk (vm.dirty_bytes, else vm.dirty_ratio percent of the available memory); 0 if unknown."""
    vm = Path("/proc/sys/vm")
    try:
        fixed = int((vm / "dirty_bytes").read_text())
        if fixed:
            return fixed
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return avail * 1024 * int((vm / "dirty_ratio").read_text()) // 100
    except (OSError, StopIteration, ValueError):
        return 0


class Ceiling(NamedTuple):
    rows: list
    """(what, tokens/s or None, GB/s or None) table rows."""
    lines: list
    """The ratios, as markdown bullets."""


def write_ceilings(p, root: Path, repeats: int, long_bytes: int, limit: int) -> Ceiling:
    """The writer's ceiling (the pipeline with a free model) against the machine's own write
    rate for new files, measured on the same bytes in the same run.

    The target row writes ``long_bytes`` at d=4096, more than the page cache's dirty limit, so
    that the writer and plain Python alike meet the disk's sustained rate, as a long harvest
    does (its output soon outgrows the limit): the writer as it is (chunk files past the page
    cache, ``CacheWriter.direct_io``) and through the page cache, against plain Python writing
    the same bytes through the page cache, past it (``O_DIRECT``) and with ``fdatasync`` after
    each file. All write into pages the page cache freed a moment before: an untimed plain
    write of the same bytes comes first, and every row deletes its files before the next; the
    order of these rows alternates from round to round. On this VM a first touch of pages
    freed long ago costs a host fault (RESULTS_harvest.md), and the old order, writer first,
    left that cost to the writer alone. Beside them: the writer's CPU cost (d=4096 into
    memory://) and d=384 on local disk, at the run's own token count. ``limit``: the dirty
    limit when the run started, for the report."""
    tokens, S = p.tokens_NC, p.shard_seqs
    row_bytes = 4096 * 2 * tokens.shape[1]
    long_seqs = max(len(tokens), -(-long_bytes // row_bytes // S) * S)
    long_NC = np.resize(tokens, (long_seqs, tokens.shape[1]))  # the free model ignores the ids
    total, chunk = long_NC.size * 4096 * 2, L.DEFAULT_CHUNK_BYTES  # a chunk at d=4096

    def pipeline(d, url, ids, direct_io=True, advice=True):
        cache = {**p.spec.cache, "hookpoints": {"resid_post.3": d}, "n_seq": len(ids), "attrs": {}}
        spec = WorkerSpec(url=url, model_source="", hookpoints=("x.0",), model_dtype="float32",
                          batch_size=32, cache=cache)

        def factory(spec):
            runner = FreeRunner(spec)
            runner.writer.direct_io = direct_io
            return runner

        def seconds():
            set_huge_page_advice(advice)
            os.sync()  # as plain_write: no earlier row's dirty pages in the way
            t = time_pipeline(factory, spec, ids, S, root)
            set_huge_page_advice(True)
            drop(url)
            return t
        return ids.size * d * 2, ids.size, seconds

    def plain(how):
        return total, None, lambda: plain_write(root / "plain", total, chunk, how)
    side = "beyond" if total > limit else "within"
    long_rows = {
        f"write ceiling, free model, d=4096, bf16, local disk, {total / 1e9:.1f} GB, {side} the "
        "dirty limit": pipeline(4096, str(root / "long"), long_NC),
        "... the same, chunk files through the page cache (direct_io=False)":
            pipeline(4096, str(root / "long"), long_NC, direct_io=False),
        f"plain Python, the same {total / 1e9:.1f} GB as new {chunk >> 20} MiB files, through "
        "the page cache": plain("buffered"),
        "... past the page cache (O_DIRECT)": plain("direct"),
        "... through the page cache, fdatasync after each file": plain("sync"),
    }
    short_rows = {
        "write ceiling, free model, d=384, bf16, local disk":
            pipeline(384, str(root / "384"), tokens),
        MEMORY: pipeline(4096, "memory://sasa-bench/free4096", tokens),
        NO_HUGE: pipeline(4096, "memory://sasa-bench/free4096hp", tokens, advice=False),
    }
    everything = {**long_rows, **short_rows}
    plain_write(root / "plain", total, chunk)  # warm-up: the rows reuse freed pages
    best = dict.fromkeys(everything, float("inf"))
    for r in range(repeats):
        order = list(long_rows) if r % 2 == 0 else list(long_rows)[::-1]
        for name in order + list(short_rows):
            best[name] = min(best[name], everything[name][2]())
    gbs = {name: nbytes / best[name] / 1e9 for name, (nbytes, _, _) in everything.items()}
    rows = [(name, n_tok and n_tok / best[name], gbs[name])
            for name, (_, n_tok, _) in everything.items()]
    writer, buffered, *plains, synced = long_rows
    machine = max(gbs[name] for name in plains)
    lines = [
        f"- write ceiling at d=4096, {total / 1e9:.1f} GB (the dirty limit: "
        f"{limit / 1e9:.1f} GB at the start) / the faster of plain Python's two ways on the "
        "same bytes = "
        f"**{gbs[writer] / machine:.2f}** (target >= 0.9); with the chunk files through the page "
        f"cache {gbs[buffered] / machine:.2f}; / plain Python with fdatasync after each file = "
        f"{gbs[writer] / gbs[synced]:.2f}",
        f"- the writer without a disk (memory://) / plain Python's faster way on the disk = "
        f"{gbs[MEMORY] / machine:.2f} (above 1: the disk, not the writer's CPU work, sets the "
        "ceiling)",
        f"- the writer without a disk, numpy's huge-page advice on (its default) / off = "
        f"{gbs[MEMORY] / gbs[NO_HUGE]:.2f}",
    ]
    return Ceiling(rows, lines)
