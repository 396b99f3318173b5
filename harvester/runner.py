"""One worker's job: turn a shard of token ids into activations and commit it to the store.

The same ``ShardRunner`` runs inside a Ray actor and in the driver's own process
(``workers=0``), so the two paths cannot produce different bytes.

Overlap: ``run_shard`` may be called from two threads at once. The forward passes of one
shard hold ``compute_lock``; its write (conversion, norms, statistics, zarr I/O, all of which
release the GIL for the heavy parts) runs outside the lock, so the next shard computes while
the previous one is written and the device never waits on storage.

GPU path: weights in bf16 (``model_dtype=auto``), token ids and activation buffers in pinned
host memory, ``non_blocking`` copies both ways, one stream sync per shard before the buffers
are handed to the writer. On either device a shard's host buffers are page-aligned and reused
once the writer has committed it (``host_tensor``).
"""

from __future__ import annotations

import math
import mmap
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from sasa.capture import ActivationCapture
from sasa.devices import resolve_device
from sasa.dtypes import torch_dtype
from sasa.hookpoints import parse_hookpoint
from sasa.models import load_model


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, small enough to ship to an actor (no weights, no tokens)."""
    url: str
    cache: dict              # create_cache keyword arguments (layout + attrs)
    model_source: str
    hookpoints: tuple[str, ...]
    model_dtype: str         # "auto" or a store dtype name
    batch_size: int
    device: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    storage_options: dict = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:  # storage_options may hold credentials
        return f"WorkerSpec(url={self.url!r}, model={self.model_source!r}, device={self.device!r})"


class ShardDone(NamedTuple):
    index: int
    tokens: int
    skipped: bool        # already committed with identical bytes (a retried shard)
    compute_s: float
    write_s: float


def resolve_model_dtype(model_dtype: str, device: str) -> torch.dtype:
    if model_dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return torch_dtype(model_dtype)


class ShardRunner:
    """Loads the (truncated) model once, then computes and writes shards."""

    def __init__(self, spec: WorkerSpec, threads: int | None = None, model=None) -> None:
        from sasa.store import create_cache
        if threads:
            torch.set_num_threads(threads)
        self.spec = spec
        self.device = str(resolve_device(spec.device))  # on the worker, where its GPUs are
        self.cuda = self.device.startswith("cuda")
        hps = [parse_hookpoint(h) for h in spec.hookpoints]
        deepest = max(hp.layer for hp in hps)
        if model is None:
            model = load_model(spec.model_source, dtype=resolve_model_dtype(spec.model_dtype,
                               self.device), device=self.device, revision=spec.revision,
                               trust_remote_code=spec.trust_remote_code,
                               keep_layers=deepest + 1)
        self.model = model
        self.capture = ActivationCapture(model, hps)
        self.writer = create_cache(spec.url, storage_options=spec.storage_options or None,
                                   **spec.cache)
        self.layout = self.writer.layout
        self.store_dtype = torch_dtype(self.layout.dtype)
        self.compute_lock = threading.Lock()
        self._buffers: queue.SimpleQueue = queue.SimpleQueue()  # reusable host buffers

    def _host_buffers(self, rows: int) -> dict[str, torch.Tensor]:
        """A shard's host buffers, reused from shard to shard (pinned memory is slow to
        allocate, and fresh memory costs a page fault per page on its first write)."""
        try:
            bufs = self._buffers.get_nowait()
            if next(iter(bufs.values())).shape[0] == rows:
                return bufs
        except queue.Empty:
            pass
        return {hp: host_tensor((rows, d), self.store_dtype, self.cuda)
                for hp, d in self.layout.hookpoints.items()}

    def compute(self, tokens_SC: np.ndarray) -> dict[str, torch.Tensor]:
        """{hookpoint: [S*C, d]} host tensors in the storage dtype."""
        S, C = tokens_SC.shape
        B = self.spec.batch_size
        ids = torch.from_numpy(np.ascontiguousarray(tokens_SC, dtype=np.int64))
        if self.cuda:
            ids = ids.pin_memory()
        host = self._host_buffers(S * C)
        for b in range(0, S, B):
            x = ids[b:b + B].to(self.device, non_blocking=True)
            acts = self.capture(x)
            rows = slice(b * C, (b + len(x)) * C)
            for hp, a in acts.items():
                # The dtype cast happens on the device; the copy to pinned memory is async.
                host[hp][rows].copy_(a.reshape(-1, a.shape[-1]).to(self.store_dtype),
                                     non_blocking=True)
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
        return host

    def run_shard(self, index: int, tokens_SC: np.ndarray) -> ShardDone:
        t0 = time.perf_counter()
        with self.compute_lock:
            acts = self.compute(tokens_SC)
        t1 = time.perf_counter()
        result = self.writer.write_shard(index, tokens_SC, acts)
        self._buffers.put(acts)  # written: the next shard may fill it
        return ShardDone(index, int(tokens_SC.size), result.skipped, t1 - t0,
                         time.perf_counter() - t1)


def host_tensor(shape: tuple[int, ...], dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    """Page-aligned host memory for a shard's activations: pinned for a GPU's copies, else an
    anonymous mapping (torch's own allocations are aligned to 64 bytes only), so the writer
    sends their chunks past the page cache straight from them, without a copy to an aligned
    buffer first (``sasa.store.direct``)."""
    if pinned:
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), np.uint8)[:nbytes]
    return torch.from_numpy(raw).view(dtype).view(shape)


def default_threads(workers_on_node: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers_on_node))
