"""One read pass of a cache through several SAEs, as exact partial results that merge.

``scan_chunks`` reads whole chunks in order (tokens, then each hookpoint the SAEs need, the
next chunk prefetched on a thread while this one computes), drops BOS/padding rows, cuts each
chunk's kept rows into batches and runs every SAE on them. What it keeps per SAE is a
``Partial``: float64 sums (FVU, explained variance, cosine, shrinkage), integer counts (L0,
firing, histograms of log2 activation per group), the running top-k rows per group, and the
codes of the first tokens (2-D views, synthetic ground-truth scores). Every field merges
exactly: sums add, counts add, top rows and "first tokens" are functions of the row *set*
(ties broken by row; "first" means smallest rows). So any split of the chunks over workers,
merged in any order, gives the single-process result: integers and top-k rows identical,
float64 sums equal to rounding.

Why batches never cross a chunk boundary: a row's activation is then computed in the same batch
whatever the split, so its float32 value is bit-identical in the single-process and the
distributed run (a BLAS kernel may round a row differently in a different batch), and top-k
rows, which compare those values, come out identical rather than nearly so. The cost is a short
batch at the end of each chunk (a 16 MiB chunk of d = 384 bf16 holds 21,845 rows: 5 full
batches of 4096 and one of 1,365).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from sasa.analysis import metrics as M
from sasa.analysis.contexts import CodeViews, TopRows
from sasa.store.options import DEFAULT_EXCLUDE

#: Activation histograms: bins of log2(activation), HIST_PER_OCTAVE per factor of two, from
#: 2**HIST_LOG2_MIN to 2**HIST_LOG2_MAX; activations outside land in the first or last bin.
HIST_PER_OCTAVE = 4
HIST_LOG2_MIN, HIST_LOG2_MAX = -20, 12


def hist_edges() -> np.ndarray:
    """The histograms' bin edges (activation values), [H + 1]."""
    return 2.0 ** (np.arange(HIST_LOG2_MIN * HIST_PER_OCTAVE, HIST_LOG2_MAX * HIST_PER_OCTAVE + 1)
                   / HIST_PER_OCTAVE)


N_HIST = (HIST_LOG2_MAX - HIST_LOG2_MIN) * HIST_PER_OCTAVE


@dataclass
class ScanSettings:
    """What one pass keeps, shared by every SAE of the pass."""

    batch_size: int = 4096
    """Rows per forward (batches stay inside one chunk)."""
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    """Special tokens left out."""
    contexts: int = 8
    """Top rows kept per group (0: none)."""
    view_tokens: int = 16384
    """The first this many tokens' codes are kept for 2-D views (r >= 2 SAEs only)."""
    synth_samples: int = 0
    """The first this many tokens' dense codes are kept (synthetic ground-truth scores)."""


class FirstCodes:
    """The dense codes of the ``n`` smallest rows seen (mergeable)."""

    def __init__(self, n: int):
        self.n = n
        self.rows, self.codes = np.zeros(0, np.int64), None

    def update(self, codes_BGR: torch.Tensor, rows_B) -> None:
        take = min(self.n - len(self.rows), len(rows_B))
        if take <= 0:
            return
        codes = codes_BGR[:take].detach().float().cpu().numpy()
        self.codes = codes if self.codes is None else np.concatenate([self.codes, codes])
        self.rows = np.concatenate([self.rows, np.asarray(rows_B[:take])])

    def merge(self, other: "FirstCodes") -> "FirstCodes":
        if other.codes is None:
            return self
        if self.codes is None:
            self.rows, self.codes = other.rows, other.codes
            return self
        rows = np.concatenate([self.rows, other.rows])
        order = np.argsort(rows, kind="stable")[: self.n]
        self.rows, self.codes = rows[order], np.concatenate([self.codes, other.codes])[order]
        return self


class Partial:
    """Everything one pass accumulates for one SAE; ``merge`` adds a disjoint pass."""

    def __init__(self, groups: int, rank: int, d: int, settings: ScanSettings):
        self.recon = M.ReconAccumulator(d)
        self.sparse = M.SparsityAccumulator(groups)
        self.hist_GH = np.zeros((groups, N_HIST), np.int64)
        self.max_G = np.zeros(groups, np.float32)
        self.top = TopRows(groups, settings.contexts) if settings.contexts else None
        self.views = CodeViews(settings.view_tokens) if rank >= 2 and settings.view_tokens else None
        self.first = FirstCodes(settings.synth_samples) if settings.synth_samples else None

    def update(self, x_BD: torch.Tensor, out, rows_B: torch.Tensor) -> None:
        self.recon.update(x_BD, out.x_hat_BD)
        self.sparse.update(out.codes_BGR, out.active_BG)
        act_BG = out.codes_BGR.norm(dim=-1).float().cpu()  # ||z_g||: a group's activation
        if len(act_BG):
            self.max_G = np.maximum(self.max_G, act_BG.amax(0).numpy())
        b, g = torch.nonzero(act_BG > 0, as_tuple=True)
        if len(b):
            v = np.log2(act_BG[b, g].numpy().astype(np.float64))
            h = np.clip(np.floor((v - HIST_LOG2_MIN) * HIST_PER_OCTAVE), 0, N_HIST - 1).astype(np.int64)
            self.hist_GH += np.bincount(g.numpy() * N_HIST + h, minlength=self.hist_GH.size).reshape(self.hist_GH.shape)
        if self.top is not None:
            self.top.update(act_BG, rows_B)
        if self.views is not None:
            self.views.update(out.codes_BGR, out.active_BG, rows_B)
        if self.first is not None:
            self.first.update(out.codes_BGR, rows_B)

    def merge(self, other: "Partial") -> "Partial":
        self.recon.merge(other.recon)
        self.sparse.merge(other.sparse)
        self.hist_GH = self.hist_GH + other.hist_GH  # new arrays: a partial from Ray is read-only
        self.max_G = np.maximum(self.max_G, other.max_G)
        for key in ("top", "views", "first"):
            mine = getattr(self, key)
            if mine is not None:
                mine.merge(getattr(other, key))
        return self


class Chunk(NamedTuple):
    rows: np.ndarray
    """[n] cache rows kept (exclusions applied), ascending."""
    acts: dict[str, np.ndarray]
    """{hookpoint: [n, d] float32}."""


def read_chunk(cache, chunk: int, hookpoints, exclude) -> Chunk:
    """One chunk's kept rows of each hookpoint, as float32."""
    lay = cache.layout
    tokens = cache.tokens[chunk * lay.chunk_seqs:(chunk + 1) * lay.chunk_seqs].reshape(-1)
    lo, hi = chunk * lay.chunk_rows, (chunk + 1) * lay.chunk_rows
    keep = np.flatnonzero(cache.row_mask(tokens, exclude, hookpoints=hookpoints, rows=np.arange(lo, hi)))
    acts = {hp: cache.read_rows(hp, lo, hi)[keep] for hp in hookpoints}
    return Chunk(lo + keep, acts)


def scan_chunks(cache, members, chunks, settings: ScanSettings, *, device="cpu",
                budget: int | None = None, on_rows=None) -> list[Partial]:
    """Run ``members`` (a list of (sae, hookpoint)) over ``chunks`` in the given order.

    ``budget`` stops after that many kept rows; ``on_rows(n)`` is called after each batch.
    Returns one ``Partial`` per member."""
    hookpoints = sorted({hp for _, hp in members})
    parts = [Partial(sae.cfg.groups, sae.cfg.rank, sae.cfg.d_in, settings) for sae, _ in members]
    chunks = list(chunks)
    done = 0
    with ThreadPoolExecutor(1, thread_name_prefix="sasa-scan") as io, torch.no_grad():
        nxt = io.submit(read_chunk, cache, chunks[0], hookpoints, settings.exclude) if chunks else None
        for i in range(len(chunks)):
            chunk = nxt.result()
            nxt = io.submit(read_chunk, cache, chunks[i + 1], hookpoints, settings.exclude) \
                if i + 1 < len(chunks) else None
            n = len(chunk.rows) if budget is None else min(len(chunk.rows), budget - done)
            for lo in range(0, n, settings.batch_size):
                hi = min(n, lo + settings.batch_size)
                rows = torch.from_numpy(chunk.rows[lo:hi])
                xs = {hp: torch.from_numpy(a[lo:hi]).to(device) for hp, a in chunk.acts.items()}
                for (sae, hp), part in zip(members, parts):
                    x = xs[hp]
                    part.update(x, sae(x), rows)
                if on_rows is not None:
                    on_rows(hi - lo)
            done += n
            if budget is not None and done >= budget:
                if nxt is not None:
                    nxt.cancel()
                break
    return parts


def merge_all(partials_by_unit: list[list[Partial]]) -> list[Partial]:
    """Merge per-unit results (one list of per-SAE partials each) in unit order."""
    out = partials_by_unit[0]
    for unit in partials_by_unit[1:]:
        for mine, theirs in zip(out, unit):
            mine.merge(theirs)
    return out
