"""GPU benchmark of bitsmith's kernels against fp16 cuBLAS and peers (tinygemm, gemlite), plus a GPU correctness sweep.

    bitsmith bench kernels --check --out out/bench       # or: PYTHONPATH=src python benchmarks/bench_kernels.py ...
    PYTHONPATH=src:.whl/gemlite-0.6.0.post2 python benchmarks/bench_kernels.py \
        --shapes 4096x4096,8192x8192,28672x8192,8192x28672 --ms 1,16,128 --formats w4g128,w8pc,w8g128

Weights are synthetic random codes and scales of the real shapes. Writes rows.json, table.md and tune.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def _parse_shapes(s: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in part.split("x")) for part in s.split(",") if part]


def check(log=print, ms=(1, 3, 16, 33, 128, 300, 4096), only: set[int] | None = None,
          kinds: set[str] | None = None) -> int:
    """Every regime and every tuning candidate on the GPU against the fp32 reference, fresh random inputs.
    `kinds`: only these kernels (old, wide, deep, swapped, dequant; default all)."""
    from bitsmith.kernels import gwint
    from bitsmith.kernels import gwint_triton as gt

    tol = {torch.float16: 3e-3, torch.bfloat16: 8e-3}
    gen = torch.Generator(device="cuda").manual_seed(1)
    failures = 0
    sms = gt._num_sms(torch.device("cuda"))
    # A: every tuning candidate, on the benchmarked formats (fp16, symmetric) at awkward shapes.
    # B: the default candidate across dtypes, asymmetric zeros, bias, bits 2/3, straddling groups.
    cases = [  # all_candidates, dtype, N, K, bits, group_size, sym, bias
        (True, torch.float16, 4099, 576, 4, 128, True, False),
        (True, torch.float16, 4099, 576, 8, 576, True, False),
        (True, torch.float16, 1000, 2048, 8, 128, True, False),
        (False, torch.bfloat16, 4099, 576, 4, 128, True, True),
        (False, torch.bfloat16, 1000, 4096, 4, 128, False, False),
        (False, torch.float16, 1000, 4096, 4, 128, False, True),
        (False, torch.bfloat16, 333, 4096, 8, 4096, True, False),
        (False, torch.float16, 515, 1024, 3, 64, False, True),
        (False, torch.bfloat16, 515, 1024, 4, 32, True, False),
        (False, torch.float16, 515, 1024, 2, 64, True, False),
        (False, torch.float16, 515, 1000, 3, 1000, False, True),
        (False, torch.bfloat16, 515, 1024, 2, 256, True, False),
        (True, torch.float16, 4099, 576, 4, 64, True, False),  # 12: g64, swapped tiles of two groups only
    ]
    t0 = time.time()
    for i, (every, dtype, N, K, bits, gs, sym, use_bias) in enumerate(cases):
        if only is not None and i not in only:
            continue
        codes = torch.randint(0, 1 << bits, (N, K), dtype=torch.uint8, device="cuda", generator=gen)
        qw = gwint.pack_codes(codes, bits)
        G = gwint.num_groups(K, gs)
        s = ((torch.rand(G, N, device="cuda", generator=gen) + 0.5) / ((1 << (bits - 1)) * K ** 0.5)).to(dtype)
        z = None if sym else torch.randint(0, 1 << bits, (G, N), dtype=torch.uint8, device="cuda", generator=gen)
        bias = torch.randn(N, device="cuda", generator=gen).to(dtype) if use_bias else None
        wf = gwint.dequantize(qw, s, z, bits, gs, K, dtype=torch.float32)
        for M in ms:
            # every candidate of the swapped kernel (the new one) where the case asks for all; the older kernels
            # (unchanged since their full sweep) by their default candidate
            swapped = ([("gemm", c) for c in gt.gemm_t_configs(M, N, K, bits, gs, sms, dtype, two_groups=True)]
                       if M < gt.DEQUANT_MIN_M else [])
            if M == 1:
                plans = [("gemv", gt.gemv_configs(N, K, bits, gs, sms)[0])]
                swapped = [("gemv", c) for _, c in swapped]
                wide = [("gemv", c) for c in gt.gemv_wide_configs(N, K, bits, gs, sms, dtype)]
                plans += wide if every else wide[:1]  # the wide GEMV: every candidate where the case asks
                deep = [("gemv", c) for c in gt.gemv_deep_configs(N, K, bits, gs, sms, dtype)]
                plans += deep if every else deep[:1]  # the deep GEMV likewise
            elif M >= gt.DEQUANT_MIN_M:
                plans = [("dequant", None), ("gemm", gt.gemm_configs(M, N, K, bits, gs, sms)[0])]
            else:
                plans = [("gemm", gt.gemm_configs(M, N, K, bits, gs, sms)[0])]
            plans += swapped if every else swapped[:1]
            if kinds is not None:
                plans = [(r, c) for r, c in plans if (c.get("kernel", "old") if c else r) in kinds]
            for regime, cfg in plans:
                x = torch.randn(M, K, device="cuda", generator=gen).to(dtype)
                ref = x.float() @ wf.t() + (bias.float() if use_bias else 0)
                out = gt.linear(x, qw, s, z, bits, gs, K, bias=bias, config=cfg, regime=regime)
                err = ((out.float() - ref).norm() / ref.norm()).item() if torch.isfinite(out).all() else float("nan")
                if not err < tol[dtype]:
                    failures += 1
                    log(f"FAIL {dtype} N={N} K={K} b={bits} g={gs} sym={sym} M={M} {regime} {cfg}: {err:.2e}")
        log(f"checked {str(dtype)[6:]} N={N} K={K} b={bits} g={gs} sym={sym} bias={use_bias} "
            f"{'all candidates' if every else 'default'} ({time.time() - t0:.0f}s)")
    for ws, cnt in gt._WORKSPACES.values():
        if ws.any() or cnt.any():
            failures += 1
            log("FAIL split-K workspace not left zeroed")
    # CUDA graph replay of the public op: fresh inputs copied in, output compared after replay
    N, K, bits, gs = 4096, 4096, 4, 128
    qw = torch.randint(0, 1 << 32, (K // 8, N), dtype=torch.int64, device="cuda").to(torch.int32)
    s = ((torch.rand(K // gs, N, device="cuda") + 0.5) / (8 * K ** 0.5)).half()
    wf = gwint.dequantize(qw, s, None, bits, gs, K, dtype=torch.float32)
    for M in [m for m in (1, 16, 128) if m in ms]:  # the sweep's rows only (each M tunes this shape once)
        x = torch.randn(M, K, device="cuda").half()
        gwint.linear(x, qw, s, None, bits, gs, K)  # warm: tune, compile, workspace
        g = torch.cuda.CUDAGraph()
        st = torch.cuda.Stream()
        st.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(st):
            gwint.linear(x, qw, s, None, bits, gs, K)
        torch.cuda.current_stream().wait_stream(st)
        with torch.cuda.graph(g, stream=st):
            y = gwint.linear(x, qw, s, None, bits, gs, K)
        for _ in range(3):
            x.copy_(torch.randn(M, K, device="cuda").half())
            g.replay()
            torch.cuda.synchronize()
            err = ((y.float() - x.float() @ wf.t()).norm() / (x.float() @ wf.t()).norm()).item()
            if not err < tol[torch.float16]:
                failures += 1
                log(f"FAIL CUDA graph replay M={M}: {err:.2e}")
    if gt.PDL:
        failures += pdl_check(log)
    log(f"GPU check: {failures} failures ({time.time() - t0:.0f}s)")
    return failures


def pdl_check(log=print, rounds: int = 8) -> int:
    """Programmatic dependent launch (`gwint_triton.PDL`): chains of two M = 1 GEMVs in one CUDA graph, y = B(A(x)),
    for each pinned deep and wide candidate. B starts while A runs and must wait for A's output before it reads it;
    each round's x is written by an ordinary kernel first. Compared with the fp32 chain on A's fp16 output."""
    from bitsmith.kernels import gwint
    from bitsmith.kernels import gwint_triton as gt

    N = K = 4096
    gen = torch.Generator(device="cuda").manual_seed(7)
    ws = []
    for _ in range(2):
        qw = torch.randint(0, 1 << 32, (K // 8, N), dtype=torch.int64, device="cuda", generator=gen).to(torch.int32)
        s = ((torch.rand(K // 128, N, device="cuda", generator=gen) + 0.5) / (8 * K ** 0.5)).half()
        ws.append((qw, s, gwint.dequantize(qw, s, None, 4, 128, K, dtype=torch.float32)))
    sms = gt._num_sms(torch.device("cuda"))
    cfgs = gt.gemv_deep_configs(N, K, 4, 128, sms) + [c for c in gt.gemv_wide_configs(N, K, 4, 128, sms)
                                                      if c.get("packed")][:2]
    failures = 0
    for cfg in cfgs:
        launch = gt.launch_gemv_deep if cfg["kernel"] == "deep" else gt.launch_gemv_wide
        xs = [torch.randn(1, K, device="cuda", generator=gen).half() for _ in range(rounds)]
        xbuf, y1, y2 = (torch.empty(1, K, device="cuda", dtype=torch.float16) for _ in range(3))
        outs = [torch.empty(1, N, device="cuda", dtype=torch.float16) for _ in range(rounds)]

        def chain(i):
            torch.mul(xs[i], 1.0, out=xbuf)  # an ordinary kernel writes this round's x
            launch(xbuf, ws[0][0], ws[0][1], None, None, y1, 4, 128, K, cfg)
            launch(y1, ws[1][0], ws[1][1], None, None, y2, 4, 128, K, cfg)
            outs[i].copy_(y2)

        st = torch.cuda.Stream()
        st.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(st):
            chain(0)
        torch.cuda.current_stream().wait_stream(st)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=st):
            for i in range(rounds):
                chain(i)
        for o in outs:
            o.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        worst = 0.0
        for i in range(rounds):
            ref = (xs[i].float() @ ws[0][2].t()).half().float() @ ws[1][2].t()
            err = ((outs[i].float() - ref).norm() / ref.norm()).item() if torch.isfinite(outs[i]).all() else 1.0
            worst = max(worst, err)
        if not worst < 3e-3:
            failures += 1
            log(f"FAIL PDL chain {cfg}: {worst:.2e}")
        log(f"PDL chain {cfg['kernel']} {cfg}: worst rel. error {worst:.1e}")
    return failures


def crossover(log=print) -> list[dict]:
    """Large M at 8192x8192 w4g128: tensor-core kernel vs dequantize+cuBLAS vs cuBLAS fp16."""
    import torch.nn.functional as F

    from bitsmith.kernels import bench
    from bitsmith.kernels import gwint_triton as gt

    fmt = bench.FORMATS["w4g128"]
    N = K = 8192
    gen = torch.Generator(device="cuda").manual_seed(2)
    w = fmt.make(N, K, torch.float16, "cuda", gen)
    wh = torch.randn(N, K, device="cuda", dtype=torch.float16)
    rows = []
    for M in (256, 512, 1024, 2048, 4096):
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        r = dict(M=M)
        r["cublas"] = bench.graph_time_us([lambda: F.linear(x, wh)], min_calls=10)
        for regime in ("gemm", "dequant"):
            r[regime] = bench.graph_time_us(
                [lambda regime=regime: gt.linear(x, w["qweight"], w["scales"], None, 4, 128, K, regime=regime)],
                min_calls=10)
        rows.append(r)
        log(f"crossover M={M}: cublas {r['cublas']:.0f} us, gemm {r['gemm']:.0f} us, dequant+cublas "
            f"{r['dequant']:.0f} us")
    return rows


def diag_swapped(shapes, ms=(16, 128), formats=("w4g128", "w8pc"), log=print) -> list[dict]:
    """Where the time of the swapped kernel goes: for the tuned swapped config (or the first candidate) time the
    whole call, `_xperm_kernel` alone, `_gemm_t_kernel` alone on a pre-permuted x, and the same tile with the
    packed A operand switched off (synthetic weights, rotated sets, CUDA graphs as in the benchmark)."""
    from bitsmith.kernels import bench
    from bitsmith.kernels import gwint_triton as gt

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(4)
    sms = gt._num_sms(torch.device("cuda"))
    for N, K in shapes:
        for fname in formats:
            fmt = bench.FORMATS[fname]
            w0 = fmt.make(N, K, torch.float16, "cuda", gen)
            R = bench.rotations(fmt.nbytes(w0))
            wsets = [w0] + [fmt.make(N, K, torch.float16, "cuda", gen) for _ in range(R - 1)]
            gs, KW = fmt.gs(K), w0["qweight"].shape[0]
            for M in ms:
                xs = [torch.randn(M, K, device="cuda", dtype=torch.float16, generator=gen) for _ in range(R)]
                fmt.call(xs[0], w0)  # tune
                cfg = bench._chosen_config(gt, M, N, K, fmt, torch.float16)
                if not (isinstance(cfg, dict) and cfg.get("kernel") == "swapped"):
                    cfg = gt.gemm_t_configs(M, N, K, fmt.bits, gs, sms, torch.float16)[0]
                outs = [torch.empty(M, N, device="cuda", dtype=torch.float16) for _ in range(R)]
                r = dict(N=N, K=K, M=M, format=fname, config=cfg)

                def whole(c):
                    return [lambda x=x, w=w, o=o: gt.launch_gemm_t(x, w["qweight"], w["scales"], None, None, o,
                                                                   fmt.bits, gs, K, c)
                            for x, w, o in zip(xs, wsets, outs)]

                r["whole_us"] = bench.graph_time_us(whole(cfg))
                r["xperm_us"] = bench.graph_time_us([lambda x=x: gt.permute_x(x, fmt.bits, K, KW, cfg) for x in xs])
                xps = [gt.permute_x(x, fmt.bits, K, KW, cfg) for x in xs]
                r["kernel_us"] = bench.graph_time_us(
                    [lambda x=x, w=w, o=o, xp=xp: gt.launch_gemm_t(x, w["qweight"], w["scales"], None, None, o,
                                                                   fmt.bits, gs, K, cfg, xp=xp)
                     for x, w, o, xp in zip(xs, wsets, outs, xps)])
                if cfg.get("packed"):
                    r["whole_unpacked_us"] = bench.graph_time_us(whole(dict(cfg, packed=False)))
                    P = 32 // fmt.bits
                    if gt.swapped_ok(fmt.bits, gs, K, 2 * cfg["block_kw"]) and gt._groups_per_tile(
                            -(-K // gs), gs, 2 * cfg["block_kw"] * P) == 2:  # the same tile over two groups
                        c2 = dict(cfg, block_kw=2 * cfg["block_kw"], split_k=max(1, cfg["split_k"] // 2),
                                  num_stages=gt._swapped_stages(cfg["block_m"], cfg["block_n"],
                                                                2 * cfg["block_kw"], P, cfg["num_stages"]))
                        r["two_groups_config"] = c2
                        r["whole_two_groups_us"] = bench.graph_time_us(whole(c2))
                rows.append(r)
                log(f"diag {N}x{K} {fname} M={M}: whole {r['whole_us']:.1f} us, xperm {r['xperm_us']:.1f}, "
                    f"kernel alone {r['kernel_us']:.1f}, unpacked whole {r.get('whole_unpacked_us', float('nan')):.1f}"
                    f", two-group tiles whole {r.get('whole_two_groups_us', float('nan')):.1f}; cfg {cfg}")
            del wsets, w0
            torch.cuda.empty_cache()
    return rows


def dump_asm(out_dir: str, log=print) -> None:
    """SASS/PTX of the tuned kernels for 8192x8192 (w4g128 and w8pc) at M = 1, 16, 128, into out_dir/asm.tgz."""
    import io
    import tarfile

    from bitsmith.kernels import bench
    from bitsmith.kernels import gwint_triton as gt

    N = K = 8192
    tar = tarfile.open(os.path.join(out_dir, "asm.tgz"), "w:gz")
    for fname in ("w4g128", "w8pc"):
        fmt = bench.FORMATS[fname]
        w = fmt.make(N, K, torch.float16, "cuda", torch.Generator(device="cuda").manual_seed(3))
        for M in (1, 16, 128):
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            fmt.call(x, w)  # tune
            cfg = bench._chosen_config(gt, M, N, K, fmt, torch.float16)
            out = torch.empty(M, N, device="cuda", dtype=torch.float16)
            launch = (gt.launch_gemm_t if cfg.get("kernel") == "swapped" else
                      gt.launch_gemv if M == 1 else gt.launch_gemm)
            h = launch(x, w["qweight"], w["scales"], None, None, out, fmt.bits, fmt.gs(K), K, cfg)
            for kind in ("sass", "ptx", "ttgir"):
                try:
                    text = h.asm[kind]
                except Exception as e:  # nvdisasm may be missing
                    text = f"unavailable: {e}"
                data = (text if isinstance(text, str) else text.decode()).encode()
                info = tarfile.TarInfo(f"{fname}_M{M}.{kind}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            log(f"asm {fname} M={M}: cfg {cfg}, regs {h.n_regs}, spills {h.n_spills}")
    tar.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bitsmith bench kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,8192x8192,28672x8192,8192x28672", help="N x K list")
    ap.add_argument("--ms", default="1,16,128")
    ap.add_argument("--formats", default="w4g128,w8pc,w8g128")
    ap.add_argument("--peers", default="tinygemm,gemlite")
    ap.add_argument("--check", action="store_true", help="run the GPU correctness sweep first")
    ap.add_argument("--check-ms", default="1,3,16,33,128,300,4096", help="rows M of the correctness sweep")
    ap.add_argument("--check-cases", default="", help="indices of the sweep's cases to run (default: all)")
    ap.add_argument("--check-kinds", default="", help="kernels the sweep runs: old,wide,deep,swapped,dequant "
                    "(default: all)")
    ap.add_argument("--check-last", action="store_true", help="run the sweep after the benchmark (its CUDA-graph "
                    "replay part then finds 4096x4096 w4g128 tuned if the benchmark measured it)")
    ap.add_argument("--crossover", action="store_true", help="also time large M (dequant+cuBLAS crossover)")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--diag", default="", help="N x K list: time the swapped kernel's parts (see diag_swapped)")
    ap.add_argument("--dump-asm", action="store_true", help="write SASS/PTX/TTGIR of tuned kernels to asm.tgz")
    ap.add_argument("--out", default=os.environ.get("OUT", "out/bench"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from bitsmith.kernels import bench
    from bitsmith.kernels import gwint_triton as gt

    log = bench.tee_log(args.out)

    log(f"torch {torch.__version__}, triton {__import__('triton').__version__}, {torch.cuda.get_device_name()}")
    only = {int(i) for i in args.check_cases.split(",")} if args.check_cases else None
    def run_check():
        kinds = set(args.check_kinds.split(",")) if args.check_kinds else None
        return check(log, [int(m) for m in args.check_ms.split(",")], only, kinds) if args.check else 0

    failures = 0 if args.check_last else run_check()
    result = {}
    if args.crossover:
        result["crossover"] = crossover(log)
    if args.dump_asm:
        dump_asm(args.out, log)
    def save(rows):
        with open(os.path.join(args.out, "rows.json"), "w") as f:
            json.dump(dict(result, rows=rows), f, indent=1, default=str)
        with open(os.path.join(args.out, "tune.json"), "w") as f:
            json.dump(gt.TUNE_LOG, f, default=str)

    if not args.no_bench:
        rows = bench.run(_parse_shapes(args.shapes), [int(m) for m in args.ms.split(",")], args.formats.split(","),
                         peers=[p for p in args.peers.split(",") if p], log=log, on_format_done=save)
        result["rows"] = rows
        table = bench.format_table(rows)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(table + "\n")
        log(table)
    if args.check_last:
        failures = run_check()
    if args.diag:  # after the benchmark, which has tuned these shapes already
        result["diag"] = diag_swapped(_parse_shapes(args.diag), formats=args.formats.split(","), log=log)
    with open(os.path.join(args.out, "rows.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(os.path.join(args.out, "tune.json"), "w") as f:
        json.dump(gt.TUNE_LOG, f, default=str)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
