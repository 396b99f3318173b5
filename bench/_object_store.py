"""Object-store, cold-start and integrity-check rows of bench/store_read.py.

Every row runs in a fresh Python process (the page cache dropped first where we are root), so
a "cold epoch" pays everything a new training job pays: imports aside, opening the cache, the
first window and first-touch page faults of the window buffers. Each process reports its rate,
its peak RSS and its RSS just before the first read, so the reader's own memory (peak minus
that) can be set against the two window buffers it is allowed.

The object store is moto's S3 server in its own process on loopback, holding a copy of the
local cache. Latency is added per request by ``LatentS3``, an s3fs subclass registered as the
``s3lat://`` protocol that sleeps before every S3 call (so concurrent requests overlap their
waits, as on a real network) - the same objects, the same server, 50 ms more per request.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

BUCKET = "bench"


def _rss_mib(field: str = "VmRSS") -> float:
    """This process's resident memory (VmRSS) or its peak so far (VmHWM), in MiB. (getrusage's
    ru_maxrss would include the parent's peak, inherited across fork and exec.)"""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    return kb / 1024


def register_latency(latency_s: float) -> None:
    import fsspec
    from s3fs import S3FileSystem

    class LatentS3(S3FileSystem):
        protocol = ("s3lat",)

        async def _call_s3(self, method, *args, **kwargs):
            await asyncio.sleep(latency_s)
            return await super()._call_s3(method, *args, **kwargs)

    fsspec.register_implementation("s3lat", LatentS3, clobber=True)


class MotoServer:
    """moto's S3 server in a child process on 127.0.0.1."""

    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        self.options = {"endpoint_url": f"http://127.0.0.1:{self.port}", "key": "bench", "secret": "bench"}

    def upload(self, local: Path, name: str) -> str:
        import s3fs
        fs = s3fs.S3FileSystem(**self.options, skip_instance_cache=True)
        if not fs.exists(BUCKET):
            fs.mkdir(BUCKET)
        fs.put(str(local), f"{BUCKET}/{name}", recursive=True)
        return f"s3://{BUCKET}/{name}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


# ----------------------------------------------------------------------------- one run
def run_one(spec: dict) -> dict:
    """Read one epoch as ``spec`` says, in this (fresh) process; return the measurements."""
    import numpy as np
    import torch
    torch.set_num_threads(1)
    from bench._activations import HOOKPOINT
    from sasa.store import open_cache, reader, shuffle_quality
    from sasa.store.cache import Cache
    if spec.get("latency_s"):
        register_latency(spec["latency_s"])
    if spec.get("ramp_steps") is not None:
        reader.RAMP_STEPS = spec["ramp_steps"]
    if spec.get("huge_pages") is not None:  # numpy's huge-page advice (bench/_common.py)
        from bench._common import set_huge_page_advice
        set_huge_page_advice(spec["huge_pages"])
    t0 = time.perf_counter()
    rows_seen, total = [], 0
    base_rss = _rss_mib()
    window_mib, n_rows = None, 0
    if spec["kind"] in ("raw", "raw-fresh"):
        arr = np.load(spec["url"], mmap_mode="r")
        # raw-fresh: every block is also copied into one fresh buffer of the file's size, so
        # the read pays the first touch of as much new memory as the data (a window reader's
        # buffers do the same in its first epoch).
        held = np.empty(arr.shape, arr.dtype) if spec["kind"] == "raw-fresh" else None
        for s in range(0, len(arr), 4096):
            block = np.array(arr[s:s + 4096])
            if held is not None:
                held[s:s + len(block)] = block
            wide = block.astype(np.uint32)
            wide <<= 16
            x = torch.from_numpy(wide.view(np.float32))
            total += x.shape[0]
            _ = float(x[-1, -1])
    else:
        so = spec.get("storage_options")
        if spec["kind"] == "sasa-unchecked":  # plain zarr group: no CacheStore, no absent-chunk check
            import zarr
            cache = Cache(spec["url"], zarr.open_group(spec["url"], mode="r", storage_options=so), so)
        else:
            cache = open_cache(spec["url"], so)
        cache.direct_reads = spec.get("direct_reads", True)
        stream = cache.batches(HOOKPOINT, 4096, dtype=torch.float32, with_rows=True,
                               read_concurrency=spec.get("read_concurrency"))
        lay = cache.layout
        window_mib = stream.window_chunks * lay.chunk_rows * cache.hookpoints[HOOKPOINT] * 2 / 2**20
        base_rss = _rss_mib()
        for b in stream:
            total += b.acts.shape[0]
            _ = float(b.acts[-1, -1])
            rows_seen.append(b.rows.numpy())
        n_rows = len(cache.committed_shards()) * lay.shard_rows
    dt = time.perf_counter() - t0
    return {"seconds": dt, "rows": total,
            "quality": shuffle_quality(rows_seen, 128, n_rows) if rows_seen else float("nan"),
            "peak_rss_mib": _rss_mib("VmHWM"),
            "base_rss_mib": base_rss, "window_mib": window_mib}


def run_isolated(spec: dict, drop) -> dict:
    """``run_one`` in a fresh process, after dropping the page cache (when allowed)."""
    dropped = drop()
    out = subprocess.run([sys.executable, "-m", "bench._object_store", json.dumps(spec)],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode:
        raise RuntimeError(f"run {spec} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["cold"] = dropped
    return res


if __name__ == "__main__":
    print(json.dumps(run_one(json.loads(sys.argv[1]))))


# ----------------------------------------------------------------------------- the rows
RAW = "raw .npy sequential (bf16)"
RAW_NO_HUGE = "raw .npy sequential (bf16), no huge-page advice"


def object_store_rows(data: Path, raw: Path, local: Path, rounds: int, drop, latency_ms: float,
                      sweep: bool, s3: bool = True) -> tuple[list[dict], dict]:
    """Run every row ``rounds`` times, interleaved; return the table and the run's facts.
    ``s3=False``: the local rows only (a machine without moto)."""
    import numpy as np
    server = MotoServer() if s3 else None
    try:
        t0 = time.perf_counter()
        url = server.upload(local, local.name) if s3 else None
        upload_s = time.perf_counter() - t0
        rows = {
            RAW: {"kind": "raw", "url": str(raw)},
            RAW_NO_HUGE: {"kind": "raw", "url": str(raw), "huge_pages": False},
            "raw .npy sequential, also copied into one fresh buffer": {"kind": "raw-fresh", "url": str(raw)},
            "raw .npy sequential, also copied into one fresh buffer, no huge-page advice": {
                "kind": "raw-fresh", "url": str(raw), "huge_pages": False},
            "sasa local, cold epoch (default)": {"kind": "sasa", "url": str(local)},
            "sasa local, cold epoch, no huge-page advice": {
                "kind": "sasa", "url": str(local), "huge_pages": False},
            "sasa local, one full first window (no ramp)": {"kind": "sasa", "url": str(local), "ramp_steps": 0},
            "sasa local, cold epoch, every chunk through zarr (direct_reads=False)": {
                "kind": "sasa", "url": str(local), "direct_reads": False},
            "sasa local, through zarr, no absent-chunk check (plain zarr store)": {
                "kind": "sasa-unchecked", "url": str(local), "direct_reads": False},
        }
        if s3:
            so, lat = server.options, url.replace("s3://", "s3lat://")
            rows["sasa S3 loopback (moto)"] = {"kind": "sasa", "url": url, "storage_options": so}
            rows[f"sasa S3 loopback + {latency_ms:.0f} ms per request"] = {
                "kind": "sasa", "url": lat, "storage_options": so, "latency_s": latency_ms / 1000}
        if sweep:
            for k in (1, 4, 16, 32) if s3 else ():
                rows[f"sasa S3 + {latency_ms:.0f} ms, read_concurrency {k}"] = {
                    "kind": "sasa", "url": lat, "storage_options": so, "latency_s": latency_ms / 1000,
                    "read_concurrency": k}
            for k in (1, 2, 4, 8):
                rows[f"sasa local, read_concurrency {k}"] = {"kind": "sasa", "url": str(local), "read_concurrency": k}
        results = {name: [] for name in rows}
        for rnd in range(rounds):
            for name, spec in rows.items():
                res = run_isolated(spec, drop)
                results[name].append(res)
                print(f"round {rnd} {name:55s} {res['rows'] / res['seconds'] / 1e3:7.0f} k tok/s  "
                      f"peak RSS {res['peak_rss_mib']:.0f} MiB (base {res['base_rss_mib']:.0f})  "
                      f"q {res['quality']:.2f}", flush=True)
    finally:
        if server:
            server.stop()
    med = lambda rs, f: float(np.median([f(r) for r in rs]))  # noqa: E731
    tps = {name: med(rs, lambda r: r["rows"] / r["seconds"]) for name, rs in results.items()}
    # The machine's raw rate: the faster of the two plain readers (with and without numpy's
    # huge-page advice), so the baseline is not held back by either setting.
    raw_tps, local_tps = max(tps[RAW], tps[RAW_NO_HUGE]), tps["sasa local, cold epoch (default)"]
    table = []
    for name, rs in results.items():
        window = rs[0]["window_mib"]
        table.append({"reader": name, "tok_s": tps[name], "x_raw": tps[name] / raw_tps,
                      "x_local": tps[name] / local_tps,
                      "peak_rss_mib": med(rs, lambda r: r["peak_rss_mib"]),
                      "reader_rss_mib": med(rs, lambda r: r["peak_rss_mib"] - r["base_rss_mib"]),
                      "two_windows_mib": 2 * window if window else None,
                      "quality": med(rs, lambda r: r["quality"]), "cold": all(r["cold"] for r in rs)})
    return table, {"upload_s": upload_s, "rounds": rounds}


def markdown(table: list[dict]) -> str:
    lines = ["| reader | k tokens/s | x raw seq (the faster raw row) | x sasa local | peak RSS MiB | reader's own RSS MiB "
             "(peak - before reading) | 2 windows MiB | shuffle quality |", "|---|---|---|---|---|---|---|---|"]
    for t in table:
        two = f"{t['two_windows_mib']:.0f}" if t["two_windows_mib"] else "-"
        lines.append(f"| {t['reader']} | {t['tok_s'] / 1e3:.0f} | {t['x_raw']:.2f} | {t['x_local']:.2f} | "
                     f"{t['peak_rss_mib']:.0f} | {t['reader_rss_mib']:.0f} | {two} | {t['quality']:.2f} |")
    return "\n".join(lines)
