"""One deep-GEMV launch per (shape, bits, config) for Nsight Compute (stall reasons, issue and memory rates).

    ncu -k regex:_gemv_deep_h2_kernel --launch-skip 2 --launch-count 1 --section SpeedOfLight \
        --section WarpStateStats --section SchedulerStats --section Occupancy \
        python3 benchmarks/bitplane_deep_ncu.py 28672 8192 2 32 32 4

Arguments: N K bits block_n rows warps. Synthetic weights (random planes and scales, g = 128), fp16 x. Each
configuration is launched 3 times (the first compiles); launch 3 is the profiled one with --launch-skip 2.
"""

import sys

import torch

from bitsmith.kernels import bitplane as bp


def main():
    N, K, bits, bn, rows, warps = (int(a) for a in sys.argv[1:7])
    gen = torch.Generator(device="cuda").manual_seed(0)
    KW = bp.num_words(K)
    planes = torch.randint(-2**31, 2**31 - 1, (bits, KW, N), dtype=torch.int32, device="cuda", generator=gen)
    scales = ((torch.rand(bp.num_groups(K, 128), N, device="cuda", generator=gen) + 0.5) * 1e-3).half()
    x = torch.randn(1, K, device="cuda", dtype=torch.float16, generator=gen)
    out = torch.empty(1, N, device="cuda", dtype=torch.float16)
    cfg = dict(kernel="deep", block_n=bn, rows=rows, num_warps=warps, depth=1, split_k=1, merge=1,
               chunk=bp.h2_chunk(bits))
    for _ in range(3):
        bp.launch_gemv_deep(x, planes, scales, None, None, out, "bipolar", 128, K, cfg)
    torch.cuda.synchronize()
    ref = bp.linear_reference(x.float(), planes, scales.float(), None, "bipolar", 128, K)
    print(f"{N}x{K} b{bits} {bn}x{rows} w{warps}: rel err {((out.float() - ref).norm() / ref.norm()).item():.1e}")


if __name__ == "__main__":
    main()
