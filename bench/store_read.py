"""Benchmark: shuffled batches out of the sasa cache vs the formats other SAE tools use.

The same real activations (MiniLM block 3, see bench/_activations.py; tiled to the target
size) are stored as
- the sasa cache with default settings (bf16, ~16 MiB chunks), plus variants: fp32, chunk
  sizes, ``shard_objects=True``, and a blosc-zstd compressed copy (arrays rebuilt here);
- a raw ``.npy`` (bf16 bits as uint16) read sequentially: the machine's limit;
- an HF ``datasets`` Arrow table of [ctx, d] float32 rows read SAELens-style: sequential
  slices of 32 sequences in torch format into a mixing buffer that shuffles and emits half;
- safetensors shard files (bf16, one per 1024 sequences) loaded in random order into a
  ~1 GiB in-memory shuffle window (activault-style).

Every reader delivers float32 torch batches of 4096 rows to a trivial consumer. Readers run
interleaved round by round (the CPU is shared with other jobs, so ratios measured side by side
are what count), the page cache is dropped before each run when we are root, and the median
over rounds is reported. Usage::

    python bench/store_read.py            # full run (~1.6 GB bf16, 2^21 tokens)
    python bench/store_read.py --quick    # smoke run of the whole script in < 1 minute
    python bench/store_read.py --object-store --n-seq 4096 --real-seqs 256 --sweep
        # cold epoch in fresh processes, the absent-chunk check's cost, the same cache on a
        # loopback S3 server with and without 50 ms per request, read_concurrency sweeps,
        # peak RSS per reader (bench/_object_store.py)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from bench._activations import HOOKPOINT, generate  # noqa: E402
from sasa.store import create_cache, open_cache, shuffle_quality  # noqa: E402
from sasa.store.convert import storage_to_torch, to_storage  # noqa: E402

BATCH = 4096
SHARD_SEQS = 1024


class Result(NamedTuple):
    seconds: float
    rows: int
    quality: float
    capped: bool
    """stopped by --max-seconds before the end of the epoch"""


# ----------------------------------------------------------------------------- data
def tiled_acts(data: Path, real_dir: Path, meta: dict, n_seq: int) -> tuple[np.ndarray, np.ndarray]:
    """(bf16 bits uint16 [n_seq*ctx, d], tokens int32 [n_seq, ctx]), real data tiled."""
    ctx = meta["ctx_len"]
    raw = data / f"raw_bf16_{n_seq}.npy"
    tokens = np.resize(np.load(real_dir / "real_tokens.npy")[:meta["n_seq"]], (n_seq, ctx))
    if not raw.exists():
        real = np.load(real_dir / "real_acts.npy", mmap_mode="r")
        out = np.lib.format.open_memmap(raw.with_suffix(".tmp"), "w+", np.uint16, (n_seq * ctx, meta["d"]))
        per = meta["n_seq"] * ctx
        for start in range(0, n_seq * ctx, per):
            n = min(per, n_seq * ctx - start)
            out[start:start + n] = to_storage(np.asarray(real[:n]), "bfloat16", "acts")
        out.flush()
        del out
        raw.with_suffix(".tmp").rename(raw)
    return np.load(raw, mmap_mode="r"), tokens


def build_sasa(path: Path, acts, tokens, meta, *, dtype="bfloat16", chunk_seqs=None,
               shard_objects=False, compressor=None) -> None:
    if (path / "zarr.json").exists() and (path / ".done").exists():
        return
    if path.exists():
        shutil.rmtree(path)
    n_seq, ctx = tokens.shape
    attrs = {"model": meta["model"], "corpus": meta["corpus"],
             "special_token_ids": meta["special_token_ids"], "bench": "tiled real activations"}
    w = create_cache(str(path), hookpoints={HOOKPOINT: meta["d"]}, ctx_len=ctx, n_seq=n_seq,
                     shard_seqs=min(SHARD_SEQS, n_seq), dtype=dtype, attrs=attrs,
                     chunk_seqs=chunk_seqs, shard_objects=shard_objects)
    if compressor is not None:  # rebuild the acts array with a codec (the writer has none)
        name = f"acts/{HOOKPOINT}"
        old = w.group[name]
        del w.group[name]
        w._acts[HOOKPOINT] = w.group.create_array(
            name, shape=old.shape, chunks=old.chunks, shards=old.shards, dtype=old.dtype,
            compressors=compressor, fill_value=0)
    rows = w.layout.shard_rows
    for s in range(w.n_shards):
        block = storage_to_torch(np.asarray(acts[s * rows:(s + 1) * rows]), "bfloat16", torch.float32)
        w.write_shard(s, tokens[s * w.layout.shard_seqs:(s + 1) * w.layout.shard_seqs], {HOOKPOINT: block})
    (path / ".done").touch()


def build_arrow(path: Path, acts, tokens, meta) -> None:
    """SAELens's cache layout: one row per sequence, Array2D [ctx, d] float32."""
    if (path / "dataset_info.json").exists():
        return
    import datasets
    n_seq, ctx = tokens.shape
    feats = datasets.Features({HOOKPOINT: datasets.Array2D((ctx, meta["d"]), "float32"),
                               "token_ids": datasets.Sequence(datasets.Value("int32"), length=ctx)})
    parts = []
    step = 256
    for s in range(0, n_seq, step):
        x = storage_to_torch(np.asarray(acts[s * ctx:(s + step) * ctx]), "bfloat16", torch.float32)
        parts.append(datasets.Dataset.from_dict(
            {HOOKPOINT: x.numpy().reshape(-1, ctx, meta["d"]), "token_ids": tokens[s:s + step]},
            features=feats))
    ds = datasets.concatenate_datasets(parts)
    ds.save_to_disk(str(path), max_shard_size="500MB")


def build_safetensors(path: Path, acts, tokens, meta) -> None:
    """activault-style: one bf16 safetensors file per shard of sequences."""
    if (path / ".done").exists():
        return
    from safetensors.torch import save_file
    path.mkdir(parents=True, exist_ok=True)
    n_seq, ctx = tokens.shape
    rows = min(SHARD_SEQS, n_seq) * ctx
    for i, start in enumerate(range(0, n_seq * ctx, rows)):
        x = storage_to_torch(np.ascontiguousarray(acts[start:start + rows]), "bfloat16", torch.bfloat16)
        save_file({"acts": x.contiguous(), "rows": torch.arange(start, start + rows)},
                  str(path / f"shard_{i:05d}.safetensors"))
    (path / ".done").touch()


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- readers
# Each reader yields (batch float32 [B, d], rows int64 [B] or None).
def read_raw(path: Path, ctx: int, convert: bool = True) -> Iterator:
    arr = np.load(path, mmap_mode="r")
    for s in range(0, len(arr), BATCH):
        block = np.array(arr[s:s + BATCH])  # copy out of the page cache / disk
        yield (storage_to_torch(block, "bfloat16", torch.float32) if convert else block), \
            np.arange(s, s + len(block))


def read_sasa(path: Path, ctx: int, direct_reads: bool = True) -> Iterator:
    cache = open_cache(str(path))
    cache.direct_reads = direct_reads
    for b in cache.batches(HOOKPOINT, BATCH, dtype=torch.float32, with_rows=True):
        yield b.acts, b.rows.numpy()


def read_sasa_steady(path: Path, ctx: int, direct_reads: bool = True) -> Iterator:
    """The same stream over two epochs, timed over the second only: a long training run's rate,
    once both window buffers have been touched (their first fill pays the page faults)."""
    cache = open_cache(str(path))
    cache.direct_reads = direct_reads
    stream = cache.batches(HOOKPOINT, BATCH, dtype=torch.float32, with_rows=True, epochs=2)
    per_epoch = len(cache.committed_shards()) * cache.layout.shard_rows
    seen = 0
    for b in stream:
        if seen < per_epoch <= seen + len(b.rows):
            yield None, None  # run() restarts its clock here
        seen += len(b.rows)
        if seen > per_epoch:
            yield b.acts, b.rows.numpy()


def read_arrow(path: Path, ctx: int, prompts: int = 32, buffer_batches: int = 20) -> Iterator:
    """SAELens ActivationsStore over a cached dataset: sequential slices of ``prompts``
    sequences in torch format fill a mixing buffer of ``buffer_batches`` such slices; the
    buffer is shuffled, half of it emitted as batches, the other half kept."""
    import datasets
    ds = datasets.load_from_disk(str(path)).with_format("torch", columns=[HOOKPOINT])
    cap = buffer_batches * prompts * ctx
    buf_x, buf_r = None, np.zeros(0, np.int64)
    rng = torch.Generator().manual_seed(0)
    n = len(ds)
    s = 0
    while s < n or (buf_x is not None and len(buf_r)):
        while s < n and len(buf_r) < cap:
            x = ds[s:s + prompts][HOOKPOINT]
            x = x.reshape(-1, x.shape[-1])
            r = np.arange(s * ctx, s * ctx + len(x))
            buf_x = x if buf_x is None else torch.cat([buf_x, x])
            buf_r = np.concatenate([buf_r, r])
            s += prompts
        perm = torch.randperm(len(buf_r), generator=rng)
        buf_x, buf_r = buf_x[perm], buf_r[perm.numpy()]
        half = len(buf_r) // 2 if s < n else len(buf_r)
        half -= half % BATCH if s < n else 0
        for b in range(0, half, BATCH):
            yield buf_x[b:b + BATCH], buf_r[b:b + BATCH]
        buf_x, buf_r = buf_x[half:], buf_r[half:]


def read_safetensors(path: Path, ctx: int, window_bytes: int = 1 << 30) -> Iterator:
    """Shard files in random order, ~window_bytes of them concatenated and permuted in memory."""
    from safetensors.torch import load_file
    files = sorted(path.glob("*.safetensors"))
    order = np.random.default_rng(0).permutation(len(files))
    per_file = files[0].stat().st_size
    k = max(1, window_bytes // per_file)
    g = torch.Generator().manual_seed(0)
    for w in range(0, len(order), k):
        parts = [load_file(str(files[i])) for i in order[w:w + k]]
        x = torch.cat([p["acts"] for p in parts])
        r = torch.cat([p["rows"] for p in parts])
        perm = torch.randperm(len(r), generator=g)
        x, r = x[perm], r[perm]
        for b in range(0, len(r), BATCH):
            yield x[b:b + BATCH].float(), r[b:b + BATCH].numpy()


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run(reader: Callable, path: Path, ctx: int, n_rows: int, max_seconds: float, cold: bool) -> Result:
    if cold:
        drop_caches()
    rows_seen = []
    total = 0
    capped = False
    t0 = time.perf_counter()
    for x, r in reader(path, ctx):
        if x is None:  # the reader's warm-up is over: time from here
            t0, total, rows_seen = time.perf_counter(), 0, []
            continue
        total += x.shape[0]
        _ = float(x[-1, -1])  # the consumer touches the batch
        if r is not None:
            rows_seen.append(r)
        if time.perf_counter() - t0 > max_seconds:
            capped = True
            break
    dt = time.perf_counter() - t0
    q = shuffle_quality(rows_seen, ctx, n_rows) if rows_seen else float("nan")
    return Result(dt, total, q, capped)


# ----------------------------------------------------------------------------- main
def machine() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next((l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal")), "0")
    try:
        disk = subprocess.run(["df", "-h", "--output=source,fstype,size", str(ROOT)], capture_output=True,
                              text=True).stdout.splitlines()[-1]
    except OSError:
        disk = "?"
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gib": round(int(mem) / 2**20, 1), "disk": " ".join(disk.split()),
            "python": platform.python_version(), "torch": torch.__version__}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small smoke run (< 1 minute)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2, quick 1)")
    p.add_argument("--max-seconds", type=float, default=None, help="cap per reader run (slow readers)")
    p.add_argument("--only", default=None, help="comma list of reader names to run")
    p.add_argument("--json", default=None, help="write results as JSON here")
    p.add_argument("--object-store", action="store_true",
                   help="only the fresh-process rows: cold epoch, check cost, S3 with/without latency")
    p.add_argument("--n-seq", type=int, default=None, help="sequences of the tiled cache (--object-store)")
    p.add_argument("--real-seqs", type=int, default=256, help="real sequences generated (--object-store)")
    p.add_argument("--latency-ms", type=float, default=50.0, help="latency added per S3 request")
    p.add_argument("--sweep", action="store_true", help="also sweep read_concurrency (--object-store)")
    p.add_argument("--no-s3", action="store_true",
                   help="--object-store without the S3 rows (a machine without moto)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch intra-op threads (1: on a shared 2-core box, 2 threads make each "
                        "bf16->fp32 cast ~10x slower while they wait for each other)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    if args.object_store:
        return object_store_main(args)
    quick = args.quick
    data = ROOT / "data" / ("quick" if quick else "full")
    real_dir = ROOT / "data" / ("quick" if quick else "")
    n_seq = 1024 if quick else 16384          # 2^21 tokens = 1.61 GB bf16 at d=384
    meta = generate(real_dir, 64 if quick else 4096)
    rounds = args.rounds or (1 if quick else 2)
    max_s = args.max_seconds or (3.0 if quick else 30.0)
    ctx, d = meta["ctx_len"], meta["d"]
    data.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    acts, tokens = tiled_acts(data, real_dir, meta, n_seq)
    raw = data / f"raw_bf16_{n_seq}.npy"

    from zarr.codecs import BloscCodec
    bq = SHARD_SEQS if not quick else 64  # quick: chunk sizes scaled down
    sasa_variants = {
        "sasa default (bf16)": dict(),
        "sasa fp32": dict(dtype="float32"),
        f"sasa chunk {bq // 32} seqs": dict(chunk_seqs=bq // 32),
        f"sasa chunk {bq // 2} seqs": dict(chunk_seqs=bq // 2),
        "sasa shard_objects": dict(shard_objects=True),
        "sasa blosc-zstd3 bitshuffle": dict(compressor=BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")),
    }
    readers: dict[str, tuple[Callable, Path]] = {
        "raw .npy sequential (bf16)": (read_raw, raw),
        "raw .npy sequential, no fp32 conv": (lambda p, c: read_raw(p, c, convert=False), raw),
    }
    for i, (name, kw) in enumerate(sasa_variants.items()):
        path = data / f"sasa_{i}"
        build_sasa(path, acts, tokens, meta, **kw)
        readers[name] = (read_sasa, path)
    readers["sasa default (bf16), 2nd epoch (steady state)"] = (read_sasa_steady, data / "sasa_0")
    zarr_path = "every chunk through zarr (direct_reads=False)"
    readers[f"sasa default (bf16), {zarr_path}"] = (
        lambda p, c: read_sasa(p, c, direct_reads=False), data / "sasa_0")
    readers[f"sasa default (bf16), 2nd epoch, {zarr_path}"] = (
        lambda p, c: read_sasa_steady(p, c, direct_reads=False), data / "sasa_0")
    build_safetensors(data / "safetensors", acts, tokens, meta)
    readers["safetensors shards + 1 GiB window (bf16)"] = (read_safetensors, data / "safetensors")
    build_arrow(data / "arrow", acts, tokens, meta)
    readers["HF Arrow fp32 + SAELens mixing buffer"] = (read_arrow, data / "arrow")
    print(f"data ready in {time.perf_counter() - t0:.0f} s", flush=True)
    # The page-cache drop before each run skips pages mapped into a process: unmap the raw file,
    # or the raw rows would read from memory.
    del acts, tokens
    if args.only:
        keep = args.only.split(",")
        readers = {k: v for k, v in readers.items() if any(s in k for s in keep) or k.startswith("raw .npy sequential (")}

    cold = drop_caches()
    n_rows = n_seq * ctx
    results: dict[str, list[Result]] = {k: [] for k in readers}
    for rnd in range(rounds):
        for name, (fn, path) in readers.items():
            res = run(fn, path, ctx, n_rows, max_s, cold)
            results[name].append(res)
            print(f"round {rnd} {name:42s} {res.rows * d * 4 / res.seconds / 1e9:6.2f} GB/s fp32  "
                  f"{res.rows / res.seconds / 1e3:8.0f} k tok/s  rows {res.rows}  q {res.quality:.2f}", flush=True)

    def med(rs, f):
        return float(np.median([f(r) for r in rs]))

    base = med(results["raw .npy sequential (bf16)"], lambda r: r.rows / r.seconds)
    store_bytes = {"sasa fp32": 4, "HF Arrow fp32 + SAELens mixing buffer": 4}
    table = []
    for name, rs in results.items():
        tps = med(rs, lambda r: r.rows / r.seconds)
        path = readers[name][1]
        table.append({
            "reader": name, "tok_s": tps, "gbs_fp32": tps * d * 4 / 1e9,
            "gbs_stored": tps * d * store_bytes.get(name, 2) / 1e9, "ratio_raw": tps / base,
            "size_gb": du(path) / 1e9, "quality": med(rs, lambda r: r.quality),
            "partial": any(r.capped for r in rs),
        })
    arrow_tps = next((t["tok_s"] for t in table if t["reader"].startswith("HF Arrow")),
                     float("nan"))
    head = ("| reader | GB/s fp32 batches | GB/s stored bytes | k tokens/s | x raw seq | x SAELens-style "
            "| size on disk GB | shuffle quality (1 = ideal) |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for t in table:
        lines.append(f"| {t['reader']}{' (capped at %.0f s)' % max_s if t['partial'] else ''} | {t['gbs_fp32']:.2f} | "
                     f"{t['gbs_stored']:.2f} | {t['tok_s'] / 1e3:.0f} | {t['ratio_raw']:.2f} | "
                     f"{t['tok_s'] / arrow_tps:.1f} | {t['size_gb']:.2f} | {t['quality']:.2f} |")
    print()
    print(f"{n_rows:,} tokens x d={d} ({meta['n_seq']} real sequences tiled to {n_seq}); "
          f"page cache {'dropped before each run' if cold else 'WARM (could not drop)'}; "
          f"median of {rounds} interleaved rounds; batch {BATCH}; "
          f"torch threads {torch.get_num_threads()}")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "meta": meta, "cold": cold, "rounds": rounds,
                                               "table": table, "markdown": "\n".join(lines)}, indent=1))


def object_store_main(args) -> None:
    from bench._object_store import markdown, object_store_rows
    n_seq = args.n_seq or 4096
    real_dir = ROOT / "data" / "os"
    data = real_dir / f"n{n_seq}"
    data.mkdir(parents=True, exist_ok=True)
    meta = generate(real_dir, args.real_seqs)
    acts, tokens = tiled_acts(data, real_dir, meta, n_seq)
    raw = data / f"raw_bf16_{n_seq}.npy"
    build_sasa(data / "sasa_default", acts, tokens, meta)
    del acts, tokens  # unmapped, so that the page-cache drops reach the raw file (see main)
    cold = drop_caches()
    table, facts = object_store_rows(data, raw, data / "sasa_default", args.rounds or 2, drop_caches,
                                     args.latency_ms, args.sweep, s3=not args.no_s3)
    md = markdown(table)
    upload = "" if args.no_s3 else f"; upload to moto {facts['upload_s']:.0f} s"
    print(f"\n{n_seq * meta['ctx_len']:,} tokens x d={meta['d']} = {du(raw) / 1e9:.2f} GB bf16 "
          f"({meta['n_seq']} real sequences tiled to {n_seq}); every run a fresh process; page cache "
          f"{'dropped before each run' if cold else 'WARM (could not drop)'}; median of "
          f"{facts['rounds']} interleaved rounds{upload}")
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "meta": meta, "cold": cold,
                                               "table": table, "facts": facts, "markdown": md}, indent=1))


if __name__ == "__main__":
    main()
