"""Repro of the second pass's fault: `bsr._bsr_mm_kernel` with PREFETCH and quantized values (refused by `launch`).

    PYTHONPATH=src python benchmarks/bsr_qprefetch_repro.py [--sanitize] [--from CASE]

Launches the mm kernel directly (as `launch` would, PREFETCH=True) for int4 and int8 codes over x tiles of 16, 64
and 128 rows, one launch per process step, synchronizing after each, and prints the error against the fp32
reference or the CUDA error. Each case runs in a child process (an illegal address poisons the context).
"""

import subprocess
import sys

CASES = [  # bits, block_m, block_r, nblk, M, warps, block, group_size, dtype (32x32 fp16 g128 by default)
    (4, 16, 32, 4, 16, 4), (4, 64, 32, 2, 70, 4), (4, 64, 32, 4, 70, 8), (4, 128, 32, 2, 128, 8),
    (8, 64, 32, 2, 70, 4), (4, 64, 32, 2, 64, 4), (4, 64, 16, 2, 70, 4),
    # the second pass's check cases with int4 codes (call 2 faulted in that sweep)
    (4, 64, 32, 2, 200, 8, (64, 64), 128, "bfloat16"), (4, 64, 64, 1, 200, 8, (64, 64), 128, "bfloat16"),
    (4, 64, 32, 2, 200, 8, (64, 64), 16, "float16"), (4, 16, 32, 2, 33, 4, (64, 64), 16, "float16"),
    (4, 64, 32, 4, 200, 8, (64, 16), 128, "float16"), (4, 64, 32, 2, 70, 4, (32, 32), 128, "bfloat16"),
]


def one(i: int) -> None:
    import torch

    sys.path.insert(0, "benchmarks")
    from blocksparse_kernels import make
    from bitsmith.kernels import bsr

    bits, bm, br, nblk, M, warps, (R, C), g, dt = (CASES[i] + ((32, 32), 128, "float16"))[:9]
    dtype = getattr(torch, dt)
    gen = torch.Generator(device="cuda").manual_seed(i)
    params, t, _ = make(2048, 2048, (0.8, (R, C), bits, g), dtype, "cuda", gen)
    wd = bsr.dequantize(t, params, torch.float32)
    x = torch.randn(M, 2048, device="cuda", generator=gen).to(dtype)
    out = torch.full((M, 2048), float("nan"), device="cuda", dtype=dtype)
    ws, cnt = bsr._split_workspace(x.device, 0, 0)
    grid = (2048 // br, -(-M // bm), 1)
    bsr._bsr_mm_kernel[grid](
        x, t["crow_indices"], t["col_indices"], t["qvalues"], t["scales"], t["scales"], out, ws, cnt, M, 2048, g,
        x.stride(0), out.stride(0), 2048 // C, 1, bsr.MAGIC_F32, R=R, C=C, CW=bsr._cw(params), BLOCK_R=br,
        NBLK=nblk, BITS=bits, GB=C // g if bsr.block_scales(params) else 0, HAS_BIAS=False, FENCE=True, BLOCK_M=bm,
        USE_DOT=bsr._can_dot(params, bm, br, nblk), DOT_F32=False, PREFETCH=True, num_warps=warps, num_stages=1)
    torch.cuda.synchronize()
    ref = x.float() @ wd.t()
    err = ((out.float() - ref).norm() / ref.norm()).item()
    print(f"case {CASES[i]}: rel err {err:.2e}, NaN outputs {int(out.isnan().sum())}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        one(int(sys.argv[2]))
        sys.exit(0)
    san = "--sanitize" in sys.argv
    first = int(sys.argv[sys.argv.index("--from") + 1]) if "--from" in sys.argv else 0
    for i in range(first, len(CASES)):
        cmd = [sys.executable, __file__, "--one", str(i)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        print((r.stdout.strip() or f"case {CASES[i]}: rc {r.returncode}: " + r.stderr.strip()[-300:]), flush=True)
        if san and (r.returncode or "e-0" not in r.stdout or "e-01" in r.stdout or "e+" in r.stdout):
            r = subprocess.run(["compute-sanitizer", "--print-limit", "3"] + cmd, capture_output=True, text=True,
                               timeout=300)
            print("sanitizer:", (r.stdout + r.stderr)[-1500:], flush=True)
            san = False  # one sanitizer run is enough
