"""Singular values of G blocks of r x d: the wide [G, r, d] form against its tall [G, d, r]
transpose (same values), forward + backward, as the rank penalty runs them (trainer/linalg.py).
On a GPU (``--device cuda``): the LAPACK-style forms (sign-fixed Householder QR, ``svdvals``
of the tall blocks) against the Gram-matrix forms the trainer uses there (``cholesky_qr``,
``gram_svdvals_GR``), at a GPU's sizes; the slow form is timed once.

    python bench/svd_layout.py            # d = 384, G = 384, r = 4 and 8, one thread
    python bench/svd_layout.py --device cuda --d 768 --coords 24576 --ranks 2 8
"""

from __future__ import annotations

import argparse
import time

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sasa.trainer.linalg import cholesky_qr, gram_svdvals_GR, signfix_qr  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--groups", type=int, default=384)
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--coords", type=int, default=24576, help="G * r (--device cuda)")
    args = p.parse_args()
    if args.device != "cpu":
        return gpu_table(args)
    torch.set_num_threads(args.threads)
    print(f"| r | wide [G, r, d] ms | tall [G, d, r] ms | wide / tall |  (d = {args.d}, G = {args.groups}, "
          f"{args.threads} thread(s), median of {args.repeats}, forward + backward)")
    print("|---|---|---|---|")
    for r in args.ranks:
        E = torch.randn(args.groups, r, args.d, requires_grad=True)
        wide = median_ms(lambda: torch.linalg.svdvals(E).sum().backward(), args.repeats)
        tall = median_ms(lambda: torch.linalg.svdvals(E.transpose(1, 2)).sum().backward(), args.repeats)
        print(f"| {r} | {wide:.1f} | {tall:.1f} | x{wide / tall:.2f} |")


def gpu_table(args) -> None:
    def timed(fn, repeats, warm=True):
        if warm:
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return 1e3 * sorted(times)[len(times) // 2]

    print(f"| r | G | QR: Householder ms | CholeskyQR2 ms | ratio | svdvals fwd+bwd: tall ms | "
          f"Gram ms | ratio |  (d = {args.d}, {torch.cuda.get_device_name()}, fp32 inputs)")
    print("|---|---|---|---|---|---|---|---|")
    for r in args.ranks:
        G = args.coords // r
        a = torch.randn(G, args.d, r, device=args.device)
        m = torch.randn(G, r, args.d, device=args.device, requires_grad=True)
        signfix_qr(a[:2])  # cuSOLVER's handle and kernels loaded, then one timed call
        torch.linalg.svdvals(m[:2].transpose(1, 2)).sum().backward()
        qr_old = timed(lambda: signfix_qr(a), 1, warm=False)
        qr_new = timed(lambda: cholesky_qr(a), args.repeats)
        sv_old = timed(lambda: torch.linalg.svdvals(m.transpose(1, 2)).sum().backward(), 1,
                       warm=False)
        sv_new = timed(lambda: gram_svdvals_GR(m).sum().backward(), args.repeats)
        print(f"| {r} | {G} | {qr_old:.1f} | {qr_new:.2f} | x{qr_old / qr_new:.3g} | "
              f"{sv_old:.1f} | {sv_new:.2f} | x{sv_old / sv_new:.3g} |", flush=True)


if __name__ == "__main__":
    main()
