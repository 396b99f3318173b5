"""``sasa browse RUN_DIR --out site/``: a static feature browser over evaluated SAEs.

The site is plain files: ``index.html`` (every SAE and group, searchable and sortable),
``group.html?s=<sae>&g=<group>`` (one group: top contexts shaded by activation with the group's
code on hover, activation density, singular values and effective rank, the 2-D code view), and
data as JavaScript files that call a global function (``sasaIndex(...)``, ``sasaShard(...)``)
and are loaded with ``<script>`` tags. Chromium refuses ``fetch()`` of JSON from ``file://``
pages but runs scripts, so the same site works opened from disk and behind
``python -m http.server``. Big runs stay fast: a group page loads only its shard of
``SHARD_GROUPS`` groups, never the whole run; the index holds one row of numbers per group.

What a page shows comes from ``sasa eval``'s files (eval.json, contexts.parquet, groups.npz)
plus one short pass here with the SAE over the cache: the activation of the group on every
token of each context window (reading only the chunks that hold them) and the codes of the
first ``view_tokens`` tokens, projected per group onto its top-2 principal plane (uncentred, so
a circle feature is a ring around the origin; r = 1 SAEs have no plane and get no view).
"""

from __future__ import annotations

import html
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sasa.errors import SasaError
from sasa.store.options import DEFAULT_EXCLUDE

SHARD_GROUPS = 64


@dataclass
class BrowseConfig:
    """One browser site for the evaluated SAEs of some run folders."""

    runs: list[str]
    """Run folders (or SAE folders) whose SAEs have an eval.json from ``sasa eval``."""
    out: str
    """Folder to write the site into (replaced if it holds an earlier site)."""
    view_tokens: int = 16384
    """Tokens whose codes make the 2-D views."""
    view_points: int = 1000
    """Most points drawn per group view."""
    storage_options: dict | None = None
    """fsspec options for the caches."""
    title: str = "sasa feature browser"
    """Page title."""


def _evaluated(runs) -> list[Path]:
    from sasa.analysis.cli import _sae_folders

    folders = [f for f in _sae_folders(runs) if (f / "eval.json").is_file() and (f / "groups.npz").is_file()]
    if not folders:
        raise SasaError(f"no SAE in {', '.join(map(str, runs))} has eval.json and groups.npz; run "
                        "`sasa eval --cache URL --sae RUN` first")
    return folders


def _js(path: Path, fn: str, *args) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = ",".join(json.dumps(a, separators=(",", ":"), allow_nan=False) for a in args)
    path.write_text(f"{fn}({body});\n", encoding="utf-8")


def _r(a, nd=4):
    return np.round(np.asarray(a, dtype=np.float64), nd).tolist()


def _split_scores(ev: dict, groups: int) -> list:
    """Per group: the splitting count (units holding 90% of the feature) of the planted
    feature this group recovers best, on synthetic caches; None elsewhere."""
    syn = ev.get("synthetic")
    out = [None] * groups
    if not syn:
        return out
    for f, g in enumerate(syn["best_unit_F"]):
        u = syn["units_F"][f]
        if u is not None and (out[g] is None or u > out[g]):
            out[g] = float(u)
    return out


def _window_codes(cache, sae, hp, ctx, window):
    """The group's codes on every token of each context window: {(group, rank): (tokens,
    codes [n, r])}, reading only the chunks that hold those rows."""
    import torch

    ctx_len, chunk_rows = cache.ctx_len, cache.layout.chunk_rows
    wins = []
    for g, k, row in zip(ctx["group"], ctx["rank"], ctx["row"]):
        seq, pos = divmod(int(row), ctx_len)
        lo, hi = max(0, pos - window), min(ctx_len, pos + window + 1)
        wins.append((int(g), int(k), seq * ctx_len + np.arange(lo, hi), pos - lo))
    if not wins:
        return {}
    need = np.unique(np.concatenate([w[2] for w in wins]))
    x = np.empty((len(need), cache.hookpoints[hp]), np.float32)
    for c in np.unique(need // chunk_rows):
        sel = np.flatnonzero(need // chunk_rows == c)
        x[sel] = cache.read_rows(hp, int(c) * chunk_rows, (int(c) + 1) * chunk_rows)[need[sel] - c * chunk_rows]
    pairs_row = np.concatenate([np.searchsorted(need, w[2]) for w in wins])
    pairs_g = np.concatenate([np.full(len(w[2]), w[0]) for w in wins])
    codes = np.empty((len(pairs_row), sae.cfg.rank), np.float32)
    order = np.argsort(pairs_row, kind="stable")
    with torch.no_grad():
        for lo in range(0, len(need), 4096):
            a, b = np.searchsorted(pairs_row[order], [lo, lo + 4096])
            idx = order[a:b]
            z = sae(torch.from_numpy(x[lo:lo + 4096])).codes_BGR
            codes[idx] = z[torch.from_numpy(pairs_row[idx] - lo), torch.from_numpy(pairs_g[idx])].numpy()
    out, at = {}, 0
    tokens = {int(s): t for s, t in zip(*_seq_tokens(cache, {int(w[2][0]) // ctx_len for w in wins}))}
    for g, k, rows, center in wins:
        n = len(rows)
        seq = int(rows[0]) // ctx_len
        out[(g, k)] = (tokens[seq][rows % ctx_len], codes[at:at + n], center)
        at += n
    return out


def _seq_tokens(cache, seqs):
    seqs = np.array(sorted(seqs), dtype=np.int64)
    return seqs, cache.tokens.get_orthogonal_selection((seqs, slice(None)))


def _views(cache, sae, hp, n_tokens, max_points):
    """{group: (x, y, plane_energy)} from the codes of the first ``n_tokens`` kept rows."""
    import torch

    from sasa.analysis.contexts import CodeViews
    from sasa.analysis.distributed import unit_chunks
    from sasa.analysis.scan import read_chunk

    if sae.cfg.rank < 2 or n_tokens <= 0:
        return {}
    views = CodeViews(n_tokens)
    with torch.no_grad():
        for c in unit_chunks(cache, 0, 1):
            chunk = read_chunk(cache, c, [hp], DEFAULT_EXCLUDE)
            for lo in range(0, len(chunk.rows), 4096):
                out = sae(torch.from_numpy(chunk.acts[hp][lo:lo + 4096]))
                views.update(out.codes_BGR, out.active_BG, torch.from_numpy(chunk.rows[lo:lo + 4096]))
            if views.seen >= n_tokens:
                break
    t = views.table(n_groups=sae.cfg.groups, max_points=max_points, min_points=3)
    g, x, y, e = (t.column(k).to_numpy() for k in ("group", "x", "y", "plane_energy"))
    return {int(k): (x[g == k], y[g == k], float(e[g == k][0])) for k in np.unique(g)}


def build_site(cfg: BrowseConfig) -> Path:
    """Write the site; returns the path of index.html."""
    import pyarrow.parquet as pq

    from sasa.analysis.browse_page import GROUP_HTML, INDEX_HTML, STYLE
    from sasa.analysis.contexts import _token, load_tokenizer_for
    from sasa.analysis.evaluate import load_eval_sae
    from sasa.store import open_cache

    folders = _evaluated(cfg.runs)
    out = Path(cfg.out)
    if out.exists():
        if not (out / "data" / "index.js").is_file() and any(out.iterdir()):
            raise SasaError(f"{out} holds files that are not a sasa browser site; choose a new or empty --out")
        shutil.rmtree(out)
    (out / "data").mkdir(parents=True)
    saes, rows = [], []
    for s, folder in enumerate(folders):
        ev = json.loads((folder / "eval.json").read_text())
        arrays = np.load(folder / "groups.npz")
        sae = load_eval_sae(folder)
        G, R = sae.cfg.groups, sae.cfg.rank
        cache = open_cache(ev["cache"], cfg.storage_options)
        hp = ev["hookpoint"]
        tokenizer, _ = load_tokenizer_for(cache, None)
        ctx_info = ev.get("contexts")
        ctx = pq.read_table(folder / ctx_info["path"]).to_pydict() if ctx_info else {"group": [], "rank": [], "row": [], "activation": []}
        window = int(ev.get("eval_config", {}).get("window", 8))
        wins = _window_codes(cache, sae, hp, ctx, window)
        views = _views(cache, sae, hp, cfg.view_tokens, cfg.view_points)
        split = _split_scores(ev, G)
        freq, mx, eff = arrays["frequency_G"], arrays["max_G"], arrays["eff_rank_G"]
        sv, hist = arrays["singular_values_GR"], arrays["hist_GH"]
        log2_lo = float(np.log2(arrays["edges_H1"][0]))
        per_octave = round(1 / float(np.log2(arrays["edges_H1"][1]) - log2_lo))
        top_tok = {g: [] for g in range(G)}
        per_group = {g: [] for g in range(G)}
        for g, k, act in zip(ctx["group"], ctx["rank"], ctx["activation"]):
            toks, codes, center = wins[(int(g), int(k))]
            strs = [_token(tokenizer, t) for t in toks]
            per_group[int(g)].append({"act": round(float(act), 5), "center": int(center), "tokens": strs,
                                      "acts": _r(np.linalg.norm(codes, axis=1)),
                                      "codes": _r(codes, 3) if R >= 2 else None})
            if len(top_tok[int(g)]) < 3:
                top_tok[int(g)].append(strs[center])
        meta = {"name": ev.get("name", folder.name), "arch": ev["sae_config"].get("arch"), "groups": G, "rank": R,
                "hookpoint": hp, "fvu": ev.get("fvu"), "l0": ev.get("l0_groups"), "n_tokens": ev.get("n_tokens"),
                "synthetic": "synthetic" in ev}
        saes.append(meta)
        for lo in range(0, G, SHARD_GROUPS):
            shard = {}
            for g in range(lo, min(G, lo + SHARD_GROUPS)):
                nz = np.flatnonzero(hist[g])
                view = views.get(g)
                shard[g] = {"freq": float(freq[g]), "max": float(mx[g]), "eff_rank": int(eff[g]), "sv": _r(sv[g]),
                            "split": split[g], "contexts": per_group[g],
                            "hist": {"first": int(nz[0]) if len(nz) else 0, "log2_lo": log2_lo, "per_octave": per_octave,
                                     "counts": hist[g, nz[0]:nz[-1] + 1].tolist() if len(nz) else []},
                            "view": {"x": _r(view[0], 3), "y": _r(view[1], 3), "energy": round(view[2], 4)} if view else None}
            _js(out / "data" / str(s) / f"{lo // SHARD_GROUPS}.js", "sasaShard", s, lo // SHARD_GROUPS, meta, shard)
        rows += [[s, g, float(freq[g]), float(mx[g]), int(eff[g]), split[g], " ".join(top_tok[g])] for g in range(G)]
    _js(out / "data" / "index.js", "sasaIndex", {"title": cfg.title, "shard_groups": SHARD_GROUPS, "saes": saes,
                                                 "columns": ["sae", "group", "freq", "max", "eff_rank", "split", "tokens"],
                                                 "rows": rows})
    (out / "style.css").write_text(STYLE, encoding="utf-8")
    (out / "index.html").write_text(INDEX_HTML.replace("@TITLE@", html.escape(cfg.title)), encoding="utf-8")
    (out / "group.html").write_text(GROUP_HTML.replace("@TITLE@", html.escape(cfg.title)).replace("@SHARD@", str(SHARD_GROUPS)), encoding="utf-8")
    return out / "index.html"
