"""Short H100 call for the bit-plane M = 1 GEMVs: the "deep" f16x2 GEMV (`launch_gemv_deep`: a program owns a
narrow column block and the whole K, no split-K epilogue where N allows) against the split-K f16x2 GEMV, in
phases each in its own process under a time limit (`bitsmith.kernels.bench_phases`):

  compile  every timed variant and tuner candidate, in worker processes (fills Triton's on-disk cache)
  time     fp16 cuBLAS, then each pinned variant timed as the harness times (`bench.graph_time_us`: CUDA graph over
           rotated weight sets > 3x L2, median replay), checked against the reference; then the public op tuned
           over the f16x2 and deep candidates (`gemv_candidates`' h2 part), and which one the tuner picked
  check    the deep kernel's PTX on awkward shapes, bits 1..8, bipolar and BCQ, against the fp32 dequantized
           reference, and bit for bit against its plain-Triton twin (mode 1) at one split; split-K workspaces
           left zeroed. One worker task per (kind, bits); last, so that a slow check cannot cost the timings

    PYTHONPATH=src timeout -s TERM 570 python3 benchmarks/bitplane_deep_bench.py --out $OUT --workers 15 \
        --budget 555 2>&1 | tee $OUT/log.txt
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/bitplane_deep_bench.py --smoke --out /tmp/x   # CPU flow

Weights are synthetic (random planes and scales of the real shapes, g = 128, fp16 activations).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

SHAPES = [(8192, 8192), (28672, 8192)]  # (N, K)
TIME_BITS = (2, 3, 4)
CURVE = False  # --curve: bits 1..8 at 8192x8192 with the variants named in --curve-variants
SMOKE = False
BCQ_ROWS = False  # --bcq: BCQ 3-bit rows tuned over the f16x2 and deep candidates
PINNED = None  # --pinned: the pinned variants timed (None: all)
CHECK_TASKS = None  # --check-tasks: [(kind, bits)] (None: all 16)
T0 = float(os.environ.get("BITSMITH_BENCH_T0", time.time()))


def log(msg: str) -> None:
    print(f"[{time.time() - T0:5.0f} s] {msg}", flush=True)


def _device():
    return "cpu" if SMOKE else "cuda"


def _h2(bn, unroll=0, warps=4, split=0):
    c = dict(kernel="h2", block_n=bn, block_kw=1, num_warps=warps)
    c.update(dict(unroll=unroll) if unroll else dict(split_k=split))
    return c


def _deep(bn, rows, warps=4, depth=1, merge=1, xpair=1, split=1, pair=0, maxnreg=0, wide=0):
    c = dict(kernel="deep", block_n=bn, rows=rows, num_warps=warps, depth=depth, split_k=split)
    if wide:  # chunk and xs of `bitplane.H2_WIDE` (set per width in `_with_chunk`)
        c["wide"] = 1
    if pair:
        c["pair"] = 1
    if maxnreg:
        c["maxnreg"] = maxnreg
    if merge:
        c["merge"] = 1
    if not xpair:
        c["xpair"] = 0
    return c


# (name, config, shapes it runs at (None: all)); split-K f16x2 rows are the tuner's earlier choices. Call 1
# (e439995) timed 64x16, 32x32 (+ d2, unmerged, x16), 64x16 d2 / s1, 128x8, 64x32 w8, 16x64; call 2 the rest
# (call 2, 86fb383: pf = an L2 prefetch that many tiles ahead, removed since; call 4, 91296ed: pair, maxnreg,
# splits; call 6: wide chunks, 2^-xs weights)
DEEP = [("deep 16x64", lambda N: _deep(16, 64), None),
        ("deep 32x32", lambda N: _deep(32, 32), None),
        ("deep 32x16", lambda N: _deep(32, 16), None),
        ("deep 16x32", lambda N: _deep(16, 32), None),
        ("deep 32x32 w8", lambda N: _deep(32, 32, warps=8), None),
        ("deep 32x32 w8 pair", lambda N: _deep(32, 32, warps=8, pair=1), None),
        ("deep 16x64 wide", lambda N: _deep(16, 64, wide=1), None),
        ("deep 32x32 wide", lambda N: _deep(32, 32, wide=1), None),
        ("deep 32x16 wide", lambda N: _deep(32, 16, wide=1), None),
        ("deep 16x32 wide", lambda N: _deep(16, 32, wide=1), None),
        ("deep 32x32 w8 wide", lambda N: _deep(32, 32, warps=8, wide=1), None),
        ("deep 32x32 w8 pair wide", lambda N: _deep(32, 32, warps=8, pair=1, wide=1), None)]
OLD = {2: [("h2 1024 u4", _h2(1024, 4), None)],
       3: [("h2 1024 u2", _h2(1024, 2), None)],
       4: [("h2 1024 u2", _h2(1024, 2), None), ("h2 1024 s66", _h2(1024, split=66), (8192,))]}
CURVE_VARIANTS = ("deep 16x32", "deep 32x16")
FEW = None  # 4 bits: every variant
READ = [(16, 64, 4), (32, 32, 4), (16, 32, 4), (64, 16, 4)]  # read-only probes of the deep grid: (cols, rows, warps)


def _with_chunk(cfg, bits):
    from bitsmith.kernels import bitplane as bp

    c = dict(cfg, chunk=bp.h2_chunk(bits)) if cfg["kernel"] in ("h2", "deep") else dict(cfg)
    if c.pop("wide", 0) and bits in bp.H2_WIDE:
        c["chunk"], c["xs"] = bp.H2_WIDE[bits]
    return c


def time_plans(shapes):
    """[(N, K, bits, name, cfg)] in timing order."""
    from bitsmith.kernels import bitplane as bp

    out = []
    for N, K in shapes:
        for bits in TIME_BITS[:1] if SMOKE else TIME_BITS:
            for name, cfg, only in OLD[bits] + DEEP:
                if SMOKE and name not in ("h2 1024 u4", "deep 32x32"):
                    continue
                if bits > 3 and FEW is not None and name not in FEW or PINNED is not None and name not in PINNED:
                    continue
                if only is None or N in only or SMOKE:
                    cfg = cfg(N) if callable(cfg) else cfg
                    out.append((N, K, bits, name, _with_chunk(cfg, bits)))
    if CURVE:
        N, K = shapes[0]
        for bits in range(1, 9):
            if bits in TIME_BITS:
                continue
            for name, cfg, _ in DEEP:
                if name in CURVE_VARIANTS and (PINNED is None or name in PINNED):
                    cfg = cfg(N) if callable(cfg) else cfg
                    out.append((N, K, bits, name, _with_chunk(cfg, bits)))
    return out


def _tuned_bits(N):
    return tuple(range(1, 9)) if CURVE and N == _shapes()[0][0] else TIME_BITS


def _shapes():
    return [(256, 512)] if SMOKE else SHAPES


def _write(path, obj):
    from bitsmith.kernels.bench_phases import write_json

    write_json(path, obj)


def _pool_init(smoke):
    global SMOKE
    SMOKE = smoke
    import bitplane_kernels

    bitplane_kernels.DEVICE = _device()


def _pool(workers):
    return mp.get_context("spawn").Pool(workers, initializer=_pool_init, initargs=(SMOKE,))


# ------------------------------------------------------------------------------------------------ compile phase

def _tuned_candidates(N, K, bits, kind="bipolar"):
    """The f16x2 part of `gemv_candidates` (split-K f16x2 GEMV and deep GEMV configurations)."""
    import torch

    from bitsmith.kernels import bitplane as bp

    sms = 132
    return (bp.gemv_h2_configs(N, K, bits, 128, kind, torch.float16, sms)
            + bp.gemv_deep_configs(N, K, bits, 128, kind, torch.float16, sms))


def _compile_task(plan):
    import torch

    from bitplane_kernels import call, make

    N, K, bits, name, cfg = plan
    t = time.time()
    try:
        gen = torch.Generator(device=_device()).manual_seed(0)
        w = make("bcq" if name.endswith("bcq") else "bipolar", N, K, bits, torch.float16, gen)
        x = torch.randn(1, K, device=_device(), dtype=torch.float16, generator=gen)
        call(x, w, config=cfg, regime="gemv")
        if not SMOKE:
            torch.cuda.synchronize()
        return plan, None, time.time() - t
    except Exception as e:
        return plan, f"{type(e).__name__}: {str(e)[:300]}", time.time() - t


def phase_compile(args):
    shapes = _shapes()
    seen, tasks = set(), []
    plans = time_plans(shapes)
    if not SMOKE:  # the tuner's candidates too (the tuned row)
        for N, K in shapes:
            for bits in _tuned_bits(N):
                plans += [(N, K, bits, "tuner", c) for c in _tuned_candidates(N, K, bits)]
            if BCQ_ROWS:
                plans += [(N, K, 3, "tuner bcq", c) for c in _tuned_candidates(N, K, 3, "bcq")]
    for N, K, bits, name, cfg in plans:
        key = (bits, name.endswith("bcq"), json.dumps(cfg, sort_keys=True))
        if key not in seen:
            seen.add(key)
            tasks.append((shapes[0][0], shapes[0][1], bits, name, cfg))
    log(f"compile: {len(tasks)} variants in {args.workers} processes")
    res = []
    with _pool(args.workers) as pool:
        for i, (plan, err, dt) in enumerate(pool.imap_unordered(_compile_task, tasks)):
            N, K, bits, name, _ = plan
            res.append(dict(bits=bits, kernel=name, config=plan[4], error=err, seconds=round(dt, 1)))
            if err or i % 10 == 0 or i + 1 == len(tasks):
                log(f"compile {i + 1}/{len(tasks)}: {name} b{bits} {dt:.0f} s" + (f" FAILED {err}" if err else ""))
            _write(os.path.join(args.out, "compile.json"), res)
    log(f"compile: {sum(r['error'] is None for r in res)} of {len(tasks)} ok")
    return 0


# ------------------------------------------------------------------------------------------------ check phase

CHECK = [(4099, 576, 128), (37, 200, 64), (1000, 608, 32)]  # odd N + partial last group; K % 32 != 0; g32
CHECK_CFGS = [dict(kernel="deep", block_n=64, rows=16, num_warps=4, depth=1, split_k=1, merge=1),
              dict(kernel="deep", block_n=32, rows=8, num_warps=4, depth=2, split_k=3, merge=1, xpair=0),
              dict(kernel="deep", block_n=32, rows=4, num_warps=4, depth=1, split_k=1, merge=1, pair=1),
              dict(kernel="deep", block_n=32, rows=8, num_warps=4, depth=1, split_k=1, merge=1, wide=1)]
TWIN_CFGS = (0, 3)  # check configs also run as the plain-Triton twin (bit for bit against the PTX)


def _check_task(task):
    """Worker: the deep GEMV for one (kind, bits) on every check shape -> rows."""
    import faulthandler

    import torch

    from bitplane_kernels import call, make, reference, rel
    from bitsmith.kernels import bitplane as bp
    from bitsmith.kernels import gwint_triton

    kind, bits = task
    faulthandler.dump_traceback_later(120, exit=False)
    rows = []
    chunk = bp.h2_chunk(1 if kind == "bcq" else bits)
    try:
        gen = torch.Generator(device=_device()).manual_seed(300 + 10 * bits + (kind == "bcq"))
        with_bias, with_off = bits % 2 == 1, kind == "bipolar" and bits % 3 == 0
        for N, K, gs in ([(40, 200, 64)] if SMOKE else CHECK):
            w = make(kind, N, K, bits, torch.float16, gen, offset=with_off, gs=gs)
            bias = torch.randn(N, device=_device(), generator=gen).half() if with_bias else None
            x = torch.randn(1, K, device=_device(), dtype=torch.float16, generator=gen)
            ref = reference(x, w, bias)
            outs = {}
            for ci, cfg in enumerate(CHECK_CFGS):
                if ci == 3 and kind == "bcq":  # wide chunks are bipolar only
                    continue
                for mode in ((2, 1) if ci in TWIN_CFGS and not SMOKE else (1,) if SMOKE else (2,)):
                    c = _with_chunk(dict(cfg, mode=mode), 1 if kind == "bcq" else bits)
                    out = call(x, w, bias=bias, config=c, regime="gemv")
                    e = rel(out, ref)
                    rows.append(dict(kind=kind, bits=bits, N=N, K=K, g=gs, config=c, bias=with_bias, offset=with_off,
                                     rel_err=e, ok=bool(e < 3e-3)))
                    if ci in TWIN_CFGS:
                        outs[(ci, mode)] = out
            if kind == "bcq" and bits >= 5 and not SMOKE:  # call 1: the twin (mode 1) failed here on the GPU
                for extra in (dict(CHECK_CFGS[0], block_n=16, rows=32), dict(CHECK_CFGS[0], num_warps=8)):
                    c = dict(extra, chunk=chunk, mode=1)
                    e = rel(call(x, w, bias=bias, config=c, regime="gemv"), ref)
                    rows.append(dict(kind=kind, bits=bits, N=N, K=K, g=gs, config=c, bias=with_bias, offset=with_off,
                                     rel_err=e, ok=bool(e < 3e-3)))
            for ci in TWIN_CFGS:
                if (ci, 1) in outs and (ci, 2) in outs:
                    a, b = outs[(ci, 1)], outs[(ci, 2)]
                    rows.append(dict(kind=kind, bits=bits, N=N, K=K, g=gs, check="PTX == twin", config_index=ci,
                                     ok=bool(torch.equal(a, b)), max_diff=(a.float() - b.float()).abs().max().item()))
        for ws, cnt in gwint_triton._WORKSPACES.values():
            if ws.any() or cnt.any():
                rows.append(dict(kind=kind, bits=bits, ok=False, error="workspace not left zeroed"))
    except Exception as e:
        rows.append(dict(kind=kind, bits=bits, ok=False, error=f"{type(e).__name__}: {str(e)[:300]}"))
    finally:
        faulthandler.cancel_dump_traceback_later()
    return task, rows


def phase_check(args):
    tasks = CHECK_TASKS or [(k, b) for b in ((2, 3) if SMOKE else range(8, 0, -1)) for k in ("bipolar", "bcq")]
    log(f"check: {len(tasks)} tasks (kind, bits) in {args.workers} processes")
    rows, bad = [], 0
    with _pool(args.workers) as pool:
        for i, (task, trows) in enumerate(pool.imap_unordered(_check_task, tasks)):
            fails = [r for r in trows if not r["ok"]]
            bad += len(fails)
            rows += trows
            worst = max((r["rel_err"] for r in trows if "rel_err" in r), default=float("nan"))
            log(f"check {i + 1}/{len(tasks)}: {task[0]} b{task[1]}: {len(trows)} runs, worst rel err {worst:.1e}"
                + "".join(f"\n    FAIL {r}" for r in fails))
            _write(os.path.join(args.out, "check.json"), rows)
    log(f"check: {len(rows)} runs, {bad} failures")
    return 1 if bad else 0


# ------------------------------------------------------------------------------------------------ read probe

_READ_KERNEL = None


def _read_kernel():
    """A read-only kernel with the deep GEMV's grid, loads and loop (its `_deep_words`, the next tile loaded before
    the current one is consumed), xoring the words instead of the arithmetic; one int32 per column and split out."""
    global _READ_KERNEL, _bp
    if _READ_KERNEL is None:
        import triton
        import triton.language as tl

        from bitsmith.kernels import bitplane as _bp  # a module global: the jit function below resolves it there

        @triton.jit
        def _deep_read_kernel(pl_ptr, out_ptr, N, KW, k_iters, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                              ROWS: tl.constexpr):
            pid_n = tl.program_id(0)
            pid_k = tl.program_id(1)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            rw = tl.arange(0, ROWS)
            kw_begin = pid_k * k_iters * ROWS
            kw_end = tl.minimum(kw_begin + k_iters * ROWS, KW)
            acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.int32)
            w0, w1, w2, w3, w4, w5, w6, w7 = _bp._deep_words(pl_ptr, kw_begin, kw_end, rw, offs_n, n_mask, KW, N,
                                                             BITS)
            for it in range(k_iters):
                u0, u1, u2, u3, u4, u5, u6, u7 = _bp._deep_words(pl_ptr, kw_begin + (it + 1) * ROWS, kw_end, rw,
                                                                 offs_n, n_mask, KW, N, BITS)
                acc = acc ^ w0 ^ w1 ^ w2 ^ w3 ^ w4 ^ w5 ^ w6 ^ w7
                w0, w1, w2, w3, w4, w5, w6, w7 = u0, u1, u2, u3, u4, u5, u6, u7
            tl.store(out_ptr + pid_k * N + offs_n, tl.sum(acc, axis=0), mask=n_mask)

        _READ_KERNEL = _deep_read_kernel
    return _READ_KERNEL


def read_probe_us(N, K, bits, bn, rows, warps, split, gen):
    """Graph-timed read of `bits` plane-word tensors [bits, KW, N] with the deep grid (rotated sets > 3x L2)."""
    import torch

    from bitsmith.kernels import bench as hb
    from bitsmith.kernels import bitplane as bp

    KW = bp.num_words(K)
    k_tiles = -(-KW // rows)
    k_iters = -(-k_tiles // split)
    nb = bits * KW * N * 4
    sets = [torch.randint(-2**31, 2**31 - 1, (bits, KW, N), dtype=torch.int32, device="cuda", generator=gen)
            for _ in range(hb.rotations(nb))]
    out = torch.empty((split, N), dtype=torch.int32, device="cuda")
    k = _read_kernel()
    grid = (-(-N // bn), split)

    def go(p):
        k[grid](p, out, N, KW, k_iters, BITS=bits, BLOCK_N=bn, ROWS=rows, num_warps=warps, num_stages=1)

    go(sets[0])
    torch.cuda.synchronize()
    us = hb.graph_time_us([lambda p=p: go(p) for p in sets])
    del sets
    torch.cuda.empty_cache()
    return us, nb


# ------------------------------------------------------------------------------------------------ time phase

def phase_time(args):
    import torch

    from bitplane_kernels import call, make, nbytes, reference, rel
    from bitsmith.kernels import gwint_triton

    rows = []
    path = os.path.join(args.out, "time.json")
    shapes = _shapes()
    dev = _device()
    gen = torch.Generator(device=dev).manual_seed(1)
    base = {}
    plans = time_plans(shapes)
    if not SMOKE:
        plans += [(N, K, bits, "tuned", None) for N, K in shapes for bits in _tuned_bits(N)]
        plans += [(N, K, 3, "tuned bcq", None) for N, K in shapes] if BCQ_ROWS else []
    for N, K, bits, name, cfg in plans:
        if (N, K) not in base:
            if SMOKE:
                base[(N, K)] = 1.0
            else:
                from bitsmith.kernels import bench as hb

                base[(N, K)] = hb.cublas_baseline(N, K, (1,), torch.float16, gen, rows, log)[1]
            _write(path, rows)
        try:
            kind = "bcq" if name.endswith("bcq") else "bipolar"
            w0 = make(kind, N, K, bits, torch.float16, gen)
            xc = torch.randn(1, K, device=dev, dtype=torch.float16, generator=gen)
            kw = (dict(config=cfg, regime="gemv") if cfg is not None
                  else dict(candidates=_tuned_candidates(N, K, bits, kind)))
            err = rel(call(xc, w0, **kw), reference(xc, w0))
            picked = None
            if cfg is None:
                picked = gwint_triton._TUNED.get(("gemv", "bitplane", kind, bits, 128, False, False,
                                                  torch.float16, N, K))
            if SMOKE:
                t = time.time()
                call(xc, w0, **kw)
                us = (time.time() - t) * 1e6
            else:
                from bitsmith.kernels import bench as hb

                R = hb.rotations(nbytes(w0))
                ws = [w0] + [make(kind, N, K, bits, torch.float16, gen) for _ in range(R - 1)]
                xs = [torch.randn(1, K, device=dev, dtype=torch.float16, generator=gen) for _ in range(R)]
                us = hb.graph_time_us([lambda x=x, w=w: call(x, w, **kw) for x, w in zip(xs, ws)])
                del ws, xs
                torch.cuda.empty_cache()
            nb = nbytes(w0) + 2 * (K + N)
            rows.append(dict(kind="time", kernel=name, config=cfg or picked, N=N, K=K, M=1, bits=bits, us=us,
                             speedup=base[(N, K)] / us, GBs=nb / us / 1e3, rel_err=err))
            log(f"{N}x{K} b{bits} {name}: {us:.1f} us ({base[(N, K)] / us:.2f}x cuBLAS, {nb / us / 1e3:.0f} GB/s) "
                f"err {err:.1e}" + (f" picked {picked}" if cfg is None else ""))
        except Exception as e:
            rows.append(dict(kind="time", kernel=name, N=N, K=K, M=1, bits=bits, failed=f"{type(e).__name__}: {e}"))
            log(f"{N}x{K} b{bits} {name}: FAILED {type(e).__name__}: {str(e)[:200]}")
        _write(path, rows)
    if not SMOKE:  # the read-only probes of the deep grid (bytes = plane words only)
        for N, K in shapes:
            for bits in TIME_BITS:
                for bn, rws, warps in READ:
                    try:
                        split = 2 if (N, bn) == (8192, 64) else 1
                        us, nb = read_probe_us(N, K, bits, bn, rws, warps, split, gen)
                        rows.append(dict(kind="read", N=N, K=K, bits=bits, block_n=bn, rows=rws, num_warps=warps,
                                         split_k=split, us=us, bytes=nb, GBs=nb / us / 1e3))
                        log(f"{N}x{K} b{bits} read {bn}x{rws} w{warps} s{split}: {us:.1f} us ({nb / us / 1e3:.0f} GB/s"
                            f" of plane words)")
                    except Exception as e:
                        log(f"{N}x{K} b{bits} read {bn}x{rws}: FAILED {type(e).__name__}: {str(e)[:200]}")
                    _write(path, rows)
        rows.append(dict(kind="tune-log", log=[dict(r, key=[str(k) for k in r["key"]]) for r in gwint_triton.TUNE_LOG
                                               if "bitplane" in r["key"]]))
        _write(path, rows)
    log("time: done")
    return 0


# ------------------------------------------------------------------------------------------------ supervisor

def summary(out_dir) -> str:
    def load(name):
        try:
            with open(os.path.join(out_dir, name)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return []

    lines = ["| N x K | bits | kernel | us | x cuBLAS | GB/s | rel err |", "|---|---|---|---|---|---|---|"]
    for r in load("time.json"):
        if r.get("kind") == "time" and "us" in r:
            lines.append(f"| {r['N']}x{r['K']} | {r['bits']} | {r['kernel']} | {r['us']:.1f} | {r['speedup']:.2f}"
                         f" | {r['GBs']:.0f} | {r['rel_err']:.1e} |")
        elif r.get("kind") == "read":
            lines.append(f"| {r['N']}x{r['K']} | {r['bits']} | read {r['block_n']}x{r['rows']} w{r['num_warps']}"
                         f" s{r['split_k']} | {r['us']:.1f} | | {r['GBs']:.0f} | |")
        elif r.get("kernel") == "cublas-fp16":
            lines.append(f"| {r['N']}x{r['K']} | 16 | cuBLAS fp16 | {r['us']:.1f} | 1.00 | | |")
    c = load("check.json")
    if c:
        fails = [r for r in c if not r["ok"]]
        worst = max((r["rel_err"] for r in c if "rel_err" in r), default=float("nan"))
        lines.append(f"check: {len(c)} runs, {len(fails)} failures, worst rel err {worst:.1e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    global SMOKE, TIME_BITS, CURVE, SHAPES, PINNED, CHECK_TASKS, BCQ_ROWS
    from bitsmith.kernels import bench_phases

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_phases.add_arguments(ap, "out/bitplane-deep", 550, "compile=220,time=240,check=120")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--shapes", default="")
    ap.add_argument("--curve", action="store_true", help="also bits 1..8 at the first shape (two deep variants)")
    ap.add_argument("--bcq", action="store_true", help="also BCQ 3-bit, tuned over the f16x2 and deep candidates")
    ap.add_argument("--pinned", default="", help="comma list of the pinned variants to time (default: all)")
    ap.add_argument("--check-tasks", default="", help="comma list of kind:bits check tasks (default: all 16)")
    args = ap.parse_args(argv)
    SMOKE = args.smoke
    TIME_BITS = tuple(int(b) for b in args.bits.split(","))
    CURVE = args.curve
    BCQ_ROWS = args.bcq
    PINNED = tuple(p for p in args.pinned.split(",") if p) or None
    CHECK_TASKS = [(t.split(":")[0], int(t.split(":")[1])) for t in args.check_tasks.split(",") if t] or None
    if args.shapes:
        SHAPES = [tuple(int(v) for v in sh.split("x")) for sh in args.shapes.split(",")]
    if SMOKE:
        os.environ["TRITON_INTERPRET"] = "1"
    os.makedirs(args.out, exist_ok=True)
    own = list(argv if argv is not None else sys.argv[1:])
    phase_fns = {"compile": phase_compile, "time": phase_time, "check": phase_check}
    return bench_phases.dispatch(__file__, args, own, phase_fns, _set_device, summary, log, T0)


def _set_device() -> None:
    import bitplane_kernels  # after `arm()`: an import that stalls is then dumped too

    bitplane_kernels.DEVICE = _device()


if __name__ == "__main__":
    sys.exit(main())
