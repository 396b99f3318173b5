"""SAE paths the training loop takes beyond the plain forward: bf16 autocast (the GPU path; CUDA
is not here, but CPU autocast takes the same code: QR, SVD, top-k, sparse decode) and the
amortised rank penalty (``nuc_scale``)."""

from __future__ import annotations

import pytest
import torch

from sasa.trainer import SAE, SAEConfig


KWS = [dict(arch="sasa", groups=8, rank=4, top_s=2, nuc_lambda=1e-3),
       dict(arch="sasa", groups=8, rank=4, top_s=2, gate="batch", nuc_lambda=1e-3),
       dict(arch="topk", groups=32, top_s=4, dead_tokens=1),
       dict(arch="relu", groups=32)]
CASES = [(kw, dec) for kw in KWS for dec in (("dense",) if kw["arch"] == "relu" else ("dense", "sparse"))]


@pytest.mark.parametrize(("kw", "decode"), CASES)
def test_bf16_autocast_forward_backward_close_to_fp32(kw, decode):
    torch.manual_seed(0)
    x = torch.randn(128, 32)
    ref = SAE(SAEConfig(d_in=32, decode=decode, **kw), seed=0)
    amp = SAE(SAEConfig(d_in=32, decode=decode, **kw), seed=0)
    ref.train(), amp.train()
    out_ref = ref(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_amp = amp(x)
    out_amp.loss.backward()
    assert torch.isfinite(out_amp.loss) and all(torch.isfinite(p.grad).all() for p in amp.parameters())
    assert out_amp.fvu.detach().item() == pytest.approx(out_ref.fvu.detach().item(), rel=0.05, abs=0.01)
    if kw.get("gate") == "batch":  # the threshold stays fp32 and gates the eval-mode pass
        assert amp.gate_threshold.dtype == torch.float32
        assert float(amp.gate_threshold) == pytest.approx(float(ref.gate_threshold), rel=0.05)
        ref.eval(), amp.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            ev_amp = amp(x)
        ev_ref = ref(x)
        assert ev_amp.fvu.item() == pytest.approx(ev_ref.fvu.item(), rel=0.05, abs=0.01)
        assert ev_amp.l0_groups.item() == pytest.approx(ev_ref.l0_groups.item(), rel=0.1)
    amp.post_step()  # the constraint step runs in fp32 on bf16-autocast weights too
    if kw["arch"] == "sasa":
        d = amp.decoder_GDR
        eye = torch.eye(4).expand(8, 4, 4)
        assert torch.allclose(d.transpose(1, 2) @ d, eye, atol=1e-5)


def test_nuc_scale_weights_the_rank_penalty_and_zero_skips_it():
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    sae = SAE(SAEConfig(d_in=32, groups=8, rank=4, top_s=2, nuc_lambda=1e-2), seed=0)
    plain = SAE(SAEConfig(d_in=32, groups=8, rank=4, top_s=2), seed=0)
    once, four, none = sae(x), sae(x, nuc_scale=4.0), sae(x, nuc_scale=0.0)
    ref = 1e-2 * torch.linalg.svdvals(sae.decoder_GDR @ sae.W_enc_GRD).sum()
    assert torch.allclose(once.nuc_term, ref, rtol=1e-5) and torch.allclose(four.nuc_term, 4 * ref, rtol=1e-5)
    assert float(none.nuc_term) == 0.0 and torch.equal(none.loss, plain(x).loss)
