"""Short H100 call for the bit-plane M = 1 / 16 kernel variants: each pinned configuration timed the way the harness
times (`bitsmith.kernels.bench.graph_time_us`: CUDA graph over rotated weight sets > 3x L2, median replay) against
fp16 cuBLAS in the same process, each checked against the fp32 dequantized reference; then the PTX of both
tensor-core kernels on awkward shapes for bits 1..8 (no twins: their GPU compiles are too slow for one call).

    PYTHONPATH=src python3 benchmarks/bitplane_mma_bench.py --out $OUT [--workers 15]

Weights are synthetic (random planes and scales of the real shapes, g = 128, fp16 activations). Writes rows.json
after every row (a call cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bitplane_kernels import call, make, nbytes, reference, rel  # noqa: E402

SHAPES = [(8192, 8192), (28672, 8192)]
H2 = dict(kernel="h2", block_n=1024, block_kw=1, num_warps=4, unroll=4)  # + chunk per width
M1 = [("h2", dict(H2)), ("h2 pf", dict(H2, prefetch=1)),
      ("mma u2 pf", dict(kernel="mma", num_warps=4, unroll=2, merge=1, prefetch=1)),
      ("mma_k u2 pf", dict(kernel="mma_k", num_warps=4, unroll=2, merge=1, prefetch=1))]
M16 = [("mma_k 4x2 pf", dict(kernel="mma_k", num_warps=4, unroll=2, merge=1, prefetch=1)),
       ("mma_k 4x4 pf", dict(kernel="mma_k", num_warps=4, unroll=4, merge=1, prefetch=1)),
       ("mma_k 4x2", dict(kernel="mma_k", num_warps=4, unroll=2, merge=1)),
       ("swapped (run 2's choice)", dict(kernel="swapped", block_m=16, block_n=64, block_kw=16, num_warps=4,
                                         num_stages=2, join=0, xperm=1, group_m=8, split_k=4, mode=1))]
CHECK = [(1000, 576, 128), (36, 1024, 1024)]


def plans():
    out = []
    for bits in (2, 3, 4):
        for name, cfg in M1:
            if cfg["kernel"] == "h2":
                cfg = dict(cfg, chunk={2: 8, 3: 4, 4: 2}[bits])
            out.append(("time", bits, 1, name, cfg))
        if bits in (2, 3):
            for name, cfg in M16:
                out.append(("time", bits, 16, name, cfg))
    for bits in range(1, 9):
        out.append(("check", bits, 1, "mma", dict(kernel="mma", num_warps=4, unroll=2, merge=1, prefetch=1)))
        out.append(("check", bits, 16, "mma_k", dict(kernel="mma_k", num_warps=4, unroll=2, merge=1, prefetch=1)))
    return out


def _compile(plan):
    """Compile one plan's kernel (same specialisation as its timed or checked use) in a worker process."""
    what, bits, M, name, cfg = plan
    try:
        gen = torch.Generator(device="cuda").manual_seed(0)
        shapes = SHAPES[:1] if what == "time" else [(n, k) for n, k, _ in CHECK]
        for (N, K), gs in zip(shapes, [128] if what == "time" else [g for _, _, g in CHECK]):
            w = make("bipolar", N, K, bits, torch.float16, gen, gs=gs)
            # the check adds a bias on odd widths: a separate specialisation, compiled here too
            bias = torch.randn(N, device="cuda", generator=gen).half() if what == "check" and bits % 2 else None
            for m in ((M,) if what == "time" else ((1,) if M == 1 else (1, 3, 16))):
                x = torch.randn(m, K, device="cuda", dtype=torch.float16, generator=gen)
                call(x, w, bias=bias, config=cfg, regime="gemv" if m == 1 else "gemm")
        torch.cuda.synchronize()
        return None
    except Exception as e:  # reported, the main process skips it
        return f"{name} b{bits} M{M}: {type(e).__name__}: {str(e)[:300]}"


def main():
    from bitsmith.kernels import bench as hb

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/bitplane-mma")
    ap.add_argument("--workers", type=int, default=15)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows, t0 = [], time.time()

    def log(msg):
        print(f"[{time.time() - t0:5.0f} s] {msg}", flush=True)

    def save():
        with open(os.path.join(args.out, "rows.json"), "w") as f:
            json.dump(rows, f, indent=1, default=str)

    ps = plans()
    with mp.get_context("spawn").Pool(args.workers) as pool:
        errs = pool.map(_compile, ps, chunksize=1)
    bad = {i for i, e in enumerate(errs) if e}
    for i in bad:
        log(f"COMPILE/RUN FAILED {errs[i]}")
    log(f"compiled {len(ps) - len(bad)} of {len(ps)} plans")
    failures = len(bad)
    gen = torch.Generator(device="cuda").manual_seed(1)
    # correctness of the PTX on awkward shapes (bias on odd bits)
    for i, (what, bits, M, name, cfg) in enumerate(ps):
        if what != "check" or i in bad:
            continue
        for N, K, gs in CHECK:
            w = make("bipolar", N, K, bits, torch.float16, gen, gs=gs)
            bias = torch.randn(N, device="cuda", generator=gen).half() if bits % 2 else None
            for m in ((1,) if M == 1 else (1, 3, 16)):
                x = torch.randn(m, K, device="cuda", dtype=torch.float16, generator=gen)
                e = rel(call(x, w, bias=bias, config=cfg, regime="gemv" if m == 1 else "gemm"),
                        reference(x, w, bias))
                ok = e < 3e-3
                failures += not ok
                rows.append(dict(kind="check", kernel=name, bits=bits, N=N, K=K, g=gs, M=m, rel_err=e, ok=ok))
                if not ok:
                    log(f"FAIL {name} b{bits} N{N} K{K} g{gs} M{m}: {e:.2e}")
    from bitsmith.kernels import gwint_triton

    for ws, cnt in gwint_triton._WORKSPACES.values():
        if ws.any() or cnt.any():
            failures += 1
            log("FAIL split-K workspace not left zeroed")
    log(f"check: {sum(r['kind'] == 'check' for r in rows)} runs, {failures} failures")
    save()
    bw = hb.copy_bandwidth_gbs()
    rows.append(dict(kind="d2d-copy", GBs=bw))
    log(f"copy bandwidth {bw:.0f} GB/s")
    for N, K in SHAPES:
        base = hb.cublas_baseline(N, K, (1, 16), torch.float16, gen, rows, log)
        for i, (what, bits, M, name, cfg) in enumerate(ps):
            if what != "time" or i in bad:
                continue
            try:
                w0 = make("bipolar", N, K, bits, torch.float16, gen)
                R = hb.rotations(nbytes(w0))
                ws = [w0] + [make("bipolar", N, K, bits, torch.float16, gen) for _ in range(R - 1)]
                xs = [torch.randn(M, K, device="cuda", dtype=torch.float16, generator=gen) for _ in range(R)]
                xc = torch.randn(M, K, device="cuda", dtype=torch.float16, generator=gen)
                regime = "gemv" if M == 1 else "gemm"
                err = rel(call(xc, w0, config=cfg, regime=regime), reference(xc, w0))
                us = hb.graph_time_us([lambda x=x, w=w: call(x, w, config=cfg, regime=regime) for x, w in zip(xs, ws)])
                nb = nbytes(w0) + 2 * M * (K + N)
                rows.append(dict(kind="time", kernel=name, config=cfg, N=N, K=K, M=M, bits=bits, us=us,
                                 speedup=base[M] / us, GBs=nb / us / 1e3, rel_err=err))
                log(f"{N}x{K} M={M} b{bits} {name}: {us:.1f} us ({base[M] / us:.2f}x cuBLAS, {nb / us / 1e3:.0f} GB/s)"
                    f" err {err:.1e}")
                del ws, xs
            except Exception as e:
                log(f"{N}x{K} M={M} b{bits} {name}: FAILED {type(e).__name__}: {str(e)[:200]}")
            save()
            torch.cuda.empty_cache()
    save()
    log(f"done, check failures {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
