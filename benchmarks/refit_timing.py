"""Exact vs conjugate-gradient refit (`bitsmith.prune.scores`): seconds and relative output error on synthetic
correlated inputs, for the SmolLM2 Linear shapes with 1x16 blocks at 50% (one CPU thread).

    python benchmarks/refit_timing.py [--block 1x16] [--iters 25] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block", default="1x16")
    ap.add_argument("--iters", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from bitsmith.prune import scores as S

    block = tuple(int(v) for v in args.block.split("x"))
    torch.manual_seed(0)
    for N, K in ((1536, 576), (576, 576)):
        X = torch.randn(4096, K) @ (torch.randn(K, K) * 0.1 + torch.eye(K))  # correlated inputs [tokens, K]
        G = X.t() @ X
        w = torch.randn(N, K)
        nb = (N // block[0]) * (K // block[1])
        keep = S.keep_lowest_pruned(torch.rand(N // block[0], K // block[1]), nb // 2)
        t = time.time()
        a = S.refit_rows(w, keep, block, G, 0.01, 0)
        ta = time.time() - t
        t = time.time()
        b = S.refit_cg(w, S.expand(keep, block), G, 0.01, args.iters)
        tb = time.time() - t
        print(f"{N}x{K} {args.block}: exact {ta:.1f} s ({S.exact_flops(keep, block, K) / 1e9:.1f} GFLOP), error"
              f" {S.output_error(a, w, G):.5f}; CG {args.iters} steps {tb:.1f} s"
              f" ({args.iters * 2 * N * K * K / 1e9:.1f} GFLOP), error {S.output_error(b, w, G):.5f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
