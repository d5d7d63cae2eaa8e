"""Short H100 call for the bit-plane M = 1 / 16 kernel variants, in phases, each in its own process under a time
limit (`bitsmith.kernels.bench_phases`): a phase that stalls is killed with its workers after its Python stacks
are printed, and the next phase runs, so a call always comes back with what it measured.

  compile  every timed variant's kernels, in parallel worker processes (fills Triton's on-disk cache)
  time     bandwidth ceilings at each M = 1 target's bytes (read-only stream, torch sum, copy:
           `bitsmith.kernels.stream`), fp16 cuBLAS, then each pinned variant timed as the harness times
           (`bench.graph_time_us`: CUDA graph over rotated weight sets > 3x L2, median replay), each checked
           against the fp32 dequantized reference
  check    the PTX of both tensor-core kernels (`mma` M = 1 GEMV, `mma_k` M <= 16) on awkward shapes, bits 1..8,
           against the fp32 reference; one worker task per (kernel, config, bits), compiled and run in the worker

    PYTHONPATH=src python3 benchmarks/bitplane_mma_bench.py --out $OUT --workers 15 --budget 285 2>&1 | tee $OUT/log.txt
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/bitplane_mma_bench.py --smoke --out /tmp/x   # CPU flow test

Every phase prints a progress line per step and rewrites its JSON file after each row. Weights are synthetic
(random planes and scales of the real shapes, g = 128, fp16 activations).

Why phases: the previous version compiled in a worker pool, then ran the check in the main process, and twice on
the H100 printed "compiled 36 of 36 plans" and nothing more until its limit (docs/results/bitplane.md); the cause
was not found (no stack was printed). Here the check runs in workers, as `bitplane_kernels.check_mma` did on the
H100 without trouble, and last, after the timings; any stall is now bounded and leaves its stacks in the log.
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
CHECK = [(1000, 576, 128), (36, 1024, 1024), (4160, 2048, 256)]  # (N, K, group): partial tile, one group, g256
TIME_BITS = (2, 3)
SMOKE = False
T0 = float(os.environ.get("BITSMITH_BENCH_T0", time.time()))  # the supervisor's start: one clock in every log line


def log(msg: str) -> None:
    print(f"[{time.time() - T0:5.0f} s] {msg}", flush=True)


def _h2(bn, unroll=0, warps=4, split=0, pf=0):
    c = dict(kernel="h2", block_n=bn, block_kw=1, num_warps=warps)
    c.update(dict(unroll=unroll) if unroll else dict(split_k=split))
    return dict(c, prefetch=1) if pf else c


def _mma(kernel, warps, unroll, pf=1):
    return dict(kernel=kernel, num_warps=warps, unroll=unroll, merge=1, prefetch=pf)


def _swapped(split):
    return dict(kernel="swapped", block_m=16, block_n=64, block_kw=16, num_warps=4, num_stages=2, join=0, xperm=1,
                group_m=8, split_k=split, mode=1)


# (name, config, shapes it runs at (None: all)). The tuner's choices of the earlier sessions are "default" below.
M1 = {
    2: [("h2 1024 u4", _h2(1024, 4), None), ("h2 1024 u4 pf", _h2(1024, 4, pf=1), None),
        ("h2 512 u4", _h2(512, 4), None), ("h2 512 u4 pf", _h2(512, 4, pf=1), None),
        ("h2 1024 u8 pf", _h2(1024, 8, pf=1), None), ("h2 1024 w8 u4 pf", _h2(1024, 4, warps=8, pf=1), None),
        ("mma u2", _mma("mma", 4, 2, 0), None), ("mma u2 pf", _mma("mma", 4, 2), None),
        ("mma u4 pf", _mma("mma", 4, 4), None)],
    3: [("h2 1024 s66", _h2(1024, split=66), (8192,)), ("h2 1024 u2", _h2(1024, 2), None),
        ("h2 1024 u2 pf", _h2(1024, 2, pf=1), None), ("h2 1024 u4", _h2(1024, 4), None),
        ("h2 1024 u4 pf", _h2(1024, 4, pf=1), None), ("h2 512 u4 pf", _h2(512, 4, pf=1), None),
        ("mma u2", _mma("mma", 4, 2, 0), None), ("mma u2 pf", _mma("mma", 4, 2), None),
        ("mma u4 pf", _mma("mma", 4, 4), None)],
}
DEFAULT_M1 = {(8192, 2): "h2 1024 u4", (28672, 2): "h2 512 u4", (8192, 3): "h2 1024 s66", (28672, 3): "h2 1024 u2"}
M16 = [("swapped s4", _swapped(4), (8192,)), ("swapped s2", _swapped(2), (28672,)),
       ("mma_k 4x2 pf", _mma("mma_k", 4, 2), None), ("mma_k 4x4 pf", _mma("mma_k", 4, 4), None),
       ("mma_k 2x4 pf", _mma("mma_k", 2, 4), None), ("mma_k 8x2 pf", _mma("mma_k", 8, 2), None),
       ("mma_k 4x1 pf", _mma("mma_k", 4, 1), None), ("mma_k 4x2", _mma("mma_k", 4, 2, 0), None)]
DEFAULT_M16 = {8192: "swapped s4", 28672: "swapped s2"}


def _device():
    return "cpu" if SMOKE else "cuda"


def time_plans(shapes):
    """[(N, K, bits, M, name, cfg)] in timing order: M = 1 rows, then M = 16 rows, per shape."""
    from bitsmith.kernels import bitplane as bp

    out = []
    smoke_names = ("h2 1024 u4 pf", "mma u2 pf", "swapped s4", "mma_k 4x2 pf")  # --smoke: one of each kernel
    for N, K in shapes:
        for bits in TIME_BITS[:1] if SMOKE else TIME_BITS:
            for name, cfg, only in M1[bits]:
                if (only is None or N in only) if not SMOKE else name in smoke_names:
                    cfg = dict(cfg, chunk=bp.h2_chunk(bits)) if cfg["kernel"] == "h2" else cfg
                    out.append((N, K, bits, 1, name, cfg))
        for bits in TIME_BITS[:1] if SMOKE else TIME_BITS:
            for name, cfg, only in M16:
                if (only is None or N in only) if not SMOKE else name in smoke_names:
                    out.append((N, K, bits, 16, name, cfg))
    return out


def _shapes():
    return [(256, 512)] if SMOKE else SHAPES


def _checks():
    return [(100, 300, 128), (36, 256, 256)] if SMOKE else CHECK


def _write(path, obj):
    from bitsmith.kernels.bench_phases import write_json

    write_json(path, obj)


# ------------------------------------------------------------------------------------------------ compile phase

def _compile_task(plan):
    """Worker: run one variant once at the first shape (same specialisation as its timed use) -> (plan, error)."""
    import torch

    from bitplane_kernels import call, make

    N, K, bits, M, name, cfg = plan
    t = time.time()
    try:
        gen = torch.Generator(device=_device()).manual_seed(0)
        w = make("bipolar", N, K, bits, torch.float16, gen)
        x = torch.randn(M, K, device=_device(), dtype=torch.float16, generator=gen)
        call(x, w, config=cfg, regime="gemv" if M == 1 else "gemm")
        if not SMOKE:
            torch.cuda.synchronize()
        return plan, None, time.time() - t
    except Exception as e:
        return plan, f"{type(e).__name__}: {str(e)[:300]}", time.time() - t


def _pool_init(smoke):
    global SMOKE
    SMOKE = smoke
    import bitplane_kernels

    bitplane_kernels.DEVICE = _device()


def _pool(workers):
    return mp.get_context("spawn").Pool(workers, initializer=_pool_init, initargs=(SMOKE,))


def phase_compile(args):
    shapes = _shapes()
    # one task per distinct (kernel config, bits, M) at the first shape; shape-only variants at their shape
    seen, tasks = set(), []
    for N, K, bits, M, name, cfg in time_plans(shapes):
        key = (bits, M, json.dumps(cfg, sort_keys=True))
        if key not in seen:
            seen.add(key)
            tasks.append((N, K, bits, M, name, cfg))
    log(f"compile: {len(tasks)} variants in {args.workers} processes")
    res = []
    with _pool(args.workers) as pool:
        for i, (plan, err, dt) in enumerate(pool.imap_unordered(_compile_task, tasks)):
            N, K, bits, M, name, _ = plan
            res.append(dict(N=N, K=K, bits=bits, M=M, kernel=name, error=err, seconds=round(dt, 1)))
            log(f"compile {i + 1}/{len(tasks)}: {name} b{bits} M={M} {N}x{K} {dt:.0f} s"
                + (f" FAILED {err}" if err else ""))
            _write(os.path.join(args.out, "compile.json"), res)
    log(f"compile: {sum(r['error'] is None for r in res)} of {len(tasks)} ok")
    return 0


# ------------------------------------------------------------------------------------------------ time phase

def target_bytes(N, K, bits, g=128):
    """Bytes an M = 1 call must read: planes (int32 words) + fp16 scales (+ x and out, fp16)."""
    from bitsmith.kernels import bitplane as bp

    return bits * bp.num_words(K) * N * 4 + bp.num_groups(K, g) * N * 2 + 2 * (K + N)


def phase_time(args):
    import torch

    from bitplane_kernels import call, make, nbytes, reference, rel
    from bitsmith.kernels import stream

    rows = []
    path = os.path.join(args.out, "time.json")
    shapes = _shapes()
    dev = _device()
    gen = torch.Generator(device=dev).manual_seed(1)
    if SMOKE:  # the flow only: one read-stream call checked, one plain call per variant
        x = torch.randint(-2**31, 2**31 - 1, (5000,), dtype=torch.int32)
        ok = torch.equal(stream.read_words(x, 256, 4, 4), stream.xor_reference(x, 1024))
        rows.append(dict(kind="stream-smoke", ok=ok))
        log(f"stream smoke: {'ok' if ok else 'WRONG'}")
    else:
        from bitsmith.kernels import bench as hb

        bw = hb.copy_bandwidth_gbs()
        rows.append(dict(kind="d2d-copy-1GiB", GBs=bw))
        log(f"device {torch.cuda.get_device_name()}, copy bandwidth (1 GiB) {bw:.0f} GB/s")
        for N, K in shapes:
            for bits in TIME_BITS:
                nb = target_bytes(N, K, bits)
                r = stream.stream_times_us(nb, log=lambda m, N=N, bits=bits: log(f"{N}x{K} b{bits} {m}"))
                rows.append(dict(kind="stream", N=N, K=K, bits=bits, **r))
                _write(path, rows)
    base = {}
    for plan in time_plans(shapes):
        N, K, bits, M, name, cfg = plan
        if (N, K) not in base:
            base[(N, K)] = cublas(N, K, gen, rows, dev)
            _write(path, rows)
        try:
            w0 = make("bipolar", N, K, bits, torch.float16, gen)
            regime = "gemv" if M == 1 else "gemm"
            xc = torch.randn(M, K, device=dev, dtype=torch.float16, generator=gen)
            err = rel(call(xc, w0, config=cfg, regime=regime), reference(xc, w0))
            if SMOKE:
                t = time.time()
                call(xc, w0, config=cfg, regime=regime)
                us = (time.time() - t) * 1e6
            else:
                from bitsmith.kernels import bench as hb

                R = hb.rotations(nbytes(w0))
                ws = [w0] + [make("bipolar", N, K, bits, torch.float16, gen) for _ in range(R - 1)]
                xs = [torch.randn(M, K, device=dev, dtype=torch.float16, generator=gen) for _ in range(R)]
                us = hb.graph_time_us([lambda x=x, w=w: call(x, w, config=cfg, regime=regime)
                                       for x, w in zip(xs, ws)])
                del ws, xs
                torch.cuda.empty_cache()
            nb = nbytes(w0) + 2 * M * (K + N)
            default = name == (DEFAULT_M1.get((N, bits)) if M == 1 else DEFAULT_M16.get(N))
            rows.append(dict(kind="time", kernel=name, default=default, config=cfg, N=N, K=K, M=M, bits=bits,
                             us=us, speedup=base[(N, K)][M] / us, GBs=nb / us / 1e3, rel_err=err))
            log(f"{N}x{K} M={M} b{bits} {name}{' (default)' if default else ''}: {us:.1f} us "
                f"({base[(N, K)][M] / us:.2f}x cuBLAS, {nb / us / 1e3:.0f} GB/s) err {err:.1e}")
        except Exception as e:
            rows.append(dict(kind="time", kernel=name, N=N, K=K, M=M, bits=bits, failed=f"{type(e).__name__}: {e}"))
            log(f"{N}x{K} M={M} b{bits} {name}: FAILED {type(e).__name__}: {str(e)[:200]}")
        _write(path, rows)
    log("time: done")
    return 0


def cublas(N, K, gen, rows, dev):
    import torch
    import torch.nn.functional as F

    if SMOKE:
        w = torch.randn(N, K, dtype=torch.float16)
        out = {}
        for M in (1, 16):
            x = torch.randn(M, K, dtype=torch.float16)
            t = time.time()
            F.linear(x.float(), w.float())
            out[M] = (time.time() - t) * 1e6
        return out
    from bitsmith.kernels import bench as hb

    return hb.cublas_baseline(N, K, (1, 16), torch.float16, gen, rows, log)


# ------------------------------------------------------------------------------------------------ check phase

def check_tasks(done=()):
    """[(kernel, cfg, bits, check shape index)]: per width the tuner's first candidate of each mma kernel; at 2..4
    bits (merged words) every `mma_k` candidate, since those become tuner candidates if they pass. One task per
    shape (compiles dominate: finer tasks spread them over the workers); slowest first (`mma_k`, many bits).
    `done`: rows of an earlier check (its passed (kernel, config, bits, N) are not run again)."""
    import torch

    from bitsmith.kernels import bitplane_mma as bm
    from bitsmith.kernels import bitplane_mma_gemm as bg

    passed = {}
    for r in done:
        if "N" in r:
            k = (r["kernel"], json.dumps(r["config"], sort_keys=True), r["bits"], r["N"])
            passed[k] = passed.get(k, True) and bool(r["ok"])
    out = []
    for bits in (2, 3) if SMOKE else range(1, 9):
        mma = bm.gemv_mma_configs(8192, 8192, bits, 128, "bipolar", None, torch.float16, 132)
        mk = bg.gemm_mma_configs(16, 8192, 8192, bits, 128, "bipolar", None, torch.float16)
        for kernel, cfg in [("mma", mma[0])] + [("mma_k", c) for c in (mk if 2 <= bits <= 4 and not SMOKE
                                                                         else mk[:1])]:
            for ci, (N, _, _) in enumerate(_checks()):
                if not passed.get((kernel, json.dumps(cfg, sort_keys=True), bits, N)):
                    out.append((kernel, cfg, bits, ci))
    return sorted(out, key=lambda t: (t[0] != "mma_k", -t[2]))


def _check_task(task):
    """Worker: one (kernel, cfg, bits) on one check shape (bias on some), M = 1 (mma) or 1, 3, 16 (mma_k)."""
    import faulthandler

    import torch

    from bitplane_kernels import call, make, reference, rel
    from bitsmith.kernels import gwint_triton

    kernel, cfg, bits, ci = task
    faulthandler.dump_traceback_later(90, exit=False)  # a stalled task shows where it stands
    rows = []
    try:
        gen = torch.Generator(device=_device()).manual_seed(100 + 10 * bits + ci)
        for N, K, gs in _checks()[ci:ci + 1]:
            w = make("bipolar", N, K, bits, torch.float16, gen, gs=gs)
            bias = torch.randn(N, device=_device(), generator=gen).half() if (bits + ci) % 2 else None
            for M in ((1,) if kernel == "mma" else (1, 3, 16)):
                x = torch.randn(M, K, device=_device(), dtype=torch.float16, generator=gen)
                out = call(x, w, bias=bias, config=cfg, regime="gemv" if M == 1 else "gemm")
                e = rel(out, reference(x, w, bias))
                rows.append(dict(kernel=kernel, config=cfg, bits=bits, N=N, K=K, g=gs, M=M, bias=bias is not None,
                                 rel_err=e, ok=e < 3e-3))
        for ws, cnt in gwint_triton._WORKSPACES.values():
            if ws.any() or cnt.any():
                rows.append(dict(kernel=kernel, config=cfg, bits=bits, ok=False, error="workspace not left zeroed"))
    except Exception as e:
        rows.append(dict(kernel=kernel, config=cfg, bits=bits, ok=False, error=f"{type(e).__name__}: {str(e)[:300]}"))
    finally:
        faulthandler.cancel_dump_traceback_later()
    return task, rows


def phase_check(args):
    done = []
    if args.check_done:
        with open(args.check_done) as f:
            done = json.load(f)
        done = done.get("check", []) if isinstance(done, dict) else done
    tasks = check_tasks(done)
    log(f"check: {len(tasks)} tasks (kernel, config, bits, shape) in {args.workers} processes"
        + (f", passed ones of {args.check_done} skipped" if args.check_done else ""))
    rows, bad = [], 0
    with _pool(args.workers) as pool:
        for i, (task, trows) in enumerate(pool.imap_unordered(_check_task, tasks)):
            kernel, cfg, bits, ci = task
            fails = [r for r in trows if not r["ok"]]
            bad += len(fails)
            rows += trows
            worst = max((r["rel_err"] for r in trows if "rel_err" in r), default=float("nan"))
            log(f"check {i + 1}/{len(tasks)}: {kernel} w{cfg['num_warps']} u{cfg['unroll']} pf{cfg.get('prefetch', 0)}"
                f" b{bits} {'x'.join(map(str, _checks()[ci]))}: {len(trows)} runs, worst rel err {worst:.1e}"
                + "".join(f"\n    FAIL {r.get('N')}x{r.get('K')} M={r.get('M')}: {r.get('error', r.get('rel_err'))}"
                          for r in fails))
            _write(os.path.join(args.out, "check.json"), rows)
    log(f"check: {len(rows)} runs, {bad} failures")
    return 1 if bad else 0


# ------------------------------------------------------------------------------------------------ supervisor

def summary(out_dir) -> str:
    def load(name):
        try:
            with open(os.path.join(out_dir, name)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return []

    lines = []
    t = load("time.json")
    for r in t:
        if r.get("kind") == "stream":
            lines.append(f"stream {r['N']}x{r['K']} b{r['bits']} {r['bytes'] / 1e6:.1f} MB: read {r['read']:.1f} us "
                         f"({r['bytes'] / r['read'] / 1e3:.0f} GB/s), sum {r['sum']:.1f} us, copy {r['copy']:.1f} us")
    lines.append("| N x K | M | bits | kernel | us | x cuBLAS | GB/s | rel err |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in t:
        if r.get("kind") == "time" and "us" in r:
            name = r["kernel"] + (" (default)" if r["default"] else "")
            lines.append(f"| {r['N']}x{r['K']} | {r['M']} | {r['bits']} | {name}"
                         f" | {r['us']:.1f} | {r['speedup']:.2f} | {r['GBs']:.0f} | {r['rel_err']:.1e} |")
    c = load("check.json")
    if c:
        fails = [r for r in c if not r["ok"]]
        worst = max((r["rel_err"] for r in c if "rel_err" in r), default=float("nan"))
        lines.append(f"check: {len(c)} runs, {len(fails)} failures, worst rel err {worst:.1e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    global SMOKE
    from bitsmith.kernels import bench_phases

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_phases.add_arguments(ap, "out/bitplane-mma", 285, "compile=100,time=115,check=70")
    ap.add_argument("--check-done", default="", help="JSON rows of an earlier check: skip what passed there")
    args = ap.parse_args(argv)
    SMOKE = args.smoke
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
