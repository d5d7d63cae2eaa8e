"""Offline sm_90 SASS of the bit-plane mma GEMV (`bitplane_mma._gemv_mma_kernel`): registers, spills, instructions
per weight (whole kernel over the weights one thread handles: 8 rows x 32 slots x unroll tiles), top opcodes.

    PYTHONPATH=/tmp/tri36 .venv/bin/python benchmarks/bitplane_mma_sass.py [bits,...] [--dump]
"""

import sys
from collections import Counter

sys.path[:0] = ["src", "benchmarks"]
from sass_count import compile_sm90, full_sass, parse, resources  # noqa: E402

from bitsmith.kernels import bitplane_mma as bm  # noqa: E402

SIG = dict(x_ptr="*fp16", pl_ptr="*i32", s_ptr="*fp16", b_ptr="*fp16", out_ptr="*fp16", ws_ptr="*fp32",
           cnt_ptr="*i32", N="i32", KW="i32", G="i32", group_size="i32", k_tiles="i32", split_k="i32")
DIV = ("x_ptr", "pl_ptr", "s_ptr", "out_ptr", "ws_ptr", "cnt_ptr", "N", "KW")

args = [a for a in sys.argv[1:] if not a.startswith("--")]
bits_list = [int(b) for b in args[0].split(",")] if args else [1, 2, 3, 4, 5, 8]
configs = [(4, 4, 0), (4, 4, 1), (4, 8, 1)]
for bits in bits_list:
    for warps, unroll, merge in configs:
        if merge and not 2 <= bits <= 4:
            continue
        cx = dict(BITS=bits, HAS_BIAS=False, MODE=2, UNROLL=unroll, NT=32 * warps, EVEN_K=True, MERGE=merge)
        k = compile_sm90(bm._gemv_mma_kernel, SIG, cx, DIV, warps, 1)
        sass = full_sass(k)
        ins = [op for _, op, _ in parse(sass)[0] if op != "NOP"]
        c = Counter(op.split(".")[0] for op in ins)
        r = resources(k)
        w = 8 * 32 * unroll
        print(f"mma b{bits} w{warps} u{unroll} merge{merge}: {len(ins)} insns / {w} weights = {len(ins) / w:.2f} per weight; "
              f"regs {r['regs']} stack {r['stack']}; " + ", ".join(f"{o} {n}" for o, n in c.most_common(10)),
              flush=True)
        if "--dump" in sys.argv:
            open(f"/tmp/mma_b{bits}_w{warps}_u{unroll}.sass", "w").write(sass)
