"""The small measurements behind the store's docstrings, side by side in one run.

    python bench/store_micro.py [--rows 65536] [--d 768] [--repeats 3]

- random row gathers vs whole-chunk reads from a local cache (store/reader.py's opening line):
  rows per second reading ``--rows`` rows one random row at a time against whole chunks;
- whole chunks read into a buffer (as the reader fills its windows) through zarr and as their
  files (``Cache.read_into``, store/direct.py), one thread;
- whole-row (void record) gathers vs element gathers of a [n, d] bf16 window
  (``store.reader._as_rows``), and ``np.take`` with ``mode="clip"`` (the reader's) vs the
  default ``mode="raise"``, which copies the output through a buffer;
- how well token ids compress with zarr's default codec (store/writer.py), on ids packed by
  the harvester from the built-in corpus with MiniLM's tokenizer;
- the first touch of fresh memory (a new 1 GiB numpy array, one write per 4 KiB page, as the
  first big allocation of a new process) with numpy's huge-page advice on (numpy's default)
  and off, interleaved, medians.

Best of ``--repeats`` for every timing; a local disk with a warm page cache (the reads measure
the store's per-request cost, not the disk).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import zarr  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import best_of  # noqa: E402
from sasa.store import create_cache, open_cache  # noqa: E402
from sasa.store.reader import _as_rows  # noqa: E402


FIRST_TOUCH = """
import sys, time
import numpy as np
sys.path.insert(0, sys.argv[2])
from bench._common import set_huge_page_advice
set_huge_page_advice(sys.argv[1] == "on")
t0 = time.perf_counter()
np.empty(1 << 30, np.uint8)[::4096].fill(1)
print(time.perf_counter() - t0)
"""


def first_touch(advice: bool) -> float:
    """Seconds to allocate and first touch 1 GiB (one write per 4 KiB page) in a new process."""
    out = subprocess.run([sys.executable, "-c", FIRST_TOUCH, "on" if advice else "off",
                          str(Path(__file__).resolve().parents[1])],
                         capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1 << 16)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sasa-micro-"))
    rng = np.random.default_rng(0)
    try:
        ctx, seqs = 128, a.rows // 128
        w = create_cache(str(root / "c"), hookpoints={"h": a.d}, ctx_len=ctx, n_seq=seqs,
                         shard_seqs=seqs // 4)
        x = rng.standard_normal((seqs // 4 * ctx, a.d)).astype(np.float32)
        for s in range(4):
            w.write_shard(s, np.zeros((seqs // 4, ctx), np.int32), {"h": x})
        cache = open_cache(str(root / "c"))
        acts = zarr.open_array(str(root / "c" / "acts" / "h"), mode="r")
        chunk = cache.layout.chunk_rows
        n_random = 512
        picks = rng.integers(0, a.rows, n_random)
        t_rows = best_of(a.repeats, lambda: [acts[int(i)] for i in picks]) / n_random
        t_chunks = best_of(a.repeats, lambda: [acts[c * chunk:(c + 1) * chunk]
                                             for c in range(a.rows // chunk)]) / a.rows
        print(f"| random single-row reads | {1 / t_rows:,.0f} rows/s |")
        print(f"| whole-chunk reads ({chunk} rows each) | {1 / t_chunks:,.0f} rows/s |")
        print(f"| whole chunks / single rows | {t_rows / t_chunks:.0f}x |")

        buf = np.zeros((a.rows, a.d), cache.layout.storage_dtype)  # touched: no first faults

        def read_all(direct_reads: bool) -> None:
            cache.direct_reads = direct_reads
            arr = cache.acts("h")
            for c in range(a.rows // chunk):
                cache.read_into(arr, c * chunk, (c + 1) * chunk, buf[c * chunk:(c + 1) * chunk])
        t_zarr = best_of(a.repeats, lambda: read_all(False))
        t_file = best_of(a.repeats, lambda: read_all(True))
        print(f"| whole chunks into a buffer, one thread: through zarr | "
              f"{buf.nbytes / t_zarr / 1e9:.2f} GB/s |")
        print(f"| ... as their files (Cache.read_into, store/direct.py) | "
              f"{buf.nbytes / t_file / 1e9:.2f} GB/s |")
        print(f"| ... files / through zarr | {t_zarr / t_file:.1f}x |")

        window = rng.integers(0, 1 << 16, (a.rows, a.d), dtype=np.uint16)
        order = rng.permutation(a.rows)
        flat = (order[:, None] * a.d + np.arange(a.d)).reshape(-1)  # every element's index
        out = np.empty_like(window)
        t_elem = best_of(a.repeats, lambda: np.take(window.reshape(-1), flat, out=out.reshape(-1)))
        t_raise = best_of(a.repeats, lambda: np.take(_as_rows(window), order, out=_as_rows(out)))
        t_void = best_of(a.repeats, lambda: np.take(_as_rows(window), order, out=_as_rows(out),
                                                 mode="clip"))
        print(f"| gather of {a.rows} rows x {a.d} bf16, element by element / as row records | "
              f"{t_elem / t_void:.1f}x |")
        print(f"| ... as row records, np.take mode='raise' (buffers out) / mode='clip' | "
              f"{t_raise / t_void:.1f}x |")

        from sasa.harvester.config import HarvestConfig
        from sasa.harvester.harvest import plan
        p = plan(HarvestConfig(out=str(root / "tok"), tokens=a.rows, workers=0, progress=False),
                 gpus=False)
        ids = zarr.create_array(str(root / "ids"), shape=p.tokens_NC.shape,
                                chunks=p.tokens_NC.shape, dtype="int32", compressors="auto")
        ids[:] = p.tokens_NC
        stored = sum(f.stat().st_size for f in (root / "ids" / "c").rglob("*") if f.is_file())
        print(f"| token ids ({p.tokens_NC.size:,}, built-in corpus, MiniLM): raw / stored bytes | "
              f"{p.tokens_NC.astype(np.int32).nbytes / stored:.1f}x |")

        on, off = [], []
        for _ in range(a.repeats):  # interleaved, each in a new process: its first big allocation
            on.append(first_touch(True))
            off.append(first_touch(False))
        print(f"| first touch of 1 GiB in a new process, numpy's huge-page advice on | "
              f"{1 / np.median(on):.2f} GiB/s |")
        print(f"| ... advice off | {1 / np.median(off):.2f} GiB/s |")
        print(f"| ... on / off time (medians) | {np.median(on) / np.median(off):.1f}x |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
