"""GPU check and benchmark of the bit-plane kernels (bipolar-INT and BCQ) against fp16 cuBLAS and gemlite.

    PYTHONPATH=src:.whl/gemlite-0.6.0.post2 python3 benchmarks/bitplane_kernels.py --out $OUT

Uses the timing of `bitsmith.kernels.bench` (the gwint harness): each timed call is the public op
(`bitplane.linear`, tuned once per shape) on one of R rotated input sets whose total exceeds the L2 3x, captured
round-robin in one CUDA graph, median replay time per call. cuBLAS (`F.linear`, fp16 weights) and gemlite
(`GemLiteLinearTriton`, w2 / w4 g128, fp16) are timed the same way in the same process. Weights are synthetic:
random planes and random scales / alphas of the real shapes.

Steps: (1) compile every kernel variant in parallel worker processes (fills Triton's cache); (2) correctness of every
regime on awkward shapes, bits 1..8, both kinds, fp16 and bf16, against the fp32 dequantized reference;
(3) timings: M = 1 / 16 / 128 at 8192x8192 and 28672x8192 for bipolar 2/3/4 bits, BCQ 3 bits, gemlite w2/w4 and
cuBLAS; the 1..8-bit curve at M = 1; dequantize + cuBLAS at M = 128. Writes rows.json, tune.json, table.md.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time

import torch

SHAPES = [(8192, 8192), (28672, 8192)]  # (N, K) = (out, in)
OUT_DIR = None  # rows.json is rewritten after every row, so a run cut short still leaves its numbers
SMOKE = False  # --smoke: tiny shapes on the CPU under TRITON_INTERPRET=1 (the script's own test)
MS = [1, 16, 128]
G = 128


DEVICE = "cuda"


def make(kind, N, K, bits, dtype, gen, offset=False, gs=G):
    from bitsmith.kernels import bitplane as bp

    device = DEVICE
    gs = min(gs, K)
    KW = bp.num_words(K)
    if K % 32 == 0:  # every bit of every word is a weight: random words are random planes
        planes = torch.randint(-2**31, 2**31, (bits, KW, N), dtype=torch.int64, device=device, generator=gen)
        planes = planes.to(torch.int32)
    else:
        codes = torch.randint(0, 1 << bits, (N, K), dtype=torch.uint8, device=device, generator=gen)
        planes = bp.pack_planes(codes, bits)
    Gn = bp.num_groups(K, gs)
    s0 = 1.0 / ((1 << bits) * math.sqrt(K))  # outputs O(1) for unit-variance x
    if kind == "bipolar":
        coef = ((torch.rand(Gn, N, device=device, generator=gen) + 0.5) * s0).to(dtype)
    else:
        coef = (torch.randn(bits, Gn, N, device=device, generator=gen) * s0 * 2).to(dtype)
    off = (torch.randn(Gn, N, device=device, generator=gen) * s0).to(dtype) if offset else None
    return dict(planes=planes, coef=coef, offset=off, kind=kind, group_size=gs, K=K)


def call(x, w, **kw):
    from bitsmith.kernels import bitplane as bp

    return bp.triton_linear(x, w["planes"], w["coef"], w["offset"], w["kind"], w["group_size"], w["K"], **kw)


def reference(x, w, bias=None):
    from bitsmith.kernels import bitplane as bp

    wf = bp.dequantize(w["planes"], w["coef"], w["offset"], w["kind"], w["group_size"], w["K"], torch.float32)
    out = x.float() @ wf.t()
    return out if bias is None else out + bias.float()


def nbytes(w):
    return sum(t.numel() * t.element_size() for t in (w["planes"], w["coef"], w["offset"]) if t is not None)


def rel(out, ref):
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out.float() - ref).norm() / ref.norm()).item()


# ------------------------------------------------------------------------------------------------ compile in parallel

def _candidates(kind, bits, M, N, K):
    from bitsmith.kernels import bitplane as bp

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if M == 1:  # what the public op tunes over (fp32 GEMV, f16x2 GEMV, and for BCQ the swapped kernel)
        return [("gemv", c) for c in bp.gemv_candidates(N, K, bits, G, kind, torch.float16, sms)]
    # the older `_gemm_kernel` keeps its two first candidates, so the tune log compares both kernels
    return [("gemm", c) for c in bp.gemm_mma_candidates(M, N, K, bits, G, kind, None, torch.float16)
            + bp.gemm_t_configs(M, N, K, bits, kind, sms, torch.float16)
            + bp.gemm_configs(M, N, K, bits, G, kind, sms)[:2]]


QUICK = False  # --quick: 8192x8192 only, bipolar 2/3 bits and BCQ 3, no curve, no gemlite; check of 4 cases
SKIP: set[str] = set()  # --skip: any of bcq, gemlite, dequant, curve (rows left out of the timing)
BITS = (2, 3, 4)  # --bits: bipolar widths of the main table
CASES: tuple[int, ...] | None = None  # --check-cases: the check's case indices (default all)


def timing_tasks():
    tasks = []
    for bits in ((2, 3) if QUICK else range(1, 9)):
        ms = MS if bits in BITS else (1,) if "curve" not in SKIP else ()
        for M in ms:
            tasks.append(("bipolar", bits, M))
    for M in (() if "bcq" in SKIP else MS):
        tasks.append(("bcq", 3, M))
    return tasks


def _warm(task):
    """Compile every candidate of one (kind, bits, M) at the benchmark's N, K (same specialisation); the task
    ("check",) runs the correctness sweep instead (its compiles overlap the others')."""
    try:
        if task[0] == "check":
            return ("check", check(lambda m: print(m, flush=True), task[1]))
        if task[0] == "check_mma":
            return ("check", check_mma(lambda m: print(m, flush=True), task[1]))
        return ("warm", _warm_one(*task))
    except Exception:
        import traceback

        traceback.print_exc()
        return ("check", 1) if task[0].startswith("check") else ("warm", 0)


def _warm_one(kind, bits, M):
    torch.cuda.set_device(0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    N, K = SHAPES[0]
    w = make(kind, N, K, bits, torch.float16, gen)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16, generator=gen)
    n = 0
    for regime, cfg in _candidates(kind, bits, M, N, K):
        call(x, w, config=cfg, regime=regime)
        n += 1
    torch.cuda.synchronize()
    return n


def warm(log, workers=12, with_check=True) -> int:
    """-> check failures (0 without the check)."""
    t0 = time.time()
    ctx = mp.get_context("spawn")
    # the correctness sweep as one task per case (its compiles spread over the processes), first in the queue
    cases = (2, 3, 4, 5, 16) if QUICK else CASES if CASES is not None else range(N_CASES)
    tasks = ([("check_mma", (b,)) for b in range(1, 9)] + [("check", (i,)) for i in cases] + [("check", ())]
             if with_check else []) + timing_tasks()
    with ctx.Pool(workers) as pool:
        res = pool.map(_warm, tasks, chunksize=1)
    n = sum(v for k, v in res if k == "warm")
    failures = sum(v for k, v in res if k == "check")
    log(f"compiled {n} timing candidates in {time.time() - t0:.0f} s ({workers} processes), check failures"
        f" {failures if with_check else 'n/a'}")
    return failures


# ------------------------------------------------------------------------------------------------ correctness

N_CASES = 18  # len(cases) in `check`


def check(log, only: tuple[int, ...] | None = None) -> int:
    """Correctness of every regime against the fp32 reference -> failures. `only`: run just these case indices
    (the CUDA-graph replay check runs when `only` is None or empty)."""
    from bitsmith.kernels import bitplane as bp
    from bitsmith.kernels import gwint_triton

    tol = {torch.float16: 3e-3, torch.bfloat16: 1.2e-2}
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 132
    failures = checked = 0
    t0 = time.time()
    cases = []  # (kind, bits, dtype, N, K, gs, offset, bias)
    for bits in range(1, 9):
        cases.append(("bipolar", bits, torch.float16, 4099, 576, 128, False, bits % 2 == 0))
        cases.append(("bcq", bits, torch.float16, 1000, 608, 64, bits % 3 == 0, False))
    cases += [("bipolar", 3, torch.bfloat16, 515, 1024, 128, True, True), ("bcq", 3, torch.bfloat16, 515, 576, 576,
                                                                            False, True)]
    assert len(cases) == N_CASES
    for ci, (kind, bits, dtype, N, K, gs, with_off, with_bias) in enumerate(cases):
        if only is not None and ci not in only:
            continue
        if SMOKE:
            N, K = 40, K // 4 + 32
        w = make(kind, N, K, bits, dtype, gen, offset=with_off, gs=gs)
        bias = torch.randn(N, device=DEVICE, generator=gen).to(dtype) if with_bias else None
        for M in ((1, 3, 33) if SMOKE else (1, 3, 16, 33, 128, 300)):
            x = torch.randn(M, K, device=DEVICE, dtype=dtype, generator=gen)
            ref = reference(x, w, bias)
            if M == 1:
                plans = [("gemv", c) for c in bp.gemv_configs(N, K, bits, gs, kind, sms)[::2]]
            else:
                plans = [("gemm", c) for c in bp.gemm_configs(M, N, K, bits, gs, kind, sms)[:1]]
                if kind == "bcq" and M <= 64:
                    plans.append(("gemm", dict(plans[0][1], strategy=1 - plans[0][1]["strategy"])))
            if M == 300:
                plans.append(("dequant", None))
            # the swapped kernel: every tile variant (join, xperm, widths) of gemm_t_configs, fewer on the CPU
            sw = bp.gemm_t_configs(M, N, K, bits, kind, sms, dtype)
            plans += [("gemm" if M > 1 else "gemv", c) for c in (sw[:1] if SMOKE else sw[:1] + [c for c in sw if c["num_warps"] == 8][:1])]
            h2 = bp.gemv_h2_configs(N, K, bits, gs, kind, dtype, sms) if M == 1 else []
            plans += [("gemv", c) for c in h2[:3:2]]
            for regime, cfg in plans:
                out = call(x, w, bias=bias, config=cfg, regime=regime)
                e = rel(out, ref)
                checked += 1
                if not e < tol[dtype]:
                    failures += 1
                    log(f"FAIL {kind} b{bits} {str(dtype)[6:]} N{N} K{K} g{gs} M{M} {regime} {cfg}: {e:.2e}")
                if cfg is not None and (cfg == sw[0] or cfg in h2[:1]) and bp.gemm_t_mode(dtype, cfg) == 2:
                    # the PTX (mode 2) and its plain-Triton twin (mode 1, what the CPU tests run) must agree
                    # bit for bit: same fp16 arithmetic in the same order (one split: split-K's atomic adds
                    # arrive in any order)
                    out = call(x, w, bias=bias, config=dict(cfg, split_k=1), regime=regime)
                    twin = call(x, w, bias=bias, config=dict(cfg, split_k=1, mode=1), regime=regime)
                    checked += 1
                    if not torch.equal(twin, out):
                        failures += 1
                        log(f"FAIL mode 1 != mode 2: {kind} b{bits} N{N} K{K} M{M} {cfg}: "
                            f"max diff {(twin.float() - out.float()).abs().max().item():.2e}")
    for ws, cnt in gwint_triton._WORKSPACES.values():
        if ws.any() or cnt.any():
            failures += 1
            log("FAIL split-K workspace not left zeroed")
    if DEVICE != "cuda" or only:
        log(f"check {only or 'all'}: {checked} runs, {failures} failures, {time.time() - t0:.0f} s")
        return failures
    # CUDA-graph replay of the public op on fresh inputs
    w = make("bipolar", 4099, 576, 3, torch.float16, gen)
    xs = torch.randn(1, 576, device="cuda", dtype=torch.float16, generator=gen)
    call(xs, w)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        og = call(xs, w)
    xs.copy_(torch.randn(1, 576, device="cuda", dtype=torch.float16, generator=gen))
    g.replay()
    torch.cuda.synchronize()
    e = rel(og, reference(xs, w))
    checked += 1
    if not e < tol[torch.float16]:
        failures += 1
        log(f"FAIL graph replay: {e:.2e}")
    log(f"check: {checked} runs, {failures} failures, {time.time() - t0:.0f} s")
    return failures


def check_mma(log, bits_list=range(1, 9)) -> int:
    """The tensor-core GEMV (`bitplane_mma`) against the fp32 reference -> failures: every candidate config on the
    first shape, two on the others, and the plain-Triton twin (mode 1) of the first, which must also agree with
    the PTX to rounding. Shapes: clamped row runs (N % 64 != 0, tiny N), a partial last K tile (576), one group
    per row, bias on some."""
    from bitsmith.kernels import bitplane as bp
    from bitsmith.kernels import bitplane_mma as bm
    from bitsmith.kernels import bitplane_mma_gemm as bg

    gen = torch.Generator(device=DEVICE).manual_seed(7)
    failures = checked = 0
    t0 = time.time()
    for bits in bits_list:
        for ci, (N, K, gs) in enumerate(((1000, 576, 128), (36, 1024, 1024), (4160, 2048, 256))):
            if SMOKE:
                N, K = min(N, 132), min(K, 384)
            w = make("bipolar", N, K, bits, torch.float16, gen, gs=gs)
            bias = torch.randn(N, device=DEVICE, generator=gen).half() if (bits + ci) % 2 else None
            x = torch.randn(1, K, device=DEVICE, dtype=torch.float16, generator=gen)
            ref = reference(x, w, bias)
            cfgs = bm.gemv_mma_configs(N, K, bits, w["group_size"], "bipolar", None, torch.float16, 132)
            plans = [dict(c, mode=1) for c in cfgs[:1]]
            if not SMOKE:
                plans += [dict(c, mode=2) for c in (cfgs[:3] + cfgs[-1:] if ci == 0 else cfgs[:1])]
            cfgk = bg.gemm_mma_configs(1, N, K, bits, w["group_size"], "bipolar", None, torch.float16)
            if SMOKE:  # its twin compiles for minutes on a GPU: interpreter only
                plans += [dict(c, mode=1) for c in cfgk[:1]]
            else:
                plans += [dict(c, mode=2) for c in (cfgk[:3] + cfgk[-1:] if ci == 0 else cfgk[:1])]
                # the f16x2 GEMV with its L2 prefetch (unrolled splits)
                plans += [c for c in bp.gemv_h2_configs(N, K, bits, w["group_size"], "bipolar", torch.float16, 132)
                          if c.get("prefetch")][:1 if ci else 3]
            outs = {}
            for cfg in plans:
                for M in ((1, 3, 16) if cfg["kernel"] == "mma_k" else (1,)):
                    xm = x if M == 1 else torch.randn(M, K, device=DEVICE, dtype=torch.float16, generator=gen)
                    refm = ref if M == 1 else reference(xm, w, bias)
                    if cfg.get("mode") == 1 and M > 1 and (SMOKE or ci > 0 or M > 8):  # twin at M = 3, shape 0
                        continue
                    out = call(xm, w, bias=bias, config=cfg, regime="gemv" if M == 1 else "gemm")
                    e = rel(out, refm)
                    checked += 1
                    if not e < 3e-3:
                        failures += 1
                        log(f"FAIL mma b{bits} N{N} K{K} g{gs} M{M} {cfg}: {e:.2e}")
                    if M == 1:
                        outs.setdefault(str(dict(cfg, mode=0)), []).append(out)
            for pair in outs.values():
                if len(pair) == 2:
                    d = rel(pair[1], pair[0].float())
                    checked += 1
                    if not d < 1e-3:
                        failures += 1
                        log(f"FAIL mma PTX vs twin b{bits} N{N} K{K}: {d:.2e}")
    log(f"check mma bits {list(bits_list)}: {checked} runs, {failures} failures, {time.time() - t0:.0f} s")
    return failures


# ------------------------------------------------------------------------------------------------ timing

def _save(rows):
    if OUT_DIR:
        from bitsmith.kernels import gwint_triton

        with open(os.path.join(OUT_DIR, "rows.json"), "w") as f:
            json.dump(rows, f, indent=1, default=str)
        with open(os.path.join(OUT_DIR, "tune.json"), "w") as f:  # every candidate the tuner timed, so far
            json.dump([dict(r, key=[str(k) for k in r["key"]]) for r in gwint_triton.TUNE_LOG
                       if "bitplane" in r["key"]], f, default=str)


def bench(log, rows: list[dict]) -> list[dict]:
    from bitsmith.kernels import bench as hb
    from bitsmith.kernels import bitplane as bp
    from bitsmith.kernels import gwint_triton

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.float16
    bw = hb.copy_bandwidth_gbs()
    log(f"device {torch.cuda.get_device_name()}, copy bandwidth {bw:.0f} GB/s")
    rows.append(dict(kernel="d2d-copy", GBs=bw))
    for N, K in SHAPES:
        base = hb.cublas_baseline(N, K, MS, dtype, gen, rows, log)

        def timed(label, kind, bits, M, fn_make, extra=None):
            try:
                _timed(label, kind, bits, M, fn_make, extra)
            except Exception as e:  # one failing row must not cost the rest of the run
                import traceback

                traceback.print_exc()
                log(f"{N}x{K} M={M} {label} b{bits}: FAILED {type(e).__name__}: {str(e)[:200]}")
                rows.append(dict(kernel=label, N=N, K=K, M=M, bits=bits, failed=f"{type(e).__name__}: {e}"))
                torch.cuda.empty_cache()

        def _timed(label, kind, bits, M, fn_make, extra=None):
            w0 = fn_make()
            R = hb.rotations(nbytes(w0))
            wsets = [w0] + [fn_make() for _ in range(R - 1)]
            xs = [torch.randn(M, K, device=device, dtype=dtype, generator=gen) for _ in range(R)]
            xc = torch.randn(M, K, device=device, dtype=dtype, generator=gen)
            cands = [c for _, c in _candidates(kind, bits, M, N, K)]
            out = call(xc, w0, candidates=cands, **(extra or {}))  # tunes once per shape
            err = rel(out, reference(xc, w0))
            us = hb.graph_time_us([lambda x=x, w=w: call(x, w, candidates=cands, **(extra or {}))
                                   for x, w in zip(xs, wsets)])
            key_m = ("gemv",) if M == 1 else ("gemm", 1 << (M - 1).bit_length())
            cfg = gwint_triton._TUNED.get(key_m + ("bitplane", kind, bits, G, False, False, dtype, N, K))
            if extra and extra.get("regime") == "dequant":
                cfg = "dequant+cublas"
            nb = nbytes(w0) + 2 * M * (K + N)
            row = dict(kernel=label, N=N, K=K, M=M, bits=bits, us=us, GBs=nb / us / 1e3, speedup=base[M] / us,
                       rel_err=err, config=cfg)
            rows.append(row)
            _save(rows)
            log(f"{N}x{K} M={M} {label} b{bits}: {us:.1f} us ({base[M] / us:.2f}x cuBLAS, {nb / us / 1e3:.0f} GB/s)"
                f" err {err:.1e} cfg {cfg}")
            del wsets
            torch.cuda.empty_cache()

        for bits in ((2, 3) if QUICK else BITS):
            for M in MS:
                timed("bipolar", "bipolar", bits, M, lambda: make("bipolar", N, K, bits, dtype, gen))
        if (N, K) == (8192, 8192) and not QUICK and "curve" not in SKIP:
            for bits in (b for b in range(1, 9) if b not in BITS):
                timed("bipolar", "bipolar", bits, 1, lambda: make("bipolar", N, K, bits, dtype, gen))
            if 128 in MS and "dequant" not in SKIP:
                timed("bipolar-dequant", "bipolar", 4, 128, lambda: make("bipolar", N, K, 4, dtype, gen),
                      dict(regime="dequant"))
        for M in (() if "bcq" in SKIP else MS):
            timed("bcq", "bcq", 3, M, lambda: make("bcq", N, K, 3, dtype, gen))
        # gemlite peers on gwint-layout weights of the same shape
        for gbits in (() if QUICK or "gemlite" in SKIP else (2, 4)):
            fmt = hb.GwintFormat(f"w{gbits}g128", gbits, 128)
            try:
                w0 = fmt.make(N, K, dtype, device, gen)
                R = hb.rotations(fmt.nbytes(w0))
                wsets = [w0] + [fmt.make(N, K, dtype, device, gen) for _ in range(R - 1)]
                made = [hb.gemlite_peer(fmt, w) for w in wsets]
                if made[0] is None:
                    raise RuntimeError("gemlite not importable")
                wf = hb.gwint.dequantize(w0["qweight"], w0["scales"], None, gbits, 128, K, dtype=torch.float32)
            except Exception as e:
                log(f"gemlite w{gbits} unavailable: {type(e).__name__}: {e}")
                continue
            for M in MS:
                try:
                    xs = [torch.randn(M, K, device=device, dtype=dtype, generator=gen) for _ in range(R)]
                    xc = torch.randn(M, K, device=device, dtype=dtype, generator=gen)
                    err = rel(made[0]["fn"](xc), xc.float() @ wf.t())
                    us = hb.graph_time_us([lambda x=x, m=m: m["fn"](x) for x, m in zip(xs, made)])
                except Exception as e:
                    log(f"gemlite w{gbits} M={M} failed: {type(e).__name__}: {e}")
                    continue
                nb = fmt.nbytes(w0) + 2 * M * (K + N)
                rows.append(dict(kernel="gemlite", N=N, K=K, M=M, bits=gbits, us=us, GBs=nb / us / 1e3,
                                 speedup=base[M] / us, rel_err=err))
                _save(rows)
                log(f"{N}x{K} M={M} gemlite w{gbits}: {us:.1f} us ({base[M] / us:.2f}x cuBLAS) err {err:.1e}")
            del wsets, made
            torch.cuda.empty_cache()
    rows.append(dict(kernel="tune-log", log=[dict(r, key=[str(k) for k in r["key"]])
                                             for r in gwint_triton.TUNE_LOG if "bitplane" in r["key"]]))
    return rows


def table(rows) -> str:
    base = {(r["N"], r["K"], r["M"]): r["us"] for r in rows if r["kernel"] == "cublas-fp16"}
    lines = ["| kernel | bits | N x K | M | us | x cuBLAS fp16 | GB/s | rel. err |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kernel"] in ("bipolar", "bcq", "gemlite", "bipolar-dequant") and "us" in r:
            lines.append(f"| {r['kernel']} | {r['bits']} | {r['N']}x{r['K']} | {r['M']} | {r['us']:.1f} |"
                         f" {r['speedup']:.2f} | {r['GBs']:.0f} | {r['rel_err']:.1e} |")
    lines.append("")
    lines.append("cuBLAS fp16 us: " + ", ".join(f"{n}x{k} M={m}: {u:.1f}" for (n, k, m), u in base.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/bitplane-bench")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--smoke", action="store_true", help="check only, tiny shapes, CPU interpreter")
    ap.add_argument("--quick", action="store_true", help="8192x8192, bipolar 2/3 and BCQ 3 only, 4 check cases")
    ap.add_argument("--ms", default="1,16,128", help="batch rows timed (the 1..8-bit curve is at M = 1)")
    ap.add_argument("--skip", default="", help="comma list of bcq, gemlite, dequant, curve: rows not timed")
    ap.add_argument("--shapes", default="", help="comma list of NxK (default 8192x8192,28672x8192)")
    ap.add_argument("--bits", default="2,3,4", help="bipolar widths of the main table")
    ap.add_argument("--check-cases", default="", help="comma list of check case indices (default all %d)" % N_CASES)
    args = ap.parse_args(argv)
    global DEVICE, SMOKE, OUT_DIR, QUICK, SHAPES, MS, SKIP, CASES, BITS
    MS = [int(m) for m in args.ms.split(",")]
    BITS = tuple(int(b) for b in args.bits.split(","))
    if args.shapes:
        SHAPES = [tuple(int(v) for v in sh.split("x")) for sh in args.shapes.split(",")]
    SKIP = {k for k in args.skip.split(",") if k}
    CASES = tuple(int(c) for c in args.check_cases.split(",")) if args.check_cases else None
    OUT_DIR = args.out
    if args.quick:
        QUICK, SHAPES = True, SHAPES[:1]
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        DEVICE, SMOKE, args.no_bench = "cpu", True, True
    os.makedirs(args.out, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    t0 = time.time()
    failures = 0
    parallel = not args.no_bench and args.workers > 1
    if parallel:
        failures = warm(log, args.workers, with_check=not args.no_check)
    if not args.no_check and not parallel:
        try:
            failures = check(log) + check_mma(log, (2, 3) if SMOKE else range(1, 9))
        except Exception:
            import traceback

            traceback.print_exc()
            failures = 1
    rows: list[dict] = []
    if not args.no_bench:
        try:
            bench(log, rows)
        except Exception:
            import traceback

            traceback.print_exc()
    with open(os.path.join(args.out, "rows.json"), "w") as f:
        json.dump(rows, f, indent=1, default=str)
    if rows:
        t = table(rows)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(t + "\n")
        print(t)
    log(f"total {time.time() - t0:.0f} s, check failures: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
