"""Where the M = 1 GEMV's time goes, by elimination: read-only kernels with the f16x2 GEMV's grid and bytes (the
plane words of each target layer, programs of `4 * bits` or `2 * bits` word rows x 1024 columns, as its unrolled
splits), once storing one word per program and once through the split-K epilogue the GEMVs use, next to a plain
stream of the same bytes (`bitsmith.kernels.stream`). Synthetic data; timing as the kernel rows (CUDA graph over
rotated buffers > 3x L2, median replay).

    PYTHONPATH=src python3 benchmarks/stream_ceiling.py --out $OUT
"""

import argparse
import json
import os
import sys
import time

import torch

from bitsmith.kernels import stream

T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:4.0f} s] {msg}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/stream-ceiling")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log(f"device {torch.cuda.get_device_name()}")
    rows = []
    # (N, K, bits, word rows per program = unroll x bits): the chosen splits of docs/results/bitplane.md
    for N, K, bits, unroll in ((8192, 8192, 2, 4), (28672, 8192, 2, 4), (8192, 8192, 3, 2), (28672, 8192, 3, 2),
                               (8192, 8192, 3, 4)):
        r = stream.tile_times_us(bits * (K // 32), N, unroll * bits, 1024, 4, log=log)
        rows.append(dict(r, K=K, bits=bits, unroll=unroll))
        with open(os.path.join(args.out, "tiles.json"), "w") as f:
            json.dump(rows, f, indent=1)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
