"""``sasa info URL [--verify] [--json]``: what a cache holds, and whether it is sound."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="describe a cache; --verify checks every committed shard",
                              description="Describe a cache: model, hookpoints, tokens, shards, size, statistics.")
    p.add_argument("url", help="cache location: a folder or any fsspec URL (s3://bucket/cache)")
    p.add_argument("--verify", action="store_true", help="check checksums, shapes and NaN/Inf of every committed shard")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--storage-options", default=None, metavar="JSON",
                   help='fsspec options, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\' (never stored)')
    p.set_defaults(func=run)


def describe(cache) -> dict:
    """A JSON-able summary of a cache."""
    lay = cache.layout
    hookpoints = {}
    for hp, d in lay.hookpoints.items():
        st = cache.stats(hp) if cache.n_tokens else None
        hookpoints[hp] = {"d": d} if st is None else {
            "d": d, "count": st.count, "mean_norm": st.mean_norm,
            "norm_quantiles": {str(q): v for q, v in st.norm_quantiles.items()},
            "mean_sq_norm": st.mean_sq_norm, "mean_abs_mean": float(abs(st.mean).mean()),
            "mean_var": float(st.var.mean())}
    producer = {k: cache.attrs.get(k) for k in ("model", "model_revision", "tokenizer", "dataset", "corpus")
                if k in cache.attrs}
    return {
        "url": cache.url, "format_version": lay.format_version, "fingerprint": cache.fingerprint,
        **producer,
        "ctx_len": lay.ctx_len, "dtype": lay.dtype, "n_seq": lay.n_seq,
        "tokens_committed": cache.n_tokens, "tokens_planned": lay.n_rows,
        "shards_committed": len(cache.committed_shards()), "shards_pending": len(cache.pending_shards()),
        "shard_seqs": lay.shard_seqs, "chunk_seqs": lay.chunk_seqs, "shard_objects": lay.shard_objects,
        "size_bytes": cache.size_bytes, "hookpoints": hookpoints,
    }


def format_text(info: dict) -> str:
    gb = info["size_bytes"] / 1e9
    lines = [
        f"cache       {info['url']}  (format v{info['format_version']}, fingerprint {info['fingerprint']})",
        *(f"{k:<11} {info[k]}" for k in ("model", "model_revision", "tokenizer", "dataset", "corpus") if k in info),
        f"tokens      {info['tokens_committed']:,} committed of {info['tokens_planned']:,} "
        f"(ctx {info['ctx_len']}, {info['dtype']})",
        f"shards      {info['shards_committed']} committed, {info['shards_pending']} pending "
        f"({info['shard_seqs']} seqs each, chunks of {info['chunk_seqs']} seqs)",
        f"size        {gb:.3f} GB",
        "hookpoints  name                 d    rows    mean|x|    |x| p50 / p99     E|x|^2",
    ]
    for hp, h in info["hookpoints"].items():
        if "count" in h:
            q = h["norm_quantiles"]
            lines.append(f"            {hp:<18} {h['d']:>5} {h['count']:>8,} {h['mean_norm']:>9.3f}"
                         f"  {q['0.5']:>8.3f} / {q['0.99']:<8.3f} {h['mean_sq_norm']:>9.3f}")
        else:
            lines.append(f"            {hp:<18} {h['d']:>5}  (no committed rows yet)")
    return "\n".join(lines)


def run(args) -> int:
    from sasa.errors import SasaError
    from sasa.store.cache import open_cache
    from sasa.store.options import parse_storage_options
    from sasa.store.verify import refuse_damaged, verify

    cache = open_cache(args.url, parse_storage_options(args.storage_options))
    missing = [] if args.verify else cache.missing_chunks()  # one listing catches a lost object
    if missing:
        raise SasaError(f"{len(missing)} chunk object(s) of committed shards are missing from "
                        f"{args.url} ({'; '.join(missing[:3])}{'; ...' if len(missing) > 3 else ''}): "
                        f"the cache is damaged; run `sasa info --verify {args.url}` and re-harvest "
                        f"those shards")
    problems = verify(cache, progress=not args.json) if args.verify else None
    if not args.verify:
        refuse_damaged(cache)
    try:
        info = describe(cache)
    except SasaError:
        raise
    except Exception as err:  # damaged metadata or chunks: --verify reports them, else say so
        if not problems:
            raise SasaError(f"cannot describe {args.url}: {type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}; the cache looks damaged, "
                            f"run `sasa info --verify {args.url}`") from None
        info = {"url": cache.url, "damaged": True}
    if args.json:
        if problems is not None:
            info["problems"] = problems
        print(json.dumps(info, indent=2))
    else:
        print(format_text(info) if not info.get("damaged") else
              f"cache       {cache.url}  (damaged: statistics cannot be read)")
        if problems is not None:
            print(f"verify      {'OK: every committed shard is sound' if not problems else f'{len(problems)} problem(s):'}")
            for p in problems:
                print(f"  - {p}")
    return 1 if problems else 0
