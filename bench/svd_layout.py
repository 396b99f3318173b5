"""Singular values of G blocks of r x d: the wide [G, r, d] form against its tall [G, d, r]
transpose (same values), forward + backward, as the rank penalty runs them (trainer/linalg.py).

    python bench/svd_layout.py            # d = 384, G = 384, r = 4 and 8, one thread
"""

from __future__ import annotations

import argparse
import time

import torch


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
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"| r | wide [G, r, d] ms | tall [G, d, r] ms | wide / tall |  (d = {args.d}, G = {args.groups}, "
          f"{args.threads} thread(s), median of {args.repeats}, forward + backward)")
    print("|---|---|---|---|")
    for r in args.ranks:
        E = torch.randn(args.groups, r, args.d, requires_grad=True)
        wide = median_ms(lambda: torch.linalg.svdvals(E).sum().backward(), args.repeats)
        tall = median_ms(lambda: torch.linalg.svdvals(E.transpose(1, 2)).sum().backward(), args.repeats)
        print(f"| {r} | {wide:.1f} | {tall:.1f} | x{wide / tall:.2f} |")


if __name__ == "__main__":
    main()
