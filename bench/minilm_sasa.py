"""SASA r = 1/2/4/8 against TopK on real MiniLM activations (issue 9, the MiniLM part).

One sweep per token budget through the streaming trainer (``sasa.trainer.train``, what
``sasa sweep`` runs), every member read from the same pass, all at lr 1e-3 (the demo's),
batch 1024, width G*r = 1536 = 4 d:

- ``sasa_r{1,2,4,8}``: SASA at s*r = 32 active coordinates, ``consolidate="anneal"`` (default);
- ``sasa_r4_plain``: SASA r = 4, s = 8 with ``consolidate="none"`` (the plain objective);
- ``topk_k32``: TopK at equal active coordinates; ``topk_k8``: TopK at equal active units
  with SASA r = 4, s = 8 (``--topk``: SAEConfig overrides for both).

``analyse`` scores every saved SAE on held-out rows (raw activations, BOS/pad excluded) with its
own gate (``--batch-gate``: s*B groups over each scoring batch instead, so that an SAE trained
with ``batch_gate_from`` is scored at s groups per token on average too): FVU, and for SASA
the effective ranks of each group's map (``SAE.effective_ranks``) and of the codes the group
actually emits (eigenvalues of sum z_g z_g^T over the tokens where g fires), and the
FVU after truncating every fired group's code to its top-k principal directions (k = 1, 2,
r/2 below r): how much of the reconstruction needs a second dimension at all. ``rays`` asks
whether a group's codes lie on a few lines (several 1-D features sharing the group) or spread
over its subspace (one multi-dimensional feature), against Gaussian codes of the same second
moment. ``table`` prints the markdown tables of bench/RESULTS_minilm.md from the JSONL.

    python bench/minilm_sasa.py train --cache C --hookpoint resid_post.4 --tokens 131072 --work W
    python bench/minilm_sasa.py train ... --members sasa_r1 sasa_r4 --sasa '{"s_ramp_tokens": null}'
    python bench/minilm_sasa.py analyse --work W --heldout H --rows 262144:327680 --jsonl J
    python bench/minilm_sasa.py rays W/t1048576/sasa_r4 --heldout H --rows 262144:294912
    python bench/minilm_sasa.py table --jsonl J

CPU, one torch thread per process; on the shared 2-core VM a 7-member sweep took 3-6 s per
1024-token step (bench/RESULTS_minilm.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import parse_variants  # noqa: E402
from sasa.trainer import MemberConfig, TrainConfig, load_sae, train

WIDTH, COORDS, LR, BATCH = 1536, 32, 1e-3, 1024


def members(hookpoint: str, extra: bool = False, sasa: dict | None = None,
            topk: dict | None = None) -> list[MemberConfig]:
    """The seven members; ``extra`` adds sasa_r{1,2,8}_plain (``consolidate="none"``); ``sasa``:
    SAEConfig overrides for sasa_r{1,2,4,8}, the default procedure's members; ``topk``: for
    topk_k32 and topk_k8."""
    out = []
    for r in (1, 2, 4, 8):
        out.append(MemberConfig(hookpoint, {"arch": "sasa", "groups": WIDTH // r, "rank": r,
                                            "top_s": COORDS // r, **(sasa or {})}, lr=LR,
                                name=f"sasa_r{r}"))
    out.append(MemberConfig(hookpoint, {"arch": "sasa", "groups": WIDTH // 4, "rank": 4, "top_s": 8,
                                        "consolidate": "none"}, lr=LR, name="sasa_r4_plain"))
    for k in (COORDS, 8):
        out.append(MemberConfig(hookpoint, {"arch": "topk", "groups": WIDTH, "top_s": k,
                                            **(topk or {})}, lr=LR, name=f"topk_k{k}"))
    if extra:
        out += [MemberConfig(hookpoint, {"arch": "sasa", "groups": WIDTH // r, "rank": r,
                                         "top_s": COORDS // r, "consolidate": "none"}, lr=LR,
                             name=f"sasa_r{r}_plain") for r in (1, 2, 8)]
    return out


def cmd_train(a) -> None:
    torch.set_num_threads(a.threads)
    for tokens in a.tokens:
        out = Path(a.work) / f"t{tokens}"
        sasa = json.loads(a.sasa) if a.sasa else None
        topk = json.loads(a.topk) if a.topk else None
        chosen = [m for m in members(a.hookpoint, True, sasa, topk) if m.name in a.members] \
            if a.members is not None else members(a.hookpoint, sasa=sasa, topk=topk)
        chosen += [MemberConfig(a.hookpoint, {"arch": "sasa", "groups": WIDTH // 4, "rank": 4,
                                              "top_s": 8, **over}, lr=LR, name=name)
                   for name, over in parse_variants(a.variant).items()]
        cfg = TrainConfig(cache=a.cache, members=chosen, tokens=tokens,
                          batch_size=BATCH, seed=a.seed, log_every=8, checkpoint_every=64,
                          cpu_threads=a.threads)
        t0 = time.perf_counter()
        res = train(cfg, out, resume=(out / "checkpoints").exists(), progress=False)
        print(json.dumps({"tokens": tokens, "steps": res.steps, "seconds": time.perf_counter() - t0,
                          "final_train_fvu": {k: v["fvu"] for k, v in res.final.items()}}), flush=True)


def heldout(url: str, hookpoint: str, rows: str) -> torch.Tensor:
    """Raw activations of rows [a, b) of a cache, BOS/pad excluded."""
    from sasa.store import open_cache
    cache = open_cache(url)
    a, b = (int(v) for v in rows.split(":"))
    C = cache.ctx_len
    x = cache.read_rows(hookpoint, a, b)
    toks = np.asarray(cache.tokens[a // C: b // C]).reshape(-1)
    return torch.from_numpy(x[cache.row_mask(toks)])


@torch.no_grad()
def score(sae, x_ND: torch.Tensor, batch: int = 4096) -> dict:
    """Held-out FVU; for SASA r >= 2 also code ranks and rank-k truncation FVUs."""
    G, R = sae.cfg.groups, sae.cfg.rank
    total = (x_ND - x_ND.mean(0)).square().sum().item()
    err, fires_G = 0.0, torch.zeros(G, dtype=torch.long)
    m_GRR = torch.zeros(G, R, R, dtype=torch.float64)
    for i in range(0, len(x_ND), batch):
        x = x_ND[i:i + batch]
        z_BGR = sae.encode(x)
        err += (x - sae.decode(z_BGR)).square().sum().item()
        on_BG = z_BGR.abs().sum(-1) > 0
        fires_G += on_BG.sum(0)
        if R > 1:
            z = z_BGR.double()
            m_GRR += torch.einsum("bgr,bgs->grs", z, z)
    res = {"fvu": err / total, "l0_groups": fires_G.sum().item() / len(x_ND),
           "dead_frac": (fires_G == 0).float().mean().item()}
    if sae.cfg.arch != "sasa":
        return res
    er = sae.effective_ranks()
    res["map_rank_entropy_mean"] = er.entropy_G.float().mean().item()
    res["map_rank_threshold_hist"] = np.bincount(er.threshold_G.numpy(), minlength=R + 1)[1:].tolist()
    res["map_rank_threshold_mean"] = er.threshold_G.float().mean().item()
    if R == 1:
        return res
    # Codes actually emitted: eigen-spectrum of each group's second moment over its firings.
    ev_GR, vec_GRR = torch.linalg.eigh(m_GRR)  # ascending
    ev_GR, vec_GRR = ev_GR.flip(-1).clamp_min(0), vec_GRR.flip(-1)
    used = fires_G >= 4 * R  # groups with enough firings for a rank estimate
    p_GR = ev_GR / ev_GR.sum(-1, keepdim=True).clamp_min(1e-300)
    ent_G = (-(p_GR * p_GR.clamp_min(1e-300).log()).sum(-1)).exp()
    dims90_G = (p_GR.cumsum(-1) < 0.9).sum(-1) + 1
    energy_G = ev_GR.sum(-1)
    w = energy_G[used] / energy_G[used].sum()
    res["groups_used"] = int(used.sum())
    res["code_rank_entropy_mean"] = ent_G[used].mean().item()
    res["code_rank_entropy_energy_weighted"] = (ent_G[used] * w).sum().item()
    res["code_dims90_hist"] = np.bincount(dims90_G[used].numpy(), minlength=R + 1)[1:].tolist()
    res["code_dims90_energy_share"] = [w[dims90_G[used] == k].sum().item() for k in range(1, R + 1)]
    res["code_top1_energy_share"] = (ev_GR[used, 0].sum() / energy_G[used].sum()).item()
    # FVU after truncating every fired group's code to its top-k principal directions.
    trunc = {}
    for k in sorted({1, 2, R // 2} - {R}):
        P_GRR = (vec_GRR[:, :, :k] @ vec_GRR[:, :, :k].transpose(1, 2)).float()
        e = 0.0
        for i in range(0, len(x_ND), batch):
            x = x_ND[i:i + batch]
            z_BGR = torch.einsum("bgr,grs->bgs", sae.encode(x), P_GRR)
            e += (x - sae.decode(z_BGR)).square().sum().item()
        trunc[str(k)] = e / total
    res["fvu_truncated_to_k"] = trunc
    return res


def _lines(u_NR: torch.Tensor, w_N: torch.Tensor, k: int, gen: torch.Generator, iters: int = 15):
    """k lines through 0 (sign-free k-means on unit vectors, weights w); returns |cos| to the
    nearest line per point."""
    lines_KR = u_NR[torch.randperm(len(u_NR), generator=gen)[:k]].clone()
    for _ in range(iters):
        a_N = (u_NR @ lines_KR.T).abs().argmax(1)
        for j in range(k):
            sel = a_N == j
            if sel.any():
                m = (u_NR[sel] * w_N[sel, None]).T @ u_NR[sel]
                lines_KR[j] = torch.linalg.eigh(m)[1][:, -1]
    return (u_NR @ lines_KR.T).abs().amax(1)


@torch.no_grad()
def rays(sae, x_ND: torch.Tensor, cos: float = 0.95, batch: int = 4096, seed: int = 0) -> dict:
    """Is a group's code a mixture of r one-dimensional features (rays) or spread over its
    subspace? Per group with >= 8r firings: fit r lines to its code directions; the energy share
    of firings within ``cos`` of their line, against the same fit on Gaussian codes with the
    group's own second moment and count (a continuous feature of the same shape)."""
    G, R = sae.cfg.groups, sae.cfg.rank
    zs = [[] for _ in range(G)]
    for i in range(0, len(x_ND), batch):
        z_BGR = sae.encode(x_ND[i:i + batch])
        b, g = (z_BGR.abs().sum(-1) > 0).nonzero(as_tuple=True)
        z_PR = z_BGR[b, g]
        for gi in g.unique().tolist():
            zs[gi].append(z_PR[g == gi].double())
    gen = torch.Generator().manual_seed(seed)
    real, null, energy = [], [], []
    for gi in range(G):
        if not zs[gi]:
            continue
        z = torch.cat(zs[gi])
        if len(z) < 8 * R:
            continue
        m = z.T @ z / len(z)
        zn = torch.randn(len(z), R, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(
            m + 1e-9 * torch.eye(R, dtype=torch.float64)).T
        out = []
        for zz in (z, zn):
            w = zz.square().sum(1)
            c = _lines(zz / w.sqrt()[:, None].clamp_min(1e-30), w, R, gen)
            out.append(((c >= cos) * w).sum().item() / w.sum().item())
        real.append(out[0]); null.append(out[1]); energy.append(z.square().sum().item())
    real_t, null_t, e = torch.tensor(real), torch.tensor(null), torch.tensor(energy)
    e = e / e.sum()
    return {"groups": len(real), "ray_share_real": (real_t * e).sum().item(),
            "ray_share_null": (null_t * e).sum().item(),
            "groups_more_ray_like_than_null_by_0.1": ((real_t - null_t) > 0.1).float().mean().item(),
            "groups_less_ray_like_than_null_by_0.1": ((null_t - real_t) > 0.1).float().mean().item()}


def cmd_rays(a) -> None:
    torch.set_num_threads(a.threads)
    x_ND = heldout(a.heldout, a.hookpoint, a.rows)
    for folder in a.saes:
        row = {"sae": folder, "heldout_rows": a.rows, "cos": a.cos,
               **rays(load_sae(folder).float().eval(), x_ND, a.cos)}
        print(json.dumps(row), flush=True)


def cmd_analyse(a) -> None:
    torch.set_num_threads(a.threads)
    x_ND = heldout(a.heldout, a.hookpoint, a.rows)
    with open(a.jsonl, "a") as f:
        for run in sorted(Path(a.work).glob("t*"), key=lambda p: int(p.name[1:])):
            if a.tokens and int(run.name[1:]) not in a.tokens:
                continue
            for folder in sorted(p for p in run.iterdir() if (p / "sae.safetensors").exists()):
                info = json.loads((folder / "train.json").read_text())
                sae = load_sae(folder).float().eval()
                if a.batch_gate and sae.cfg.arch != "relu":  # s*B over each scoring batch
                    sae.gate_threshold.zero_()
                    sae.cfg.gate = "batch"
                row = {"tokens": info["tokens"], "member": folder.name, "heldout_rows": a.rows,
                       "heldout_tokens": len(x_ND), "final_train_fvu": info["final"]["fvu"],
                       **({"eval_gate": "batch"} if a.batch_gate else {}), **score(sae, x_ND)}
                f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)


def cmd_table(a) -> None:
    rows = [json.loads(line) for line in open(a.jsonl)]
    budgets = sorted({r["tokens"] for r in rows})
    names = ["topk_k32", "topk_k8", "sasa_r1", "sasa_r2", "sasa_r4", "sasa_r4_plain", "sasa_r8",
             "sasa_r1_plain", "sasa_r2_plain", "sasa_r8_plain"]
    by = {(r["member"], r["tokens"]): r for r in rows}
    print("held-out FVU\n\n| model | " + " | ".join(f"{t:,}" for t in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for n in names:
        print(f"| {n} | " + " | ".join(f"{by[n, t]['fvu']:.4f}" if (n, t) in by else "-"
                                         for t in budgets) + " |")
    for ref_t in budgets:
        if ("topk_k32", ref_t) not in by:
            continue
        target = by["topk_k32", ref_t]["fvu"]
        print(f"\ntokens to reach topk_k32's FVU at {ref_t:,} tokens ({target:.4f}):")
        for n in names[1:]:
            curve = [(t, by[n, t]["fvu"]) for t in budgets if (n, t) in by]
            if not curve:
                continue
            hit = next((i for i, (_, f) in enumerate(curve) if f <= target), None)
            if hit is None:
                print(f"  {n}: not reached within {curve[-1][0]:,} tokens (FVU {curve[-1][1]:.4f})")
            elif hit == 0:
                print(f"  {n}: reached by its smallest budget run, {curve[0][0]:,} tokens "
                      "(not bracketed)")
            else:  # log-linear interpolation between the budgets around the crossing
                (t0, f0), (t1, f1) = curve[hit - 1], curve[hit]
                u = (f0 - target) / (f0 - f1)
                t = math.exp(math.log(t0) + u * (math.log(t1) - math.log(t0)))
                print(f"  {n}: {t:,.0f} tokens = {t / ref_t:.2f}x TopK's")
    at = a.at or budgets[-1]
    print(f"\ngroups at {at:,} tokens\n")
    print("| model | FVU | groups fired (any / >= 4r times) of G | map eff. rank (entropy) | map rank hist (threshold) "
          "| code eff. rank (mean / energy-weighted) | code dims for 90% (share of groups' energy, "
          "1..r) | top-1 direction's energy share | FVU codes cut to rank 1 / 2 / r/2 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in names:
        r = by.get((n, at))
        if r is None or "map_rank_entropy_mean" not in r:
            continue
        G = sum(r["map_rank_threshold_hist"])
        if "code_rank_entropy_mean" not in r:
            print(f"| {n} | {r['fvu']:.4f} | {G - round(r['dead_frac'] * G)} / - of {G} | "
                  f"{r['map_rank_entropy_mean']:.2f} | {r['map_rank_threshold_hist']} | - | - | - | - |")
            continue
        share = " / ".join(f"{v:.2f}" for v in r["code_dims90_energy_share"])
        cut = " / ".join(f"{v:.4f}" for v in r["fvu_truncated_to_k"].values())
        fired = G - round(r["dead_frac"] * G)
        print(f"| {n} | {r['fvu']:.4f} | {fired} / {r['groups_used']} of {G} | "
              f"{r['map_rank_entropy_mean']:.2f} | "
              f"{r['map_rank_threshold_hist']} | {r['code_rank_entropy_mean']:.2f} / "
              f"{r['code_rank_entropy_energy_weighted']:.2f} | {share} | "
              f"{r['code_top1_energy_share']:.2f} | {cut} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--cache", required=True)
    t.add_argument("--hookpoint", default="resid_post.4")
    t.add_argument("--tokens", type=int, nargs="+", required=True)
    t.add_argument("--work", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--variant", nargs="*", help="extra members NAME=JSON: SASA r = 4, s = 8 with "
                   "these SAEConfig overrides (hypotheses in bench/SPLITTING.md)")
    t.add_argument("--sasa", help="JSON of SAEConfig overrides for sasa_r1/r2/r4/r8 (the default "
                   "procedure's members), e.g. '{\"s_ramp_tokens\": 1048576}'")
    t.add_argument("--topk", help="JSON of SAEConfig overrides for topk_k32 and topk_k8, e.g. "
                   "'{\"batch_gate_from\": 0.8}'")
    t.add_argument("--members", nargs="*", help="only these members (default: all seven); a "
                   "subset sees the same batches in the same order (same seed)")
    e = sub.add_parser("analyse")
    e.add_argument("--work", required=True)
    e.add_argument("--heldout", required=True, help="cache holding the held-out rows")
    e.add_argument("--rows", required=True, help="held-out rows a:b")
    e.add_argument("--hookpoint", default="resid_post.4")
    e.add_argument("--jsonl", required=True)
    e.add_argument("--tokens", type=int, nargs="*", help="only these budgets (default: all)")
    e.add_argument("--batch-gate", action="store_true", help="score every SAE with the batch "
                   "gate (s*B groups over each batch of 4096 held-out tokens: s per token on "
                   "average, whatever threshold a batch-gated SAE learned; rows get eval_gate)")
    e.add_argument("--threads", type=int, default=1)
    y = sub.add_parser("rays")
    y.add_argument("saes", nargs="+", help="SASA folders (r >= 2)")
    y.add_argument("--heldout", required=True)
    y.add_argument("--rows", required=True)
    y.add_argument("--hookpoint", default="resid_post.4")
    y.add_argument("--cos", type=float, default=0.95)
    y.add_argument("--threads", type=int, default=1)
    s = sub.add_parser("table")
    s.add_argument("--jsonl", required=True)
    s.add_argument("--at", type=int, help="budget of the groups table (default: the largest)")
    a = p.parse_args()
    {"train": cmd_train, "analyse": cmd_analyse, "rays": cmd_rays, "table": cmd_table}[a.cmd](a)


if __name__ == "__main__":
    main()
