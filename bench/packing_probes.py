"""In-memory probes of rounds 3-4 (bench/SPLITTING.md): what packs frequent features into
shared groups on the capped shapes, and does the unpack step undo it?

One shape of bench/consolidation.py (capped at MAX_PROB), one seed, 262,144 training samples,
1024 steps (``--steps N``: N) of batch 1024 (1M tokens), Adam lr 3e-3 (unless ``probe_lr``),
10% warm-up, 20% decay, the consolidation schedules and periodic steps of the member's
SAEConfig (``schedule_at``, ``after_step``); scored on the same held-out
samples as the benchmark: FVU, units per feature by d_i alone and in context, and how many
features share their main group with another ("packed").
Variants (each a name below, or NAME=JSON of SAEConfig overrides):

- ``default``: the default procedure (s ramp and group penalty), in memory;
- ``oracle``: groups initialised at the planted subspaces, plain objective;
- ``batch_ramp`` / ``batch_s1`` (round 3): the default with the batch gate (top s*B over the
  batch) until 30% / 10% of the run, the token gate after;
- ``rank`` (round 3): the default with a rank ramp beside the s ramp: codes j >= k switched off
  (encoder rows zeroed after each step), k = 1 until 10% of the run, then up to r by 30%;
- the JSON key ``"probe_init_seed": k`` (round 7) initialises the SAE with seed k instead of
  the data's seed; "FVU at s = 1" is the mean batch FVU over steps 5-10% of the run (the
  second half of the s = 1 phase);
- the JSON key ``"probe_lr": x`` (round 8) trains at peak lr x instead of 3e-3;
- the JSON key ``"probe_pulse": [a, b, c]`` (round 8) runs the s ramp (``top_s_at``) a
  second time: s = 1 from a to b of the run, then linearly back to the configured s at c;
- the JSON key ``"probe_stop": f`` (round 8) stops after the first f of the run's steps (the
  schedules are the whole run's) and scores the SAE there;
- the JSON key ``"probe_groups": m`` (round 8) trains round(m x G) groups instead of the
  shape's G (same r and s);
- the JSON key ``"probe_data_init": true`` (round 8) starts the SAE with
  ``SAE.init_from_data`` on 16384 training rows (each group spans r centred samples);
- the JSON key ``"probe_warmup": f`` (round 9) warms the lr up over the first f of the run
  instead of 10% (the streaming trainer caps its warm-up at 10%);
- the JSON key ``"probe_b_dec": "median"`` (round 5) starts the decoder bias at the
  coordinate-wise median of 16384 training rows instead of their mean;
- the JSON keys ``"probe_ecov": w``, ``"probe_ecov_form"``, ``"probe_ecov_from"`` and
  ``"probe_ecov_until"`` (round 11) add w x ``energy_cov`` (the form named: "cov", "var",
  "varpos", "lift" or "balance") to the loss while the group penalty is on, from/until those
  shares of the run (default 0 and 1), scaled by the penalty's schedule. Round 11's rows ran
  at commit 9259c01, before ``energy_cov`` 0.03 became the default and with the probe's own
  covariance-table form of "var" (``git checkout 9259c01 -- bench/packing_probes.py trainer/``
  reproduces them digit for digit; at HEAD add ``"energy_cov": 0.0``, and "var" calls the
  trainer's closed form, equal up to float rounding: C seed 0's largest count 1.34 against 1.37).

- the JSON keys of round 12: ``"probe_b_dec": "origin"`` starts the decoder bias at the raw
  origin (where every planted feature is off) and ``"probe_b_dec_frozen": true`` keeps it
  there; ``"probe_oracle": true`` starts any variant at the planted subspaces (as ``oracle``);
  ``"probe_floor": tau`` drops, in training and evaluation, the kept groups whose code norm is
  below tau x the token's largest (the dense path); ``"probe_batch_gate": true`` trains with
  the batch gate from ``"probe_batch_from": f`` of the run (``SAEConfig.batch_gate_from``)
  and so evaluates with the threshold it learned ("(7.91/row)": groups kept per held-out row).
  Round 12's rows ran at commit 022e2ef with the probe's own copy of that gate, whose
  threshold was the mean of the smallest kept scores over the last 20% of the steps (the
  trainer's: a running mean, decay 0.99); ``git checkout 022e2ef -- bench/packing_probes.py
  trainer/`` reproduces them (E seed 0's ``bg8`` row checked digit for digit). At 29a2805
  (the trainer's running mean then had decay 0.99; 0.9 since round 13) its threshold kept
  slightly fewer groups: E seed 0 ``obg`` / ``bg8`` the same units
  and FVU at 7.88 / 7.72 groups per row (against 7.91 / 7.84), B seed 0 ``bg8`` 1.84 on 4-D
  features and FVU 0.0072 at 3.70 per row (against 1.88, 0.0068 at 4.02).

``--overflow`` (round 12) prints, per shape, the share of rows with more features on than s.

``--floors SHAPE SEED`` (round 8) trains the default once and scores it with a floor added to
its gate at evaluation only: a kept group counts only where its code norm is at least tau x
the token's largest (tau = 0 ... 0.4). If a split feature's second group held only small
codes, its units would fall with tau.

"1-D copies": the most groups whose subspace holds at least half of one 1-D feature's
direction (its squared norm), over the 1-D features.

    python bench/packing_probes.py C 0 default oracle 'unpack={"unpack_every": 25}'
    python bench/packing_probes.py --floors B 0
    python bench/packing_probes.py --steps 2048 C 0 default    # 2M tokens instead of 1M
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import parse_variants  # noqa: E402
from bench.consolidation import (CPU_SHAPES, SHAPES, held_out, oracle_weights, score,  # noqa: E402
                                 shape_spec)
from sasa.analysis import metrics  # noqa: E402
from sasa.analysis.splitting import splitting  # noqa: E402
from sasa.analysis.synthetic import generate  # noqa: E402
from sasa.trainer import SAE, SAEConfig  # noqa: E402
from sasa.trainer.consolidate import (StepSchedule, after_step, schedule_at,  # noqa: E402
                                       top_s_at)
from sasa.trainer.schedule import lr_factor  # noqa: E402
from sasa.trainer.terms import KeptEnergy, energy_cross_share  # noqa: E402

STEPS = 1024
GATE_UNTIL = {"batch_ramp": 0.3, "batch_s1": 0.1}
NAMED = {"default": {}, "oracle": {"consolidate": "none"}, "batch_ramp": {}, "batch_s1": {},
         "rank": {}}


def rank_at(frac: float, rank: int) -> int:
    return 1 if frac < 0.1 else rank if frac >= 0.3 else 1 + int((rank - 1) * (frac - 0.1) / 0.2)


def energy_cov(x_BD: torch.Tensor, z_BGR: torch.Tensor, form: str) -> torch.Tensor:
    """Round 11, hypotheses 31-32: terms on the batch covariance C of the groups' code energies
    e_g = ||z_g||^2 / rms^2 (rms: the batch's, detached). Slices of one feature switch on
    together (C_gh > 0); groups holding whole independent features have C_gh = 0.

    - "cov": sum of the positive C_gh, g != h;
    - "var": sum_{g != h} C_gh / sum_{g, h} C_gh (the total's variance, detached), i.e.
      1 - sum_g Var(e_g) / Var(sum_g e_g): scale-free, negative C_gh lower it; the trainer's
      ``energy_cross_share``, which round 11 made the default (``energy_cov`` 0.03);
    - "varpos": the same with only the positive C_gh;
    - "lift": sum of the positive C_gh / (m_g m_h), m the mean energies (detached);
    - "balance" (32, a load-balancing term as mixture-of-experts routers use):
      G sum_g m_g^2 / (sum_g m_g)^2 - 1, zero when every group's mean energy is equal."""
    rms2 = (x_BD - x_BD.mean(0)).square().sum(1).mean().detach()
    e_BG = z_BGR.square().sum(-1) / rms2
    if form == "var":  # the trainer's term (SAEConfig.energy_cov, round 11's default)
        B, G = e_BG.shape
        return energy_cross_share(KeptEnergy(e_BG, e_BG != 0), B, G)
    m_G = e_BG.mean(0)
    if form == "balance":
        return m_G.numel() * m_G.square().sum() / m_G.sum().square().clamp_min(1e-12) - 1
    c_BG = e_BG - m_G
    cov_GG = c_BG.T @ c_BG / e_BG.shape[0]
    if form == "lift":
        m = m_G.detach().clamp_min(1e-6)
        cov_GG = cov_GG / (m[:, None] * m[None, :])
    cross = cov_GG.clamp_min(0).sum() - cov_GG.diagonal().clamp_min(0).sum()
    if form == "varpos":
        return cross / cov_GG.sum().detach().clamp_min(1e-12)
    return cross


def train_in_memory(shape_name: str, seed: int, over: dict, variant: str = "",
                    stop: int | None = None, trace: dict | None = None):
    """(sae, mean, scale): the SAE of ``over`` (SAEConfig overrides, plus the ``probe_*`` keys
    of the module docstring but ``probe_stop``) trained in memory for ``stop`` of the run's
    ``STEPS`` steps on the shape's 262,144 samples normalised by (mean, scale); ``variant``
    names the special runs of NAMED. ``trace`` gets "s1_fvu": the mean batch FVU over the
    second half of the s = 1 phase (steps 5-10% of the run)."""
    shape = SHAPES[shape_name]
    spec = shape_spec(shape_name, seed)
    x = torch.from_numpy(generate(spec, 1 << 18, seed=seed).x_ND)
    mean = x.mean(0)
    scale = float(((x - mean) ** 2).sum(1).mean().div(spec.d).sqrt())
    x_n = (x - mean) / scale
    over = dict(over)
    b_dec_init = over.pop("probe_b_dec", "mean")
    b_dec_frozen = over.pop("probe_b_dec_frozen", False)
    planted = over.pop("probe_oracle", False) or variant == "oracle"
    floor = over.pop("probe_floor", 0.0)
    if over.pop("probe_batch_gate", False):  # the trainer's SAEConfig.batch_gate_from
        over["batch_gate_from"] = over.pop("probe_batch_from", 0.0)
    init_seed = over.pop("probe_init_seed", seed)
    lr = over.pop("probe_lr", 3e-3)
    pulse = over.pop("probe_pulse", None)
    data_init = over.pop("probe_data_init", False)
    groups = round(over.pop("probe_groups", 1.0) * shape.groups)
    warmup = round(over.pop("probe_warmup", 0.1) * STEPS)
    ecov = over.pop("probe_ecov", 0.0)
    ecov_form = over.pop("probe_ecov_form", "cov")
    ecov_from = over.pop("probe_ecov_from", 0.0)
    ecov_until = over.pop("probe_ecov_until", 1.0)
    over = {"rank": shape.rank, "top_s": shape.top_s, **over}
    sae = SAE(SAEConfig(d_in=spec.d, groups=groups, **over), seed=init_seed)
    if data_init:
        sae.init_from_data(x_n[:16384], seed=init_seed)
    if b_dec_init == "median":  # the coordinate-wise median of 16384 training rows
        rows = torch.randperm(x_n.shape[0], generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            sae.b_dec_D.copy_(x_n[rows[:16384]].double().median(0).values.to(sae.b_dec_D.dtype))
    if floor:  # the gate drops kept groups whose code norm is below floor x the token's largest
        top_s_gate = sae.gate

        def floored_gate(h_BGR, top_s=None, gate=None):
            score_BG = h_BGR.detach().square().sum(-1)
            return (top_s_gate(h_BGR, top_s, gate)
                    & (score_BG >= floor ** 2 * score_BG.amax(1, True)))
        sae.gate = floored_gate
        sae.cfg.decode = "dense"  # the sparse path has its own gate
    if b_dec_init == "origin":  # the raw origin, where every planted feature is off
        with torch.no_grad():
            sae.b_dec_D.copy_((-mean / scale).to(sae.b_dec_D.dtype))
    if b_dec_frozen:
        sae.b_dec_D.requires_grad_(False)
    if planted:
        state = sae.state_dict()
        oracle_weights(state, generate(spec, 0).bases, shape.rank, seed)
        sae.load_state_dict(state)
    if pulse:  # s = s_start from pulse[0] (the caller's test), ramp over pulse[1]..pulse[2]
        pulse_cfg = dataclasses.replace(sae.cfg, s_ramp_from=pulse[1], s_ramp_to=pulse[2],
                                        s_ramp_tokens=None)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(STEPS, warmup, 0.2))
    gen = torch.Generator().manual_seed(seed)
    s1_fvu = []
    for step in range(STEPS if stop is None else stop):
        if variant in GATE_UNTIL:
            sae.cfg.gate = "batch" if step / STEPS < GATE_UNTIL[variant] else "token"
        idx = torch.randint(0, x_n.shape[0], (1024,), generator=gen)
        top_s, gl_scale, gate = schedule_at(sae.cfg, step, STEPS, 1024)
        if pulse and pulse[0] <= step / STEPS < pulse[2]:  # the s ramp again, over the pulse
            top_s = top_s_at(pulse_cfg, step, STEPS, 1024)
        out = sae(x_n[idx], gl_scale=gl_scale, top_s=top_s, gate=gate)
        loss = out.loss
        if ecov and gl_scale > 0 and ecov_from * STEPS <= step < ecov_until * STEPS:
            loss = loss + ecov * gl_scale * energy_cov(x_n[idx], out.codes_BGR, ecov_form)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        sae.post_step()
        after_step(sae, x_n[idx], opt, step, STEPS, StepSchedule(top_s, gl_scale, gate))
        if STEPS // 20 <= step < STEPS // 10:
            s1_fvu.append(float(out.fvu.detach()))
        if variant == "rank":
            k = rank_at(step / STEPS, shape.rank)
            with torch.no_grad():
                sae.W_enc_GRD[:, k:, :] = 0
                sae.b_enc_GR[:, k:] = 0
    if trace is not None:
        trace["s1_fvu"] = sum(s1_fvu) / max(1, len(s1_fvu))
    return sae, mean, scale


def probe(shape_name: str, seed: int, variant: str, over: dict) -> str:
    test, alone = held_out(shape_spec(shape_name, seed), seed)
    t0 = time.perf_counter()
    trace: dict = {}
    over = dict(over)
    stop = round(over.pop("probe_stop", 1.0) * STEPS)
    sae, mean, scale = train_in_memory(shape_name, seed, over, variant, stop, trace)
    sae.cfg.gate = "token"  # a batch-gated SAE gates by its threshold in eval mode
    if variant in GATE_UNTIL:  # round 3 scored these with the token gate
        sae.gate_threshold.zero_()
    sae.eval()
    sae.fold_normalisation(mean, scale)
    o, units, units_alone, packed, _ = score(sae, test, alone)
    # Copies: per 1-D feature, the groups whose subspace holds >= half of its direction's norm^2.
    dec_GDR = sae.decoder_GDR.detach().double()
    copies = max((int(((dec_GDR.transpose(1, 2) @ torch.from_numpy(b[:, 0])).square().sum(1)
                       >= 0.5).sum()) for b in test.bases if b.shape[1] == 1), default=0)
    if float(sae.gate_threshold) > 0:  # the threshold decides how many groups a row keeps
        variant += f" ({float((o.codes_BGR.abs().amax(-1) > 0).sum(1).float().mean()):.2f}/row)"
    return (f"| {shape_name} | {seed} | {variant} | {float(o.fvu):.4f} | "
            f"{' / '.join(f'{u:.2f}' for u in units_alone.values())} | "
            f"{' / '.join(f'{u:.2f}' for u in units.values())} | {packed} of {len(test.bases)} | "
            f"{copies} | {trace['s1_fvu']:.4f} | "
            f"{time.perf_counter() - t0:.0f} |")


def floors(shape_name: str, seed: int, taus=(0.0, 0.1, 0.2, 0.3, 0.4)) -> None:
    """The default trained once, scored with an evaluation-only floor on its gate (``--floors``)."""
    test, alone = held_out(shape_spec(shape_name, seed), seed)
    sae, mean, scale = train_in_memory(shape_name, seed, {})
    sae.eval()
    sae.fold_normalisation(mean, scale)
    sae.requires_grad_(False)  # scoring only
    print("| shape | seed | tau | held-out FVU | groups kept per row | units alone by d_i | groups "
          "kept per row alone | units in context by d_i |")
    print("|---|---|---|---|---|---|---|---|")
    for tau in taus:
        cells = []
        for data in (test, alone):
            x = torch.from_numpy(data.x_ND)
            h_BGR = sae.pre_codes(x)
            norm_BG = h_BGR.square().sum(-1).sqrt()
            keep_BG = sae.gate(h_BGR) & (norm_BG >= tau * norm_BG.max(1, keepdim=True).values)
            z_BGR = h_BGR * keep_BG.unsqueeze(-1)
            fvu = metrics.fvu(x, sae.decode(z_BGR))
            units = splitting(z_BGR, sae.decoder_GDR, data.active_NF, data.bases).units_by_dim
            cells.append((fvu, float(keep_BG.sum(1).float().mean()),
                          " / ".join(f"{u:.2f}" for u in units.values())))
        (fvu, l0, ctx), (_, l0_alone, units_alone) = cells
        print(f"| {shape_name} | {seed} | {tau} | {fvu:.4f} | {l0:.2f} | {units_alone} | "
              f"{l0_alone:.2f} | {ctx} |", flush=True)


def overflow(seeds=(0, 1, 2), rows: int = 20_000) -> None:
    """Round 12 (``--overflow``): per shape, the share of rows with more features on than s
    (``rows`` rows of each seed's data, mean over the seeds)."""
    print("| shape | s | rows with more features on than s |\n|---|---|---|")
    for name in CPU_SHAPES:
        shape = SHAPES[name]
        share = [float((generate(shape_spec(name, seed), rows, seed=seed).active_NF.sum(1)
                        > shape.top_s).mean()) for seed in seeds]
        print(f"| {name} | {shape.top_s} | {100 * sum(share) / len(share):.1f}% |")


def main() -> None:
    global STEPS
    torch.set_num_threads(1)
    if sys.argv[1] == "--steps":  # round 11: runs of another length (batch 1024 each)
        STEPS = int(sys.argv[2])
        del sys.argv[1:3]
    if sys.argv[1] == "--overflow":
        overflow()
        return
    if sys.argv[1] == "--floors":
        floors(sys.argv[2], int(sys.argv[3]))
        return
    shape_name, seed, variants = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    print("| shape | seed | variant | held-out FVU | units alone by d_i | units in context by d_i "
          "| packed | 1-D copies | FVU at s = 1 (steps 5-10%) | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    custom = parse_variants([v for v in variants if "=" in v])
    for variant in variants:
        name = variant.split("=", 1)[0]
        if name not in custom and name not in NAMED:
            raise SystemExit(f"unknown variant {name!r}: use one of {', '.join(NAMED)} or "
                             "NAME=JSON (SAEConfig overrides)")
        print(probe(shape_name, seed, name, custom.get(name, NAMED.get(name))), flush=True)


if __name__ == "__main__":
    main()
