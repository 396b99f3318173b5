"""The GPU forms of the SASA linear algebra (trainer/linalg.py) pinned to the CPU's LAPACK
forms in float64: CholeskyQR2 against sign-fixed Householder QR, singular values through the
Gram matrix against ``svdvals`` (values and gradients), the Cholesky factor against QR's R.
They run on CPU tensors here; tests/test_cuda.py runs them where they are used, on a GPU."""

from __future__ import annotations

import pytest
import torch

from sasa.trainer.linalg import cholesky_factor_GRR, cholesky_qr, gram_svdvals_GR, signfix_qr


def blocks(G: int, D: int, R: int, seed: int = 0) -> torch.Tensor:
    """Random d x r blocks, some far from orthonormal (columns scaled 1e-3..1e2, then mixed)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(G, D, R, generator=g, dtype=torch.float64)
    scale = 10 ** torch.empty(G, 1, R, dtype=torch.float64).uniform_(-3, 2, generator=g)
    mix = torch.randn(G, R, R, generator=g, dtype=torch.float64)
    return (a * scale) @ mix


@pytest.mark.parametrize("R", [1, 2, 5])
def test_cholesky_qr_is_the_sign_fixed_householder_q(R):
    a = blocks(40, 24, R)
    q = cholesky_qr(a)
    torch.testing.assert_close(q, signfix_qr(a), rtol=1e-9, atol=1e-9)
    eye = torch.eye(R, dtype=a.dtype).expand(40, R, R)
    torch.testing.assert_close(q.mT @ q, eye, rtol=0, atol=1e-12)


def test_cholesky_qr_falls_back_where_a_block_is_rank_deficient():
    a = blocks(6, 16, 3)
    a[2, :, 1] = 0  # a zero column: no Cholesky factor
    a[4, :, 2] = a[4, :, 0]  # two equal columns
    q = cholesky_qr(a)
    assert q.isfinite().all()
    torch.testing.assert_close(q, signfix_qr(a), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("R", [2, 4])
def test_gram_singular_values_and_their_gradient_equal_svdvals(R):
    """Through the Gram matrix a singular value sigma is off by about eps64 sigma_max^2 /
    sigma: here (condition numbers up to 1e5) within 1e-9 of each block's largest, far inside
    float32's rounding, which the training runs in."""
    m = blocks(30, 20, R, seed=1).mT.contiguous().requires_grad_()
    w = torch.rand(30, R, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sv = gram_svdvals_GR(m)
    ref = torch.linalg.svdvals(m.mT)
    assert ((sv - ref).abs() <= 1e-9 * ref.amax(-1, keepdim=True)).all()
    (grad,) = torch.autograd.grad((w * sv).sum(), m)
    (grad_ref,) = torch.autograd.grad((w * ref).sum(), m)
    err = (grad - grad_ref).flatten(1).norm(dim=1) / grad_ref.flatten(1).norm(dim=1)
    assert float(err.max()) < 1e-6, err.max()
    small = torch.randn(3, R, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64,
                        requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: (w[:3] * gram_svdvals_GR(x)).sum(), (small,))


def test_gram_nuclear_norm_gradient_at_a_rank_deficient_block():
    """A zero singular value: a finite gradient, the nuclear norm's on the block's span."""
    m = blocks(4, 12, 3, seed=4).mT.contiguous()
    m[1, 2] = m[1, 0] + m[1, 1]  # rank 2 of 3
    m.requires_grad_()
    sv = gram_svdvals_GR(m)
    assert float(sv[1, -1].detach()) < 1e-6 * float(sv[1, 0].detach())
    (grad,) = torch.autograd.grad(sv.sum(), m)
    u, s, vh = torch.linalg.svd(m[1].detach(), full_matrices=False)
    torch.testing.assert_close(grad[1], u[:, :2] @ vh[:2], rtol=1e-6, atol=1e-6)


def test_cholesky_factor_gives_the_singular_values_of_qr_r():
    """On decoder-like blocks (orthonormal after every step; here perturbed by 10%)."""
    g = torch.Generator().manual_seed(5)
    d = signfix_qr(torch.randn(20, 16, 4, generator=g, dtype=torch.float64))
    d = d + 0.1 * torch.randn(20, 16, 4, generator=g, dtype=torch.float64)
    e = torch.randn(20, 4, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    chol, qr = cholesky_factor_GRR(d), torch.linalg.qr(d).R  # the GPU's form, the CPU's
    torch.testing.assert_close(chol.mT @ chol, d.mT @ d, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.linalg.svdvals(chol @ e), torch.linalg.svdvals(qr @ e),
                               rtol=1e-9, atol=1e-9)
