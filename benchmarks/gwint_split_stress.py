"""Stress test of the gwint split-K epilogue on the GPU: every split-K launch candidate, many launches on fresh inputs.

    PYTHONPATH=src python benchmarks/gwint_split_stress.py [--reps 30] [--shapes 8192x8192,4096x4096]

A split-K launch adds partial tiles into an fp32 workspace and the last split to arrive writes the sum; a missing
memory ordering shows up as a tile read before every split's add landed, i.e. a large error in a few output tiles
of some launches. Each launch is compared with the fp32 dequantized reference, by the worst output tile (max |error|
over max |reference|), on fresh random activations every time. Prints one line per (format, shape, M, config) and
the total number of failed launches.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--shapes", default="8192x8192,4096x4096")
    ap.add_argument("--ms", default="1,16,64,128")
    args = ap.parse_args(argv)
    from bitsmith.kernels import gwint
    from bitsmith.kernels import gwint_triton as gt

    gen = torch.Generator(device="cuda").manual_seed(7)
    sms = gt._num_sms(torch.device("cuda"))
    failures = launches = 0
    t0 = time.time()
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.split("x"))
        for bits, gs in ((4, 128), (8, 128)):
            codes = torch.randint(0, 1 << bits, (N, K), dtype=torch.uint8, device="cuda", generator=gen)
            qw = gwint.pack_codes(codes, bits)
            s = ((torch.rand(K // gs, N, device="cuda", generator=gen) + 0.5) / ((1 << (bits - 1)) * K ** 0.5)).half()
            wf = gwint.dequantize(qw, s, None, bits, gs, K, dtype=torch.float32)
            for M in (int(m) for m in args.ms.split(",")):
                plans = [("gemm", c) for c in gt.gemm_t_configs(M, N, K, bits, gs, sms)]
                if M == 1:
                    plans = [("gemv", c) for c in gt.gemv_configs(N, K, bits, gs, sms)] + [("gemv", c) for _, c in plans]
                else:
                    plans += [("gemm", c) for c in gt.gemm_configs(M, N, K, bits, gs, sms)]
                plans = [(r, c) for r, c in plans if c.get("split_k", 1) > 1]
                for regime, cfg in plans:
                    bad = 0
                    worst = 0.0
                    for _ in range(args.reps):
                        x = torch.randn(M, K, device="cuda", generator=gen).half()
                        out = gt.linear(x, qw, s, None, bits, gs, K, config=cfg, regime=regime).float()
                        ref = x.float() @ wf.t()
                        err = float((out - ref).abs().max() / ref.abs().max()) if torch.isfinite(out).all() else 9.9
                        worst = max(worst, err)
                        bad += err > 2e-2
                    launches += args.reps
                    failures += bad
                    print(f"w{bits}g{gs} {N}x{K} M={M} {regime} {cfg}: {bad}/{args.reps} bad, worst {worst:.1e}"
                          f" ({time.time() - t0:.0f}s)", flush=True)
    print(f"split-K stress: {failures} failed of {launches} launches ({time.time() - t0:.0f}s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
