"""The CUDA paths pinned to the CPU: the SAE's float64 numerics on the GPU (the sync-free AuxK
pick, both decode paths, the Gram-matrix singular values and CholeskyQR2), the trainer's GPU
read path (pinned host batches, non-blocking copies), the consolidation steps and the
splitting analysis. Skipped without a CUDA device; `python -m pytest -m gpu` runs them where
one exists."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sae_helpers import make_sae, rand_x
from safetensors.torch import load_file
from sasa.analysis.synth import write_synthetic_cache
from sasa.analysis.synthetic import SyntheticSpec
from sasa.trainer import MemberConfig, TrainConfig, train
from test_devices import every_step_run
from test_sae_sparse import SPARSE_CASES

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("decode", ["dense", "sparse"])
@pytest.mark.parametrize("kw", SPARSE_CASES)
def test_sae_float64_on_cuda_equals_cpu(kw, decode):
    """Outputs, loss, gradients and dead-unit bookkeeping of one training forward, with 4 of
    12 groups dead so AuxK runs (its pick is sync-free on a GPU, a gather on the CPU)."""
    saes = {}
    for device in ("cpu", "cuda"):
        sae = make_sae(dtype=torch.float64, decode=decode, nuc_lambda=0.1, auxk_k=4,
                       dead_tokens=50, **kw).to(device)
        sae.train()
        sae.tokens_since_fired_G.copy_(torch.tensor([60 if g in (1, 4, 5, 9) else 0
                                                     for g in range(12)]))
        out = sae(rand_x(n=40, dtype=torch.float64).to(device))
        out.loss.backward()
        saes[device] = (sae, out)
    (cpu, a), (gpu, b) = saes["cpu"], saes["cuda"]
    assert float(a.auxk_loss.detach()) > 0
    for field in a._fields:
        va, vb = getattr(a, field), getattr(b, field).cpu()
        if va.dtype == torch.bool:
            assert torch.equal(va, vb), field
        else:
            torch.testing.assert_close(vb, va, rtol=1e-10, atol=1e-12, msg=field)
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-10, atol=1e-12, msg=name)
    assert torch.equal(cpu.tokens_since_fired_G, gpu.tokens_since_fired_G.cpu())
    with torch.no_grad():  # a step away from the constraint, then restore it (CholeskyQR2)
        for sae in (cpu, gpu):
            sae.W_dec_GRD.add_(0.05 * sae.W_dec_GRD.grad)
            sae.post_step()
    torch.testing.assert_close(gpu.W_dec_GRD.cpu(), cpu.W_dec_GRD, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_training_on_cuda_follows_cpu(tmp_path, autocast):
    """The same run (batches, init, steps) on the GPU and on the CPU: in fp32 the weights agree
    to float32 rounding after 16 steps (a batch read wrong, out of order or while a copy is in
    flight would move them by far more); under the default bf16 autocast the loss stays
    within bf16's reach of the CPU's."""
    url = str(tmp_path / "cache")
    spec = SyntheticSpec(d=64, features_per_dim={1: 8, 2: 8, 3: 8}, mean_active=3.0)
    write_synthetic_cache(url, spec=spec, n_tokens=1 << 14, ctx_len=64, shard_seqs=64,
                          progress=False)
    members = [MemberConfig("synthetic", {"arch": "sasa", "groups": 32, "rank": 3, "top_s": 4}),
               MemberConfig("synthetic", {"arch": "topk", "groups": 96, "top_s": 12})]
    runs = {}
    for device in ("cpu", "cuda"):
        cfg = TrainConfig(cache=url, members=members, tokens=16 * 512, batch_size=512,
                          log_every=16, checkpoint_every=0, shuffle_rows=4096, device=device,
                          autocast=autocast)
        runs[device] = train(cfg, tmp_path / device, progress=False)
    cpu, gpu = runs["cpu"], runs["cuda"]
    assert cpu.saes.keys() == gpu.saes.keys() and cpu.steps == gpu.steps == 16
    for name in cpu.saes:
        la, lb = cpu.final[name]["loss"], gpu.final[name]["loss"]
        assert abs(lb - la) <= (2e-2 if autocast else 1e-4) * la, (name, la, lb)
        if autocast:
            continue
        wa, wb = load_file(str(cpu.saes[name] / "sae.safetensors")), \
            load_file(str(gpu.saes[name] / "sae.safetensors"))
        assert wa.keys() == wb.keys()
        for key, value in wa.items():
            if not value.is_floating_point():  # bookkeeping: the same units fired
                assert torch.equal(wb[key], value), (name, key)
                continue
            rel = float((wb[key] - value).norm() / value.norm().clamp_min(1e-12))
            assert rel < 1e-3, (name, key, rel)


def test_splitting_on_cuda_equals_cpu():
    """The splitting analysis's float64 linear algebra gives the same coefficients and units on
    the GPU as on the CPU (bench/consolidation.py scores shape G there)."""
    from sasa.analysis.splitting import splitting, unit_coefficients
    from sasa.analysis.synthetic import generate

    batch = generate(SyntheticSpec(d=24, features_per_dim={1: 3, 2: 3, 3: 2}, mean_active=3.0),
                     300, seed=0)
    g = torch.Generator().manual_seed(0)
    codes_NGR = torch.randn(300, 10, 3, generator=g, dtype=torch.float64)
    codes_NGR[torch.rand(300, 10, generator=g) < 0.6] = 0
    dec_GDR = torch.randn(10, 24, 3, generator=g, dtype=torch.float64)
    args = (codes_NGR, dec_GDR, batch.active_NF, batch.bases)
    for projection in ("oblique", "orthogonal"):
        a = unit_coefficients(*args[:2], batch.bases, batch.active_NF, projection=projection)
        b = unit_coefficients(*args[:2], batch.bases, batch.active_NF, projection=projection,
                              device="cuda")
        assert isinstance(b, np.ndarray) and np.abs(a).max() > 0
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12)
        ua = splitting(*args, projection=projection, chunk=64).units_F
        ub = splitting(*args, projection=projection, chunk=64, device="cuda").units_F
        np.testing.assert_array_equal(np.isnan(ua), np.isnan(ub))
        np.testing.assert_allclose(ub, ua, rtol=1e-9)


def test_consolidation_steps_run_on_cuda(tmp_path):
    """Revive, unpack and gather act in a run on the GPU (each made a tensor on the CPU before
    the first GPU run; tests/test_devices.py checks the same without a GPU)."""
    lines = every_step_run(tmp_path, "cuda")
    assert all(np.isfinite(ln["loss"]) for ln in lines)
    assert sum(ln["gathered"] for ln in lines) > 0, lines[-1]
