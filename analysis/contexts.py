"""Top-activating contexts per group, and 2-D views of a group's codes.

A unit's activation on a token is ||z_g|| (the norm of its gated codes; for r = 1 that is the
latent's value). ``TopRows`` keeps, for every group, the ``k`` cache rows with the largest
activation while the cache streams past (ties to the smaller row, so partial results of a split
pass merge into exactly the one-pass table; no per-group loop);
``context_table`` then reads the tokens around each row from the cache and decodes them with
the cache's tokenizer (ids for caches without one, such as synthetic ones).

A SASA group's codes are points in R^r; ``CodeViews`` keeps the first active codes of every
group (sparse, so memory is about s * view_tokens entries) and projects those of the busiest
groups onto their top-2 principal plane. The projection is *not* centred: the origin is where a
code is zero, so a circle feature shows as a ring around the origin.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from sasa.errors import SasaError


class TopRows:
    """Running top-k rows per group by activation, exact and mergeable.

    Order: activation descending, ties broken by the smaller cache row, and only active tokens
    (activation > 0) count, so the result depends only on the set of rows seen: batches in any
    order, or partial results of disjoint row sets merged with ``merge``, give the same table.
    Per batch only the candidates that can still enter are sorted (those >= both the batch's
    k-th value and the current k-th value of their group; ties at the threshold survive), so the
    cost is one partition of [B, G] plus a sort of about G * k entries."""

    def __init__(self, groups: int, k: int):
        if k < 1:
            raise SasaError(f"contexts per group must be >= 1 (got {k})")
        self.k = k
        self.vals_GK = np.full((groups, k), -1.0, dtype=np.float32)
        self.rows_GK = np.full((groups, k), -1, dtype=np.int64)

    def update(self, score_BG, rows_B) -> None:
        # torch: its topk and nonzero are 4-5x faster than numpy's here
        s_BG = torch.as_tensor(score_BG, device="cpu").detach().float()
        rows = _numpy(rows_B).astype(np.int64, copy=False)
        B, G = s_BG.shape
        thr_G = torch.from_numpy(self.vals_GK[:, -1].copy())  # -1 while a group has < k entries
        if B >= self.k:
            thr_G = torch.maximum(thr_G, s_BG.topk(self.k, dim=0).values[-1])
        b, g = torch.nonzero((s_BG >= thr_G) & (s_BG > 0), as_tuple=True)
        self._select(g.numpy(), s_BG[b, g].numpy(), rows[b.numpy()])

    def merge(self, other: "TopRows") -> "TopRows":
        """Fold in the top rows of a disjoint set of rows (another worker's partial result)."""
        if other.vals_GK.shape != self.vals_GK.shape:
            raise SasaError(f"cannot merge top rows of shape {other.vals_GK.shape} into {self.vals_GK.shape}")
        g, j = np.nonzero(other.rows_GK >= 0)
        self._select(g, other.vals_GK[g, j], other.rows_GK[g, j])
        return self

    def _select(self, g_new, v_new, r_new) -> None:
        g0, j0 = np.nonzero(self.rows_GK >= 0)
        g = np.concatenate([g0, g_new]).astype(np.int64)
        v = np.concatenate([self.vals_GK[g0, j0], v_new]).astype(np.float32)
        r = np.concatenate([self.rows_GK[g0, j0], r_new]).astype(np.int64)
        order = np.lexsort((r, -v, g))  # by group, then activation descending, then row
        g, v, r = g[order], v[order], r[order]
        first = np.searchsorted(g, g)  # index of each entry's group's first entry
        rank = np.arange(len(g)) - first
        keep = rank < self.k
        self.vals_GK = np.full_like(self.vals_GK, -1.0)  # new arrays: a partial from Ray is read-only
        self.rows_GK = np.full_like(self.rows_GK, -1)
        self.vals_GK[g[keep], rank[keep]] = v[keep]
        self.rows_GK[g[keep], rank[keep]] = r[keep]


def _numpy(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def load_tokenizer_for(cache, override: str | None = None):
    """(tokenizer or None, name) for decoding the cache's token ids.

    ``override`` (a model folder or name) wins; else the harvester's ``attrs["tokenizer"]["id"]``
    or the harvested model; a cache without one (synthetic) decodes as ids."""
    from sasa.models import load_tokenizer, resolve_model_source
    name = override
    if name is None:
        tok = cache.attrs.get("tokenizer")
        harvest = cache.attrs.get("harvest", {}).get("config", {})
        name = (tok.get("id") if isinstance(tok, dict) else tok) or harvest.get("model")
    if not name:
        return None, "ids"
    try:
        return load_tokenizer(resolve_model_source(name)), name
    except SasaError:
        if override is not None:
            raise
        return None, "ids"  # the recorded tokenizer is not available here: fall back to ids


def _decode(tokenizer, ids) -> str:
    ids = [int(i) for i in ids]
    if tokenizer is None:
        return " ".join(str(i) for i in ids)
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def _token(tokenizer, i: int) -> str:
    if tokenizer is None:
        return str(int(i))
    return tokenizer.convert_ids_to_tokens(int(i))


def context_table(cache, top: TopRows, *, tokenizer=None, window: int = 8, groups=None):
    """A pyarrow Table: group, rank, activation, row, seq, pos, token, left, right, text."""
    import pyarrow as pa

    ctx = cache.ctx_len
    vals, rows = np.asarray(top.vals_GK), np.asarray(top.rows_GK)
    sel = np.arange(len(vals)) if groups is None else np.asarray(groups)
    valid = [(g, j) for g in sel for j in range(top.k) if rows[g, j] >= 0 and vals[g, j] > 0]
    seqs = np.unique([rows[g, j] // ctx for g, j in valid]).astype(np.int64)
    seq_tokens = {int(s): t for s, t in zip(seqs, cache.tokens.get_orthogonal_selection(
        (seqs, slice(None))))} if len(seqs) else {}
    cols = {k: [] for k in ("group", "rank", "activation", "row", "seq", "pos", "token", "left",
                            "right", "text")}
    for g, j in valid:
        row = int(rows[g, j])
        seq, pos = divmod(row, ctx)
        toks = seq_tokens[seq]
        left = _decode(tokenizer, toks[max(0, pos - window):pos])
        right = _decode(tokenizer, toks[pos + 1:pos + 1 + window])
        token = _token(tokenizer, toks[pos])
        for k, v in (("group", int(g)), ("rank", j), ("activation", float(vals[g, j])), ("row", row),
                     ("seq", seq), ("pos", pos), ("token", token), ("left", left), ("right", right),
                     ("text", f"{left} [[{token}]] {right}".strip())):
            cols[k].append(v)
    return pa.table(cols)


class CodeViews:
    """Collects the codes of the first ``max_tokens`` evaluated tokens (smallest cache rows when
    batches come in row order), sparsely; ``merge`` keeps that meaning across workers."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.seen = 0
        self.rows, self.groups, self.codes = [], [], []
        self.token_rows = []

    def update(self, codes_BGR: torch.Tensor, active_BG: torch.Tensor, rows_B: torch.Tensor) -> None:
        take = min(self.max_tokens - self.seen, codes_BGR.shape[0])
        if take <= 0:
            return
        b_idx, g_idx = torch.nonzero(active_BG[:take], as_tuple=True)
        self.rows.append(rows_B[:take][b_idx.cpu()].cpu().numpy())
        self.groups.append(g_idx.cpu().numpy())
        self.codes.append(codes_BGR[:take][b_idx, g_idx].detach().float().cpu().numpy())
        self.token_rows.append(rows_B[:take].cpu().numpy())
        self.seen += take

    def merge(self, other: "CodeViews") -> "CodeViews":
        """Keep the codes of the ``max_tokens`` smallest rows of both (disjoint) row sets,
        ordered by (row, group) as one in-order pass would have collected them."""
        tokens = np.sort(np.concatenate(self.token_rows + other.token_rows or [np.zeros(0, np.int64)]))
        tokens = tokens[:self.max_tokens]
        if not len(tokens):
            return self
        last = tokens[-1]
        rows = np.concatenate(self.rows + other.rows)
        groups = np.concatenate(self.groups + other.groups)
        codes = np.concatenate(self.codes + other.codes)
        keep = rows <= last
        rows, groups, codes = rows[keep], groups[keep], codes[keep]
        order = np.lexsort((groups, rows))
        self.rows, self.groups, self.codes = [rows[order]], [groups[order]], [codes[order]]
        self.token_rows, self.seen = [tokens], len(tokens)
        return self

    def table(self, *, n_groups: int = 6, max_points: int = 1000, min_points: int = 20, seed: int = 0):
        """pyarrow Table of the busiest groups' codes on their top-2 principal plane:
        group, row, x, y, plane_energy (fraction of the codes' energy in that plane)."""
        import pyarrow as pa

        cols = {k: [] for k in ("group", "row", "x", "y", "plane_energy")}
        if not self.rows:
            return pa.table(cols)
        rows, groups = np.concatenate(self.rows), np.concatenate(self.groups)
        codes = np.concatenate(self.codes)
        if codes.shape[1] < 2:
            return pa.table(cols)  # r = 1: a code is a number, there is no plane to show
        ids, counts = np.unique(groups, return_counts=True)
        busiest = ids[np.argsort(-counts, kind="stable")][:n_groups]
        rng = np.random.default_rng(seed)
        for g in busiest:
            idx = np.flatnonzero(groups == g)
            if len(idx) < min_points:
                continue
            if len(idx) > max_points:
                idx = np.sort(rng.choice(idx, max_points, replace=False))
            c = codes[idx].astype(np.float64)
            _, s, vt = np.linalg.svd(c, full_matrices=False)  # uncentred: keep the origin
            xy = c @ vt[:2].T
            energy = float((s[:2] ** 2).sum() / max((s ** 2).sum(), 1e-300))
            cols["group"] += [int(g)] * len(idx)
            cols["row"] += rows[idx].tolist()
            cols["x"] += xy[:, 0].tolist()
            cols["y"] += xy[:, 1].tolist()
            cols["plane_energy"] += [energy] * len(idx)
        return pa.table(cols)


class Ring(NamedTuple):
    """How close a 2-D point cloud is to a circle around the origin (for tests and the report)."""

    radius_cv: float
    """Std / mean of the distances to the origin (0 for a perfect circle)."""
    angle_coverage: float
    """Fraction of 36 angular bins that hold a point (1 for a full circle)."""


def ring_shape(x, y) -> Ring:
    r = np.hypot(x, y)
    bins = np.floor((np.arctan2(y, x) + np.pi) / (2 * np.pi) * 36).astype(int) % 36
    return Ring(float(r.std() / max(r.mean(), 1e-300)), len(np.unique(bins)) / 36)
