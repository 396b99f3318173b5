"""In-memory probes behind bench/SPLITTING.md's consolidation section (issue 9).

One planted shape (SHAPES: data spec, r, G, s), 200k training samples, batch 1024, Adam, 10%
warm-up, 20% linear decay, one thread; FVU and units per feature (analysis/splitting.py) on
3000 held-out samples. Each VARIANT is name:lr:lambda:s0:from:to:merge_every:p, where lambda is
the group-sparsity weight (0 = off), s0 the s ramp's start (0 = no ramp) from/to fractions,
merge_every the merge step (0 = off), p the penalty's power; "oracle" starts at the planted
subspaces (a name starting with "oracle" plus options: planted start with that procedure), "topk" is TopK at k = s*r. DIAG=1 prints, per 3-D+ feature, the four groups whose
decoders overlap its subspace most (sum of squared cosines).

    python bench/consolidation_probes.py SHAPE STEPS SEED VARIANT...
    python bench/consolidation_probes.py A 600 0 plain:3e-3 gl:3e-3:0.1:1:0.3:0.6:0:0.5
"""
import sys, time, numpy as np, torch
torch.set_num_threads(1)
from sasa.analysis.synthetic import SyntheticSpec, generate
from sasa.analysis.splitting import splitting
from sasa.trainer import SAE, SAEConfig
from sasa.trainer.schedule import lr_factor
from sasa.trainer.consolidate import group_lasso_scale, merge_due, merge_and_reseed
SHAPES = {
 'A': (SyntheticSpec(d=48, features_per_dim={1:4,2:4,3:4,4:3}, subspaces='disjoint', coords='gaussian', mean_active=4, seed=1), 4, 40, 6),
 'B': (SyntheticSpec(d=32, features_per_dim={1:4,2:4,3:3,4:2}, mean_active=2.5, seed=2), 4, 32, 4),
 'C': (SyntheticSpec(d=64, features_per_dim={1:3,2:3,3:2,4:2,5:2,6:2}, coords='gaussian', mean_active=5, seed=3), 6, 36, 7),
 'T': (SyntheticSpec(d=32, features_per_dim={1:2,2:2,3:2,4:2}, mean_active=2, subspaces='disjoint', seed=3), 4, 12, 3),
 'T2': (SyntheticSpec(d=32, features_per_dim={1:2,2:2,3:2,4:2}, mean_active=3, subspaces='disjoint', coords='gaussian', seed=3), 4, 20, 5),
 'C2': (SyntheticSpec(d=64, features_per_dim={1:3,2:3,3:2,4:2,5:2,6:2}, mean_active=4, seed=3), 6, 24, 6),
}
import os; DIAG=bool(os.environ.get('DIAG'))
shape=sys.argv[1]; steps=int(sys.argv[2]); seed=int(sys.argv[3])
spec, R, G, S = SHAPES[shape]
tr, te = generate(spec, 200_000, seed=1+seed*10), generate(spec, 3000, seed=2+seed*10)
D=spec.d
x = torch.from_numpy(tr.x_ND); mean = x.mean(0); sc = float(((x-mean)**2).sum(1).mean().div(D).sqrt()); xn=(x-mean)/sc
def run(name, cfg, lr, oracle=False, s0=None, ramp=(0.0,0.0)):
    sae=SAE(SAEConfig(**cfg), seed=seed)
    if oracle:
        with torch.no_grad():
            for f,b in enumerate(te.bases):
                w=torch.randn(D,cfg['rank'],dtype=torch.float64)*0.01; w[:, :b.shape[1]]=torch.from_numpy(b)
                sae.W_dec_GRD[f]=torch.linalg.qr(w)[0].T.float(); sae.W_enc_GRD[f]=sae.W_dec_GRD[f]
    t=time.time(); nm=[0]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(steps, steps//10, 0.2))
    s_final=cfg['top_s']
    for step in range(steps):
        f=step/steps
        s=None
        if s0 is not None:
            a,b=ramp
            s = s0 if f<a else (s_final if f>=b else int(round(s0+(s_final-s0)*(f-a)/(b-a))))
        idx = torch.randint(0, xn.shape[0], (1024,), generator=gen)
        out = sae(xn[idx], gl_scale=group_lasso_scale(sae.cfg, step, steps, 1024),
                  top_s=s)
        opt.zero_grad(); out.loss.backward(); opt.step(); sched.step(); sae.post_step()
        if merge_due(sae.cfg, step, steps):
            rep = merge_and_reseed(sae, xn[idx], opt, top_s=s); nm[0]+=len(rep.merged)
    sae.eval()
    sae.fold_normalisation(mean, sc)
    with torch.no_grad(): o=sae(torch.from_numpy(te.x_ND))
    r=splitting(o.codes_BGR, sae.decoder_GDR, te.active_NF, te.bases)
    if DIAG:
        Dg=sae.decoder_GDR.detach().double()
        for f,b in enumerate(te.bases):
            if b.shape[1]<3: continue
            ov=(torch.from_numpy(b).T@Dg).square().sum((1,2)).numpy()  # overlap dims per group
            top=np.argsort(-ov)[:4]
            print('  f',f,'d',b.shape[1],' '.join(f'g{g}:{ov[g]:.2f}' for g in top))
    print(f"{shape}{seed} {name:14s} {v:28s} fvu {float(o.fvu):.4f} units {' / '.join(f'{v:.2f}' for v in r.units_by_dim.values())} {time.time()-t:.0f}s merges {nm[0]}", flush=True)
base=dict(arch='sasa', d_in=D, groups=G, rank=R, top_s=S, consolidate='none')
for v in sys.argv[4:]:
    name, lr, lam, s0, a, b, me, pw = (v.split(':')+['0']*8)[:8]; me=int(me); pw=float(pw) or 1.0
    lr=float(lr); lam=float(lam); s0=int(s0) or None; a=float(a); b=float(b)
    if name=='topk': run(f'topk lr{lr}', dict(arch='topk', d_in=D, groups=G*R, top_s=S*R), lr)
    elif name=='oracle': run(f'oracle lr{lr}', base, lr, oracle=True)
    else: run(f'{name} lr{lr} gl{lam} s0={s0} {a}-{b}', {**base, 'group_lasso':lam, 'merge_every':me, 'group_lasso_power':pw, 'consolidate':'anneal' if (lam>0 or me>0) else 'none'}, lr, s0=s0, ramp=(a,b), oracle=name.startswith('oracle'))
