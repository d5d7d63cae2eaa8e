"""Time pinned gwint kernel configurations side by side on the GPU (no tuner): one line per (shape, format, M, config).

    PYTHONPATH=src python benchmarks/gwint_probe.py --shapes 8192x8192 --formats w4g128 --ms 128 \
        --configs '[{"kernel": "swapped", "block_m": 128, "block_n": 128, "block_kw": 16, "num_warps": 8,
                     "num_stages": 3, "packed": true, "waves": 1}]'

A config may give "waves" instead of "split_k" (split-K sized for that many programs per SM, as the tuner does),
"formats" and "ms" (the formats and rows M it applies to). Each call is timed like the benchmark (rotated weight and activation
sets, CUDA graph, median replay; synthetic weights) and checked on fresh inputs against the fp32 reference.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8192x8192")
    ap.add_argument("--formats", default="w4g128")
    ap.add_argument("--ms", default="128")
    ap.add_argument("--configs", required=True, help="JSON list of configurations")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from bitsmith.kernels import bench, gwint
    from bitsmith.kernels import gwint_triton as gt

    configs = json.loads(args.configs)
    sms = gt._num_sms(torch.device("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(5)
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.split("x"))
        for fname in args.formats.split(","):
            fmt = bench.FORMATS[fname]
            w0 = fmt.make(N, K, torch.float16, "cuda", gen)
            R = bench.rotations(fmt.nbytes(w0))
            wsets = [w0] + [fmt.make(N, K, torch.float16, "cuda", gen) for _ in range(R - 1)]
            gs, KW = fmt.gs(K), w0["qweight"].shape[0]
            wf = gwint.dequantize(w0["qweight"], w0["scales"], None, fmt.bits, gs, K, dtype=torch.float32)
            for M in (int(m) for m in args.ms.split(",")):
                xs = [torch.randn(M, K, device="cuda", dtype=torch.float16, generator=gen) for _ in range(R)]
                outs = [torch.empty(M, N, device="cuda", dtype=torch.float16) for _ in range(R)]
                for c in configs:
                    if fname not in c.get("formats", [fname]) or M not in c.get("ms", [M]):
                        continue
                    cfg = {k: v for k, v in c.items() if k not in ("waves", "formats", "ms")}
                    if "waves" in c:
                        tiles = -(-M // cfg["block_m"]) * -(-N // cfg["block_n"])
                        cfg["split_k"] = gt._split_for(tiles, -(-KW // cfg["block_kw"]), sms, c["waves"])
                    launch = gt.launch_gemm_t if cfg.get("kernel") == "swapped" else gt.launch_gemm

                    def call(x, w, o, cfg=cfg, launch=launch):
                        return launch(x, w["qweight"], w["scales"], None, None, o, fmt.bits, gs, K, cfg)

                    xc = torch.randn(M, K, device="cuda", dtype=torch.float16, generator=gen)
                    oc = torch.full((M, N), float("nan"), device="cuda", dtype=torch.float16)
                    call(xc, w0, oc)
                    ref = xc.float() @ wf.t()
                    err = ((oc.float() - ref).norm() / ref.norm()).item()
                    us = bench.graph_time_us([lambda x=x, w=w, o=o: call(x, w, o) for x, w, o in zip(xs, wsets, outs)])
                    print(f"probe {N}x{K} {fname} M={M}: {us:.1f} us, rel_err {err:.1e}, {cfg}", flush=True)
            del wsets, w0
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
