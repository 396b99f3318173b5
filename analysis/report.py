"""``sasa report``: one self-contained HTML page for one or more trained sweeps.

Everything the page shows comes from files the trainer and ``sasa eval`` wrote beside each SAE:
``metrics.jsonl`` (training curves), ``train.json``, ``eval.json``, ``contexts.parquet`` and
``codes.parquet``. Figures are drawn with matplotlib's Agg backend and embedded as base64 PNG
data URIs, so the page is one file that opens anywhere, offline; the cost is size (about
30-80 kB per figure), fine for the tens of SAEs a sweep holds.

An SAE whose run stopped before the end (no saved weights) stays in the page, so its curves
show how far it got, but is marked "unfinished (step X of Y)" in every label and table row,
and a note at the top names each one; ``sasa report`` prints the same note.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sasa.errors import SasaError


class Member(NamedTuple):
    """What the report knows about one SAE of a sweep."""

    name: str
    folder: Path
    config: dict
    """SAEConfig fields (config.json)."""
    metrics: list[dict]
    """Training metric lines."""
    eval: dict | None
    """eval.json, when the SAE was evaluated."""
    unfinished: str | None = None
    """None for a saved SAE; else how far its run got, e.g. "step 750 of 2930"."""


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise SasaError(f"{path} is damaged (not valid JSON: {err}); restore it or remove its SAE "
                        "folder from the sweep") from None


def _metric_lines(path: Path) -> list[dict]:
    """Metric lines; the last one may be torn by a run killed mid-write and is then dropped."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    out = []
    for i, ln in enumerate(lines):
        try:
            out.append(json.loads(ln))
        except ValueError:
            if i < len(lines) - 1:
                raise SasaError(f"{path} line {i + 1} is not JSON; restore the file") from None
    return out


def _planned_steps(root: Path) -> int | None:
    run = root / "run.json"
    try:
        cfg = json.loads(run.read_text())
        return -(-int(cfg["tokens"]) // int(cfg["batch_size"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_members(sweeps) -> list[Member]:
    """Every SAE folder (with a config.json or metrics.jsonl, or an evaluated SAELens / sparsify
    SAE) of the given sweep folders; a folder of ours without saved weights (config.json and
    sae.safetensors) is marked unfinished."""
    members = []
    for sweep in sweeps:
        root = Path(sweep)
        if not root.is_dir():
            raise SasaError(f"sweep folder {root} does not exist")
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            cfg_file, metrics_file = folder / "config.json", folder / "metrics.jsonl"
            if not cfg_file.is_file() and not metrics_file.is_file():
                if (folder / "cfg.json").is_file() and (folder / "eval.json").is_file():  # SAELens/sparsify
                    ev = _json(folder / "eval.json")
                    name = folder.name if len(sweeps) == 1 else f"{root.name}/{folder.name}"
                    members.append(Member(name, folder, ev.get("sae_config") or {}, [], ev))
                continue
            config = (_json(cfg_file).get("config") or {}) if cfg_file.is_file() else {}
            lines = _metric_lines(metrics_file) if metrics_file.is_file() else []
            ev = folder / "eval.json"
            name = folder.name if len(sweeps) == 1 else f"{root.name}/{folder.name}"
            unfinished = None
            if not cfg_file.is_file() or not (folder / "sae.safetensors").is_file():
                planned = _planned_steps(root)
                reached = lines[-1].get("step", 0) if lines else 0
                unfinished = f"step {reached} of {planned if planned else '?'}"
            members.append(Member(name, folder, config, lines, _json(ev) if ev.is_file() else None,
                                  unfinished))
    if not members:
        raise SasaError(f"no trained SAEs found in {', '.join(map(str, sweeps))}; pass the --out folder "
                        "of `sasa train` / `sasa sweep`")
    return members


def _png(fig) -> str:
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="{uri}">'


def _label(m: Member) -> str:
    c = m.config
    source = (m.eval or {}).get("source", "sasa")
    if source != "sasa":  # an evaluated SAELens / sparsify SAE
        return f"{m.name} ({source})"
    arch = c.get("arch", "?")
    label = f"{m.name} (sasa r={c.get('rank')} s={c.get('top_s')})" if arch == "sasa" else f"{m.name} ({arch})"
    return f"{label} [unfinished, {m.unfinished}]" if m.unfinished else label


def unfinished_note(members: list[Member]) -> str | None:
    """One line naming the SAEs whose run did not finish, or None when every SAE was saved."""
    todo = [m for m in members if m.unfinished]
    if not todo:
        return None
    return (f"{len(todo)} of {len(members)} SAE(s) did not finish (no saved weights; shown up to the "
            f"step reached and marked unfinished): " + ", ".join(f"{m.name} ({m.unfinished})" for m in todo))


def fig_curves(members: list[Member], key: str, ylabel: str, log: bool) -> str | None:
    import matplotlib.pyplot as plt
    have = [m for m in members if any(key in ln for ln in m.metrics)]
    if not have:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for m in have:
        pts = [(ln["tokens"], ln[key]) for ln in m.metrics if key in ln]
        ax.plot(*zip(*pts), label=_label(m), marker=".")
    ax.set_xlabel("training tokens")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def fig_rank_hists(members: list[Member]) -> str | None:
    import matplotlib.pyplot as plt
    hists = []
    for m in members:
        h = (m.eval or {}).get("eff_rank_hist_live") or (m.eval or {}).get("eff_rank_hist")
        if h is None and m.metrics:
            h = m.metrics[-1].get("eff_rank_hist")
        if h is not None:
            hists.append((m, h))
    if not hists:
        return None
    n = len(hists)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, (m, h) in zip(axes.flat, hists):
        ax.bar(range(len(h)), h, color="tab:blue")
        ax.set_title(_label(m), fontsize=7)
        ax.set_xlabel("effective rank (sv > 0.1 max)", fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def fig_splitting(members: list[Member]) -> str | None:
    import matplotlib.pyplot as plt
    rows = [(m, m.eval["synthetic"]) for m in members if m.eval and "synthetic" in m.eval]
    if not rows:
        return None
    dims = sorted({int(k) for _, s in rows for k in s["units_by_dim"]})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(rows)
    for i, (m, s) in enumerate(rows):
        x = np.arange(len(dims)) + i * width
        axes[0].bar(x, [s["units_by_dim"].get(str(d)) or 0 for d in dims], width, label=_label(m))
        axes[1].bar(x, [s["recovery_by_dim"].get(str(d)) or 0 for d in dims], width, label=_label(m))
    for ax, title in zip(axes, ("units holding 90% of a feature (1 = no splitting)",
                                "subspace recovery by the best single unit")):
        ax.set_xticks(np.arange(len(dims)) + 0.4 - width / 2, [f"d_i={d}" for d in dims])
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0].axhline(1, color="k", lw=0.8)
    axes[1].legend(fontsize=6)
    return _png(fig)


def fig_codes(m: Member) -> str | None:
    import matplotlib.pyplot as plt
    import pyarrow.parquet as pq
    info = (m.eval or {}).get("codes")
    if not info or not (m.folder / info["path"]).is_file():
        return None
    t = pq.read_table(m.folder / info["path"]).to_pandas()
    groups = list(dict.fromkeys(t["group"].tolist()))
    if not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(2.6 * len(groups), 2.6), squeeze=False)
    for ax, g in zip(axes.flat, groups):
        sub = t[t["group"] == g]
        ax.scatter(sub["x"], sub["y"], s=3, alpha=0.5)
        ax.scatter([0], [0], marker="+", color="k")
        ax.set_aspect("equal", "datalim")
        ax.set_title(f"group {g} ({sub['plane_energy'].iloc[0]:.0%} in plane)", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    return _png(fig)


def contexts_html(m: Member, *, groups: int = 8, per_group: int = 3) -> str:
    import pyarrow.parquet as pq
    info = (m.eval or {}).get("contexts")
    if not info or not (m.folder / info["path"]).is_file():
        return ""
    t = pq.read_table(m.folder / info["path"]).to_pandas()
    if t.empty:
        return ""
    best = t[t["rank"] == 0].sort_values("activation", ascending=False)["group"].head(groups).tolist()
    out = [f"<h3>{html.escape(m.name)}: top contexts (tokenizer: {html.escape(str(info.get('tokenizer')))})</h3>",
           "<table><tr><th>group</th><th>activation</th><th>context</th></tr>"]
    for g in best:
        for _, r in t[(t["group"] == g) & (t["rank"] < per_group)].iterrows():
            ctx = f"{html.escape(r['left'])} <b>{html.escape(r['token'])}</b> {html.escape(r['right'])}"
            out.append(f"<tr><td>{g}</td><td>{r['activation']:.3g}</td><td class=ctx>{ctx}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def _scalars(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, (int, float)):
            out[key] = v
        elif isinstance(v, dict) and k not in ("sae_config", "eval_config", "config"):
            out.update(_scalars(v, key + "."))
    return out


def metrics_table(members: list[Member]) -> str:
    rows = []
    for m in members:
        row = {f"sae.{k}": v for k, v in m.config.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if m.metrics:
            row.update(_scalars(m.metrics[-1], "train."))
        if m.eval:
            row.update(_scalars({k: v for k, v in m.eval.items() if k != "version"}, "eval."))
        rows.append((m, row))
    cols = sorted({k for _, r in rows for k in r})
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for m, r in rows:
        cells = "".join(f"<td>{_fmt(r.get(c))}</td>" for c in cols)
        name = f"{m.name} (unfinished, {m.unfinished})" if m.unfinished else m.name
        body.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    return f"<div class=wide><table><tr><th>SAE</th>{head}</tr>{''.join(body)}</table></div>"


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


CSS = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px}
.wide{overflow-x:auto}.ctx{font-family:monospace;white-space:pre-wrap}img{max-width:100%}"""


def browser_link(out: Path, browser: str | Path | None) -> str:
    """A link to the ``sasa browse`` site: ``browser`` (its folder), else a ``browser/`` folder
    beside the report when one holds a site; relative, so the pair can move together."""
    import os

    site = Path(browser) if browser else out.parent / "browser"
    if not (site / "index.html").is_file():
        if browser:
            raise SasaError(f"{site} holds no sasa browse site; run `sasa browse RUN --out {site}` first")
        return ""
    href = os.path.relpath(site / "index.html", out.parent).replace(os.sep, "/")
    return (f'<p>Every group, with its contexts, density and geometry: the <a href="{html.escape(href)}">'
            "feature browser</a> (<code>sasa browse</code>).</p>")


def build_report(sweeps, out: str | Path, *, title: str | None = None, browser: str | Path | None = None) -> Path:
    """Write the HTML page for the sweeps' SAEs to ``out``; returns its path. ``browser``: the
    folder of a ``sasa browse`` site to link (default: ``browser/`` beside ``out`` if present)."""
    import matplotlib
    matplotlib.use("Agg")
    members = load_members([Path(s) for s in sweeps])
    title = title or f"sasa report: {', '.join(str(s) for s in sweeps)}"
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p>{len(members)} SAE(s). Metrics from metrics.jsonl (training) and eval.json "
             "(<code>sasa eval</code>).</p>"]
    note = unfinished_note(members)
    if note:
        parts.append(f"<p><b>{html.escape(note)}</b></p>")
    parts.append(browser_link(Path(out), browser))
    sections = [("FVU against training tokens", fig_curves(members, "fvu", "FVU", True)),
                ("L0 (active coordinates) against training tokens", fig_curves(members, "l0_coords", "L0 coordinates", False)),
                ("Effective ranks of groups", fig_rank_hists(members)),
                ("Splitting on the synthetic cache (SASA against TopK / ReLU)", fig_splitting(members))]
    for heading, uri in sections:
        if uri:
            parts.append(f"<h2>{html.escape(heading)}</h2>{_img(uri, heading)}")
    views = [(m, fig_codes(m)) for m in members]
    if any(uri for _, uri in views):
        parts.append("<h2>Group code views (top-2 principal plane, origin marked +)</h2>")
        parts += [f"<h3>{html.escape(m.name)}</h3>{_img(uri, m.name + ' codes')}" for m, uri in views if uri]
    ctx = [contexts_html(m) for m in members]
    if any(ctx):
        parts.append("<h2>Top-activating contexts</h2>")
        parts += [c for c in ctx if c]
    parts.append("<h2>Every metric</h2>" + metrics_table(members))
    parts.append("</body></html>")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
