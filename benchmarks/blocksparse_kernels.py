"""Speed of the `bsr` kernels: the Triton kernel on the GPU (vs fp16 cuBLAS and PyTorch's Triton BSR), the CPU path.

    PYTHONPATH=src python benchmarks/blocksparse_kernels.py --gpu --check --out $OUT
    PYTHONPATH=src python benchmarks/blocksparse_kernels.py --cpu [--threads 2] [--reps 9]

GPU: timing through the shared harness (`bitsmith.kernels.bench.graph_time_us`: CUDA graphs, input sets rotated so
the weights come from HBM), shapes N x K (--shapes, default 8192x8192 and 28672x8192), M in --ms, and the formats
below (--formats; or any name sNN-bR[xC][-wB][-row]), each a random block mask of exactly that sparsity (uniform
over blocks; `-row`: the same number of blocks in every block row, as `scope: row` prunes) and random values.
cuBLAS fp16 (`F.linear` on the dense weight) and `torch.sparse._triton_ops.bsr_dense_mm` (fp16 values, same mask)
run in the same process; --variants also times every launch candidate of the named cases (forced configs), and the
tuner's own cold-L2 timings of every candidate go to rows.json ("tune_log"). --check then runs a correctness sweep
(after the timings, in the same process): the first three tiles of each M and every split-K size of the first, with
too few and too many splits, fp16/bf16, dense, int8 and int4 values, both scale layouts, thin and square blocks,
empty and full block rows, outputs poisoned with NaN, the split-K tile counters left zeroed, CUDA-graph replays
(tuned and split-K launches); thin blocks (1x16, 1x4, 2x16: `bsr_thin`) and 128-wide blocks among the cases.
--formats '' runs the check alone; --check-only 1x16,128x128,... keeps the cases, full-size split stress and graph
replays of those block shapes. rows.json, table.md and bench.log go to --out.

CPU: dense `F.linear` (float32) vs `bitsmith.kernels.bsr_cpu.gather_linear` vs torch's CSR/BSR sparse matmul, the
best of --reps timings each (the machine is shared: the minimum is the least disturbed run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

import torch
import torch.nn.functional as F

DEV = "cuda"  # the GPU sweep's device ("cpu" only for a TRITON_INTERPRET=1 smoke test of this script)

# name -> (sparsity, block, bits, group_size)
FORMATS = {
    "s90-b64": (0.9, (64, 64), None, None),
    "s90-b32": (0.9, (32, 32), None, None),
    "s80-b64": (0.8, (64, 64), None, None),
    "s80-b32": (0.8, (32, 32), None, None),
    "s80-b32-w4": (0.8, (32, 32), 4, 128),
    "s80-b32-w8": (0.8, (32, 32), 8, 128),
    "s80-b64-w4": (0.8, (64, 64), 4, 128),
    "s50-b16": (0.5, (16, 16), None, None),
    "s50-b32": (0.5, (32, 32), None, None),
    "s50-b1x16": (0.5, (1, 16), None, None),  # the block-sparse-50 recipe's blocks
    "s80-b16": (0.8, (16, 16), None, None),
    "s80-b16-w4": (0.8, (16, 16), 4, 128),
}
# other names: sNN-bR[xC][-wB][-row] (NN % of blocks pruned, R x C blocks (R x R without xC), int B values with
# group-128 scales, -row: every block row keeps the same number of blocks, as the pass's scope row makes them)


def spec_of(name: str) -> tuple:
    """(sparsity, (R, C), bits, group_size[, row]) of a format name."""
    if name in FORMATS:
        return FORMATS[name]
    m = re.fullmatch(r"s(\d+)-b(\d+)(?:x(\d+))?(?:-w(4|8))?(-row)?", name)
    if not m:
        raise ValueError(f"unknown format {name!r} (sNN-bR[xC][-wB][-row])")
    R = int(m.group(2))
    C = int(m.group(3) or R)
    bits = int(m.group(4)) if m.group(4) else None
    return (int(m.group(1)) / 100, (R, C), bits, 128 if bits else None, bool(m.group(5)))


def random_mask(NB: int, KB: int, sparsity: float, gen: torch.Generator, device, rows: bool = False) -> torch.Tensor:
    if rows:  # the same number of blocks in every block row, uniform within the row
        keep = round((1 - sparsity) * KB)
        idx = torch.rand(NB, KB, generator=gen, device=device).argsort(dim=1)[:, :keep]
        return torch.zeros(NB, KB, dtype=torch.bool, device=device).scatter_(1, idx, True)
    keep = round((1 - sparsity) * NB * KB)
    idx = torch.randperm(NB * KB, generator=gen, device=device)[:keep]
    m = torch.zeros(NB * KB, dtype=torch.bool, device=device)
    m[idx] = True
    return m.view(NB, KB)


def make(N: int, K: int, spec: tuple, dtype, device, gen: torch.Generator) -> tuple[dict, dict, torch.Tensor]:
    """(params, tensors, mask) of one random weight in the given format."""
    from bitsmith.kernels import bsr

    sparsity, (R, C), bits, g = spec[:4]
    mask = random_mask(N // R, K // C, sparsity, gen, device, rows=len(spec) > 4 and spec[4])
    crow, col = bsr._index(mask)
    B = int(mask.sum())
    params = {"in_features": K, "out_features": N, "block_rows": R, "block_cols": C, "nnz_blocks": B,
              "bits": bits, "group_size": g}
    t = {"crow_indices": crow, "col_indices": col}
    if bits is None:
        t["values"] = (torch.randn(B, R, C, generator=gen, device=device) / math.sqrt(K * (1 - sparsity))).to(dtype)
    else:
        cw = C if bits == 8 else C // 2
        t["qvalues"] = torch.randint(0, 256, (B, R, cw), generator=gen, device=device, dtype=torch.int32
                                     ).to(torch.uint8)
        s0 = 1.0 / ((1 << (bits - 1)) * math.sqrt(K * (1 - sparsity)))
        shape = (math.ceil(K / g), N) if not bsr.block_scales(params) else (B, R, C // g)
        t["scales"] = ((torch.rand(*shape, generator=gen, device=device) + 0.5) * s0).to(dtype)
    return params, t, mask


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out.float() - ref).norm() / ref.norm()).item()


# ------------------------------------------------------------------------------------------------------------ GPU

CHECK_CASES = [  # N, K, sparsity, block, bits, group, dtype, bias
    (1024, 768, 0.7, (16, 16), None, None, torch.float16, False),
    (1024, 768, 0.5, (32, 32), None, None, torch.bfloat16, True),
    (2048, 1024, 0.9, (64, 64), None, None, torch.float16, True),
    (1024, 1024, 0.8, (32, 32), 4, 128, torch.float16, False),
    (1024, 1024, 0.8, (64, 64), 4, 128, torch.bfloat16, True),
    (1024, 1024, 0.6, (32, 32), 8, 128, torch.float16, True),
    (1024, 1024, 0.6, (64, 64), 4, 16, torch.float16, False),
    (1024, 1024, 0.6, (32, 64), 8, 32, torch.bfloat16, False),
    (512, 256, 0.5, (1, 4), None, None, torch.float16, False),
    (512, 256, 0.5, (4, 1), 8, 64, torch.float16, True),
    (512, 512, 0.5, (16, 64), None, None, torch.float16, False),
    (512, 512, 0.5, (64, 16), 4, 128, torch.float16, False),
    # thin blocks through `bsr_thin` (M >= 2): odd N, bf16, 1x4 with 16 slots per window, 2x16
    (999, 768, 0.5, (1, 16), None, None, torch.bfloat16, True),
    (1024, 1024, 0.8, (1, 16), None, None, torch.float16, False),
    (640, 512, 0.6, (1, 4), None, None, torch.float16, True),
    (512, 768, 0.5, (2, 16), None, None, torch.float16, False),
    # wide blocks (the fourth pass's block shapes)
    (1024, 1024, 0.9, (128, 128), None, None, torch.float16, True),
    (1024, 1024, 0.9, (64, 128), None, None, torch.float16, False),
    (1024, 1024, 0.8, (128, 64), 4, 128, torch.float16, False),
]


STRESS_REPEATS = 6


def check(log, only: str = "") -> int:
    """The sweep; `only` (a comma list of block shapes RxC) restricts it to those cases and skips the full-size
    split stress and graph replays of the other formats."""
    from bitsmith.kernels import bsr

    gen = torch.Generator(device=DEV).manual_seed(1)
    tol = {torch.float16: 3e-3, torch.bfloat16: 1e-2}
    cases = CHECK_CASES
    if only:
        keep = {tuple(int(v) for v in b.split("x")) for b in only.split(",")}
        cases = [c for c in cases if c[3] in keep]
    failures = 0
    t0 = time.time()
    for N, K, sp, block, bits, g, dtype, use_bias in cases:
        params, t, mask = make(N, K, (sp, block, bits, g), dtype, DEV, gen)
        # one empty and one full block row
        if mask.shape[0] > 2:
            full = torch.ones_like(mask)
            full[0] = False
            full[2:-1] = mask[2:-1]
            params, t, mask = _with_mask(params, t, full, dtype, gen)
        wd = bsr.dequantize(t, params, torch.float32)
        bias = torch.randn(N, device=DEV, generator=gen).to(dtype) if use_bias else None
        for M in (1, 3, 33, 200):
            for cfg in check_configs(M, params, dtype):
                x = torch.randn(M, K, device=DEV, generator=gen).to(dtype)
                ref = x.float() @ wd.t() + (bias.float() if use_bias else 0)
                out = torch.full((M, N), float("nan"), device=DEV, dtype=dtype)
                try:
                    bsr.launch(x, t, params, bias, out, cfg)
                    err = rel_err(out, ref)
                except Exception as e:  # a launch that does not compile counts as a failure; the sweep goes on
                    log(f"ERROR {type(e).__name__}: {str(e)[:300]}")
                    err = float("nan")
                if not err < tol[dtype]:
                    failures += 1
                    log(f"FAIL {N}x{K} {block} bits={bits} g={g} {dtype} M={M} {cfg}: {err:.2e}")
        log(f"checked {N}x{K} s={sp} {block} bits={bits} g={g} {str(dtype)[6:]} bias={use_bias}"
            f" ({time.time() - t0:.0f}s)")
    # split-K stress at full size: every split candidate of every tile (M = 1, 16, 128: 16-, 64- and 128-row x
    # tiles), s80-b32 and s90-b64 at 8192x8192, fresh inputs and a NaN-poisoned output for every launch
    # with `only`: the full-size stress and graph replays of the formats of those block shapes
    stress = [f for f in ("s80-b32", "s90-b64", "s80-b32-w4", "s80-b32-w4-row", "s50-b1x16", "s90-b128x64")
              if not only or spec_of(f)[1] in keep]
    if "s80-b32-w4-row" in stress:
        failures += _uniform_check(gen, tol, log)
    if DEV == "cuda":
        n = 0
        for fname in stress:
            params, t, _ = make(8192, 8192, spec_of(fname), torch.float16, DEV, gen)
            wd = bsr.dequantize(t, params, torch.float32)
            # int4: the packed GEMV's splits; thin blocks: bsr_thin's; 128-row blocks: every split tile at M = 128
            R = params["block_rows"]
            ms = (1,) if params["bits"] else (16, 128) if R == 1 else (128,) if R == 128 else (1, 16, 128)
            for M, cfg in [(M, c) for M in ms for c in bsr.configs(M, params, split=True) if c["chunk"]]:
                for _ in range(STRESS_REPEATS):
                    x = torch.randn(M, 8192, device=DEV, generator=gen).half()
                    out = torch.full((M, 8192), float("nan"), device=DEV, dtype=torch.float16)
                    bsr.launch(x, t, params, None, out, cfg)
                    err = rel_err(out, x.float() @ wd.t())
                    n += 1
                    if not err < tol[torch.float16]:
                        failures += 1
                        log(f"FAIL split stress {fname} M={M} {cfg}: {err:.2e}")
            del wd, t
        log(f"split stress: {n} launches ({time.time() - t0:.0f}s)")
    _, cnt = bsr._split_workspace(torch.device(DEV), 0, 0)
    if cnt.any():  # split-K launches must leave the tile counters zeroed for the next call
        failures += 1
        log("FAIL split-K counters left non-zero")
    # CUDA-graph replay of the public op with fresh inputs
    if DEV != "cuda":
        return failures
    for fname in [f for f in ("s80-b32-w4", "s80-b32-w4-row", "s50-b1x16") if f in stress]:
        failures += _graph_check(fname, gen, tol, log)
    log(f"GPU check: {failures} failures ({time.time() - t0:.0f}s)")
    return failures


def _uniform_check(gen, tol, log, sizes=((1024, 1024), (8192, 8192)), keys=()) -> int:
    """Every `ell` tile of the packed int4 GEMV (equal block rows: the crow-free loop and the unrolled kernel) on
    row-balanced s80-b32-w4-row weights, 1024x1024 and 8192x8192, fresh inputs, NaN-poisoned outputs, every
    other launch with bias; then the same tiles on unequal rows (`keys`: only tiles with those, `_has_key`)."""
    from bitsmith.kernels import bsr

    failures, n = 0, 0
    for N, K in sizes:
        params, t, _ = make(N, K, spec_of("s80-b32-w4-row"), torch.float16, DEV, gen)
        assert bsr.uniform_row_blocks(t["crow_indices"]) is not None
        wd = bsr.dequantize(t, params, torch.float32)
        for i, cfg in enumerate(c for c in bsr.configs(1, params) if c.get("ell") and _has_key(c, keys)):
            x = torch.randn(1, K, device=DEV, generator=gen).half()
            bias = torch.randn(N, device=DEV, generator=gen).half() if i % 2 else None
            out = torch.full((1, N), float("nan"), device=DEV, dtype=torch.float16)
            bsr.launch(x, t, params, bias, out, cfg)
            err = rel_err(out, x.float() @ wd.t() + (bias.float() if bias is not None else 0))
            n += 1
            if not err < tol[torch.float16]:
                failures += 1
                log(f"FAIL ell {N}x{K} {cfg}: {err:.2e}")
        del wd, t
    # the same tiles on unequal rows (uniform masks): the crow kernel of each tile
    params, t, _ = make(sizes[0][0], sizes[0][1], spec_of("s80-b32-w4"), torch.float16, DEV, gen)
    wd = bsr.dequantize(t, params, torch.float32)
    unequal = bsr.uniform_row_blocks(t["crow_indices"]) is None  # (a small random mask can be equal by chance)
    for cfg in [c for c in bsr.configs(1, params) if c.get("ell") and unequal and _has_key(c, keys)]:
        x = torch.randn(1, sizes[0][1], device=DEV, generator=gen).half()
        out = torch.full((1, sizes[0][0]), float("nan"), device=DEV, dtype=torch.float16)
        bsr.launch(x, t, params, None, out, cfg)
        err = rel_err(out, x.float() @ wd.t())
        n += 1
        if not err < tol[torch.float16]:
            failures += 1
            log(f"FAIL ell tile on unequal rows {cfg}: {err:.2e}")
    log(f"ell tiles on equal rows (and unequal): {n} launches, {failures} failures")
    return failures


def _graph_check(fname, gen, tol, log) -> int:
    from bitsmith.kernels import bsr

    failures = 0
    params, t, _ = make(4096, 4096, spec_of(fname), torch.float16, DEV, gen)
    wd = bsr.dequantize(t, params, torch.float32)
    for M in (1, 16, 128):
        split = [c for c in bsr.configs(M, params, split=True) if c["chunk"]][:1]
        for cfg in [None] + split:  # the tuned pick, and a split-K launch (workspace and counters inside the graph)
            x = torch.randn(M, 4096, device=DEV, dtype=torch.float16)
            bsr.triton_linear(x, t, params, config=cfg)
            st = torch.cuda.Stream()
            st.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(st):
                bsr.triton_linear(x, t, params, config=cfg)
            torch.cuda.current_stream().wait_stream(st)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=st):
                y = bsr.triton_linear(x, t, params, config=cfg)
            for _ in range(3):
                x.copy_(torch.randn(M, 4096, device=DEV).half())
                graph.replay()
                torch.cuda.synchronize()
                err = rel_err(y, x.float() @ wd.t())
                if not err < tol[torch.float16]:
                    failures += 1
                    log(f"FAIL graph replay {fname} M={M} {cfg}: {err:.2e}")
    return failures


def check_configs(M: int, params: dict, dtype=torch.float16) -> list[dict]:
    """What the sweep launches: the first three tiles, the last one, three `prefetch` tiles, every `packed` tile
    (int4 GEMV, fp16) and the first of the other GEMV memory order, whole-row (chunk 0); every split size of the
    first tile, and that tile with too few and too many splits (the last split takes the rest; idle splits write
    nothing)."""
    from bitsmith.kernels import bsr

    cands = bsr.configs(M, params, split=True, dtype=dtype)  # split-K variants included
    tiles = []
    for c in cands:
        tile = {k: v for k, v in c.items() if k != "chunk"}
        if tile not in tiles:
            tiles.append(tile)
    splits = [c for c in cands if c["chunk"] and all(c.get(k) == v for k, v in tiles[0].items())]
    other = [dict(tiles[0], jmajor=True)] if M == 1 else []  # the other GEMV memory order (a kernel option)
    pf = [t for t in tiles if t.get("prefetch") and not t.get("packed")][:3]  # the hand-pipelined loops
    pk = [t for t in tiles if t.get("packed")]
    picked = tiles[:3] + [t for t in tiles[-1:] + other + pf + pk if t not in tiles[:3]]
    out = [dict(tile, chunk=0) for tile in picked] + splits
    KB = params["in_features"] // params["block_cols"]
    # split-K on every tile (thin tiles: chunk counts K windows)
    out += [dict(t, chunk=2 * t.get("nblk", 1)) for t in picked[1:] if 2 * t.get("nblk", 1) < KB]
    if splits:
        out += [dict(splits[-1], n_split=2), dict(splits[-1], n_split=64)]
    return out


def _with_mask(params, t, mask, dtype, gen):
    """Re-make a random weight of `params`' kind with this exact mask."""
    from bitsmith.kernels import bsr

    crow, col = bsr._index(mask)
    B = int(mask.sum())
    p = {**params, "nnz_blocks": B}
    R, C = p["block_rows"], p["block_cols"]
    nt = {"crow_indices": crow, "col_indices": col}
    if p["bits"] is None:
        nt["values"] = torch.randn(B, R, C, device=DEV, generator=gen).to(dtype) * 0.05
    else:
        cw = C if p["bits"] == 8 else C // 2
        nt["qvalues"] = torch.randint(0, 256, (B, R, cw), device=DEV, generator=gen, dtype=torch.int32
                                      ).to(torch.uint8)
        if bsr.block_scales(p):
            nt["scales"] = (torch.rand(B, R, C // p["group_size"], device=DEV, generator=gen) * 0.01).to(dtype)
        else:
            nt["scales"] = t["scales"]
    return p, nt, mask


def _has_key(cfg: dict, keys) -> bool:
    """Whether cfg sets one of keys ("k": any true value, "k=v": that value); no keys: True."""
    return not keys or any(str(cfg.get(k.split("=")[0])) == k.split("=")[1] if "=" in k else cfg.get(k) for k in keys)


def bench_gpu(shapes, ms, formats, log, variants=(), variant_keys=()) -> list[dict]:
    from bitsmith.kernels import bench, bsr

    try:
        from torch.sparse._triton_ops import bsr_dense_mm
    except Exception as e:  # pragma: no cover
        bsr_dense_mm = None
        log(f"torch bsr_dense_mm unavailable: {e}")
    dtype = torch.float16
    gen = torch.Generator(device=DEV).manual_seed(0)
    rows = []
    bw = bench.copy_bandwidth_gbs()
    log(f"device {torch.cuda.get_device_name()}, copy bandwidth {bw:.0f} GB/s")
    rows.append(dict(kernel="d2d-copy", GBs=bw))
    for N, K in shapes:
        wbytes = N * K * 2
        R_sets = bench.rotations(wbytes)
        ws = [torch.randn(N, K, device=DEV, generator=gen, dtype=dtype) for _ in range(R_sets)]
        base = {}
        for M in ms:
            xs = [torch.randn(M, K, device=DEV, generator=gen, dtype=dtype) for _ in range(R_sets)]
            base[M] = bench.graph_time_us([lambda x=x, w=w: F.linear(x, w) for x, w in zip(xs, ws)])
            rows.append(dict(kernel="cublas-fp16", N=N, K=K, M=M, us=base[M], speedup=1.0))
            log(f"{N}x{K} M={M} cuBLAS fp16 {base[M]:.1f} us")
        del ws
        torch.cuda.empty_cache()
        for fname in formats:
            spec = spec_of(fname)
            p0, t0, m0 = make(N, K, spec, dtype, DEV, gen)
            set_bytes = sum(v.numel() * v.element_size() for v in t0.values())
            n_sets = bench.rotations(set_bytes)
            sets = [(p0, t0, m0)] + [make(N, K, spec, dtype, DEV, gen) for _ in range(n_sets - 1)]
            wd = bsr.dequantize(t0, p0, torch.float32)
            peers = []
            if bsr_dense_mm is not None and spec[2] is None and min(spec[1]) >= 16:  # its tl.dot needs 16+ sides
                try:
                    for p, t, m in sets:
                        dense = bsr.dequantize(t, p, dtype)
                        peers.append(dense.to_sparse_bsr(spec[1]))
                        del dense
                except Exception as e:
                    log(f"  torch BSR peer unavailable for {fname}: {type(e).__name__}: {e}")
                    peers = []
            for M in ms:
                xs = [torch.randn(M, K, device=DEV, generator=gen, dtype=dtype) for _ in range(n_sets)]
                xc = torch.randn(M, K, device=DEV, generator=gen, dtype=dtype)
                err = rel_err(bsr.triton_linear(xc, t0, p0), xc.float() @ wd.t())
                us = bench.graph_time_us([lambda x=x, s=s: bsr.triton_linear(x, s[1], s[0]) for x, s in zip(xs, sets)])
                cfg = bsr._TUNED.get(bsr.tune_key(M, p0, dtype, False, xc.device,
                                                  bsr.uniform_row_blocks(t0["crow_indices"]) is not None))
                nb = set_bytes + 2 * M * (K + N)
                rows.append(dict(kernel="bitsmith", format=fname, N=N, K=K, M=M, us=us, speedup=base[M] / us,
                                 GBs=nb / us / 1e3, rel_err=err, config=cfg, weight_bytes=set_bytes))
                log(f"{N}x{K} M={M} {fname} bitsmith {us:.1f} us ({base[M] / us:.2f}x cuBLAS, {nb / us / 1e3:.0f}"
                    f" GB/s, err {err:.1e}) cfg {cfg}")
                if (fname, N, K, M) in variants:  # every launch candidate, forced, timed the same way
                    for c in [c for c in bsr.configs(M, p0) if _has_key(c, variant_keys)]:
                        try:
                            vus = bench.graph_time_us([lambda x=x, s=s, c=c: bsr.triton_linear(x, s[1], s[0], config=c)
                                                       for x, s in zip(xs, sets)])
                        except Exception as e:
                            log(f"  variant {c} failed: {type(e).__name__}: {str(e)[:200]}")
                            continue
                        verr = rel_err(bsr.triton_linear(xc, t0, p0, config=c), xc.float() @ wd.t())
                        rows.append(dict(kernel="bitsmith-variant", format=fname, N=N, K=K, M=M, us=vus,
                                         speedup=base[M] / vus, rel_err=verr, config=c))
                        log(f"  variant {c}: {vus:.1f} us ({base[M] / vus:.2f}x, err {verr:.1e})")
                if peers:
                    try:
                        xts = [x.t().contiguous() for x in xs]
                        perr = rel_err(bsr_dense_mm(peers[0], xc.t().contiguous()).t(), xc.float() @ wd.t())
                        try:
                            pus = bench.graph_time_us([lambda xt=xt, b=b: bsr_dense_mm(b, xt)
                                                       for xt, b in zip(xts, peers)])
                            how = "graph"
                        except Exception:
                            import triton

                            pus = triton.testing.do_bench(lambda: bsr_dense_mm(peers[0], xts[0]),
                                                          return_mode="median") * 1e3
                            how = "do_bench"
                        rows.append(dict(kernel="torch-bsr", format=fname, N=N, K=K, M=M, us=pus,
                                         speedup=base[M] / pus, rel_err=perr, timing=how))
                        log(f"{N}x{K} M={M} {fname} torch bsr_dense_mm {pus:.1f} us ({base[M] / pus:.2f}x, {how},"
                            f" err {perr:.1e})")
                    except Exception as e:
                        log(f"  torch BSR failed at M={M}: {type(e).__name__}: {e}")
            del sets, peers, wd, t0
            torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    base = {(r["N"], r["K"], r["M"]): r["us"] for r in rows if r["kernel"] == "cublas-fp16"}
    by = {(r["kernel"], r["format"], r["N"], r["K"], r["M"]): r for r in rows if "format" in r}
    keys = sorted({(r["format"], r["N"], r["K"], r["M"]) for r in rows if r["kernel"] == "bitsmith"},
                  key=lambda k: (k[0], k[1] * k[2], k[3]))
    out = ["| format | N x K | M | cuBLAS fp16 us | bitsmith us (x cuBLAS) | torch BSR us (x cuBLAS) | err | config |",
           "|---|---|--:|--:|--:|--:|--:|---|"]
    for f, N, K, M in keys:
        b = by[("bitsmith", f, N, K, M)]
        p = by.get(("torch-bsr", f, N, K, M))
        pc = "-" if p is None else f"{p['us']:.1f} ({p['speedup']:.2f}x)"
        c = b.get("config") or {}
        cs = f"r{c.get('block_r')} m{c.get('block_m')} n{c.get('nblk')} k{c.get('chunk')} w{c.get('num_warps')}" \
             f" s{c.get('num_stages')}"
        out.append(f"| {f} | {N}x{K} | {M} | {base[(N, K, M)]:.1f} | {b['us']:.1f} ({b['speedup']:.2f}x) | {pc} |"
                   f" {b['rel_err']:.1e} | {cs} |")
    return "\n".join(out)


def bsr_tune_log() -> list[dict]:
    from bitsmith.kernels import bsr

    return [dict(r, key=[str(k) for k in r["key"]]) for r in bsr.TUNE_LOG]


# ------------------------------------------------------------------------------------------------------------ CPU

def bench_cpu(reps: int, log) -> list[dict]:
    from bitsmith.kernels import bsr, bsr_cpu

    def best(fn):
        fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return min(ts) * 1e3

    gen = torch.Generator().manual_seed(0)
    rows = []
    for N, K in ((2048, 2048), (1536, 576)):
        for sparsity in (0.5, 0.7, 0.9):
            for block in ((16, 16), (32, 32), (64, 64), (1, 4)):
                if N % block[0] or K % block[1]:
                    continue
                p, t, _ = make(N, K, (sparsity, block, None, None), torch.float32, "cpu", gen)
                w = bsr.dequantize(t, p)
                csr = w.to_sparse_csr()
                for M in (1, 16, 128):
                    x = torch.randn(M, K, generator=gen)
                    d = best(lambda: F.linear(x, w))
                    gth = best(lambda: bsr_cpu.gather_linear(x, t, p))
                    c = best(lambda: torch.mm(csr, x.t()))
                    r = dict(N=N, K=K, sparsity=sparsity, block=f"{block[0]}x{block[1]}", M=M, dense_ms=d,
                             gather_ms=gth, csr_ms=c, gather_x=d / gth, csr_x=d / c,
                             dispatch=bsr_cpu.choose(p, M))
                    rows.append(r)
                    log(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--shapes", default="8192x8192,28672x8192")
    ap.add_argument("--ms", default="1,16,128")
    ap.add_argument("--formats", default="s90-b64,s90-b32,s80-b64,s80-b32,s80-b32-w4,s80-b64-w4,"
                                         "s80-b32-w8,s80-b16-w4,s50-b16,s50-b32")
    ap.add_argument("--check-only", default="", help="RxC,...: check only the cases of these block shapes")
    ap.add_argument("--variants", default="",
                    help="FORMAT:NxK:M,... cases whose every launch candidate is also timed (forced config)")
    ap.add_argument("--variant-keys", default="",
                    help="k1,k2=v,...: time only the --variants candidates that set one of these config keys")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=os.environ.get("OUT", "out/bsr-bench"))
    args = ap.parse_args(argv)
    from bitsmith.kernels.bench import tee_log

    log = tee_log(args.out)

    if args.threads:
        torch.set_num_threads(args.threads)
    result = {}
    if args.gpu:
        import triton

        log(f"torch {torch.__version__}, triton {triton.__version__}")
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        variants = set()
        for v in filter(None, args.variants.split(",")):
            f, nk, m = v.split(":")
            n, k = (int(a) for a in nk.split("x"))
            variants.add((f, n, k, int(m)))
        if args.formats:
            rows = bench_gpu(shapes, [int(m) for m in args.ms.split(",")], args.formats.split(","), log, variants,
                             tuple(filter(None, args.variant_keys.split(","))))
            result["gpu"] = rows
            result["tune_log"] = bsr_tune_log()
            log("\n" + table(rows))
            with open(os.path.join(args.out, "table.md"), "w") as f:
                f.write(table(rows) + "\n")
            with open(os.path.join(args.out, "rows.json"), "w") as f:  # kept if the check below is cut short
                json.dump(result, f, indent=1, default=str)
        if args.check:  # after the timings (a long sweep cut short by a time limit loses no timing)
            result["check_failures"] = check(log, args.check_only)
    if args.cpu:
        log(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        result["cpu"] = bench_cpu(args.reps, log)
    with open(os.path.join(args.out, "rows.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    return 1 if result.get("check_failures") else 0


if __name__ == "__main__":
    sys.exit(main())
