"""``sasa harvest``: parse, build a HarvestConfig, call ``harvest``. Nothing else lives here."""

from __future__ import annotations

import argparse

from sasa.harvester.config import BOS_POLICIES, HarvestConfig
from sasa.models import BUILTIN_MODEL


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "harvest", help="run a model over a dataset once and cache its activations",
        description="Run a transformer over a dataset and cache activations at hookpoints in a "
                    "Zarr cache. With no --model/--dataset it uses the pretrained MiniLM and a "
                    "built-in English corpus, offline. Rerun the same command to resume.")
    d = HarvestConfig.__dataclass_fields__
    p.add_argument("--out", required=True, help="cache folder or fsspec URL (s3://bucket/path)")
    p.add_argument("--model", default=BUILTIN_MODEL,
                   help=f"hub name or local folder (default: {BUILTIN_MODEL}, offline)")
    p.add_argument("--dataset", default=None,
                   help=".txt/.jsonl/.parquet file or datasets folder (default: built-in corpus)")
    p.add_argument("--hookpoints", default=",".join(d["hookpoints"].default),
                   help="comma-separated resid_pre.L, resid_post.L, attn_out.L, mlp_out.L "
                        "(default: %(default)s)")
    p.add_argument("--tokens", type=int, default=d["tokens"].default,
                   help="tokens to harvest (default: %(default)s)")
    p.add_argument("--ctx-len", type=int, default=d["ctx_len"].default,
                   help="tokens per sequence (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"].default,
                   help="sequences per forward pass (default: %(default)s)")
    p.add_argument("--dtype", default=d["dtype"].default, choices=["bf16", "fp16", "fp32"],
                   help="storage dtype (default: %(default)s)")
    p.add_argument("--model-dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="compute dtype; auto is bf16 on GPUs, fp32 on CPUs")
    p.add_argument("--bos", default="seq", choices=BOS_POLICIES,
                   help="BOS policy: every sequence (seq), every document (doc) or none")
    p.add_argument("--text-column", default="text", help="text column (default: text)")
    p.add_argument("--shard-seqs", type=int, default=0,
                   help="sequences per shard (default: about 64k tokens)")
    p.add_argument("--shard-objects", action="store_true",
                   help="one object per shard of each array instead of one per chunk (fewer "
                        "requests; recommended for object stores such as S3)")
    p.add_argument("--revision", default=None, help="model revision on the hub")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code shipped with the checkpoint (off by default)")
    p.add_argument("--workers", type=int, default=None,
                   help="Ray actors (default: one per GPU, else 1); 0 runs without Ray")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start locally)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--storage-options", default=None,
                   help="fsspec options as JSON, e.g. '{\"endpoint_url\": ...}'; never saved")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing cache made with a different config")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sasa.errors import check_writable
    from sasa.harvester.harvest import harvest
    check_writable(args.out)  # before the model loads and the data packs
    config = HarvestConfig(
        out=args.out, model=args.model, dataset=args.dataset, hookpoints=args.hookpoints,
        tokens=args.tokens, ctx_len=args.ctx_len, batch_size=args.batch_size, dtype=args.dtype,
        model_dtype=args.model_dtype, bos=args.bos, text_column=args.text_column,
        shard_seqs=args.shard_seqs, shard_objects=args.shard_objects, revision=args.revision,
        trust_remote_code=args.trust_remote_code, workers=args.workers, address=args.address,
        device=args.device, storage_options=args.storage_options or {},
        overwrite=args.overwrite, progress=not args.no_progress)
    result = harvest(config)
    print(f"harvested {result.n_tokens:,} tokens ({result.n_shards} shards, {result.shards_run} "
          f"run now, {result.tokens_per_s:,.0f} tokens/s) into {result.url}")
    if result.n_tokens < result.tokens_asked:
        print(f"  the dataset ran out: {result.n_tokens:,} of the {result.tokens_asked:,} tokens "
              "asked for; pass a larger --dataset for more")
    for hp, st in result.stats.items():
        print(f"  {hp}: mean norm {st.mean_norm:.3f} over {st.count:,} tokens")
    return 0
