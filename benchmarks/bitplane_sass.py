"""Offline sm_90 SASS counts of the bitplane M = 1 (f16x2 GEMV) and M = 16 (swapped, PTX vs plain-Triton) kernels.

    PYTHONPATH=/tmp/tri36 .venv/bin/python benchmarks/bitplane_sass.py

/tmp/tri36: an unpacked triton 3.6 wheel, the GPU machine's version (see benchmarks/sass_count.py). Per kernel: the
main loop's instructions (or the whole kernel's where it is unrolled) over the weights one thread handles in it,
registers, stack, top opcodes (first dotted part only: HADD2 includes HADD2.F32, the fp16 -> fp32 conversions).
"""

import re
import sys
from collections import Counter

sys.path[:0] = ["src", "benchmarks"]
from sass_count import compile_sm90, full_sass, resources  # noqa: E402

from bitsmith.kernels import bitplane as bp  # noqa: E402

SIG = dict(x_ptr="*fp16", pl_ptr="*i32", c_ptr="*fp16", o_ptr="*fp16", b_ptr="*fp16", out_ptr="*fp16",
           ws_ptr="*fp32", cnt_ptr="*i32", N="i32", K="i32", KW="i32", G="i32", group_size="i32",
           k_iters="i32", split_k="i32")
DIV = ("x_ptr", "pl_ptr", "c_ptr", "out_ptr", "ws_ptr", "cnt_ptr", "N", "K", "KW")
INS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def loop_or_whole(sass):
    """-> ("loop", instructions of the longest backward-branch range) or ("whole", all of them)."""
    ins = [(int(m.group(1), 16), m.group(3), m.group(4)) for m in INS.finditer(sass)]
    ins = [i for i in ins if i[1] != "NOP"]
    best = None
    for a, op, rest in ins:
        if op.startswith("BRA"):
            t = re.search(r"0x([0-9a-f]+)", rest)
            if t and int(t.group(1), 16) < a:
                body = [i for i in ins if int(t.group(1), 16) <= i[0] <= a]
                if best is None or len(body) > len(best):
                    best = body
    return ("loop", best) if best else ("whole", ins)


def report(name, k, wpi):
    kind, body = loop_or_whole(full_sass(k))
    c = Counter(op.split(".")[0] for _, op, _ in body)
    r = resources(k)
    print(f"{name}: {kind} {len(body)} insns / {wpi:.0f} weights = {len(body)/wpi:.2f} per weight; regs {r['regs']} stack {r['stack']}; "
          + ", ".join(f"{o} {n}" for o, n in c.most_common(9)))


# the configurations the H100 tuner chose at 8192x8192 (docs/results/bitplane.md, run 2)
for bits, bn, warps, unroll, bcq in ((1,1024,4,4,0),(2,1024,4,4,0),(3,1024,4,0,0),(4,1024,4,0,0),(5,1024,4,0,0),(6,512,4,2,0),(7,512,4,0,0),(8,512,4,0,0),(3,1024,4,0,1)):
    chunk = bp.h2_chunk(1 if bcq else bits)
    cx = dict(BITS=bits, HAS_OFFSET=False, HAS_BIAS=False, MODE=2, CHUNK=chunk, EVEN=True, BLOCK_N=bn, BLOCK_KW=1, UNROLL=unroll, BCQ=bool(bcq))
    k = compile_sm90(bp._gemv_h2_kernel, SIG, cx, DIV, warps, 2)
    report(f"h2 {'bcq' if bcq else 'bipolar'} b{bits} bn{bn} w{warps} u{unroll} chunk{chunk}", k, bn * 32 / (32 * warps) * max(unroll, 1))
sig = dict(SIG, M="i32", stride_xm="i32", stride_om="i32")
sig = {k: sig[k] for k in bp._gemm_t_kernel.arg_names if k in sig}
for bits in (2, 3, 4):
    for mode in (2, 1):
        cx = dict(BITS=bits, BCQ=False, HAS_OFFSET=False, HAS_BIAS=False, MODE=mode, JOIN=False, XP=True, DOT_F32=False,
                  BLOCK_M=16, BLOCK_N=64, BLOCK_KW=16, GROUP_M=8)
        k = compile_sm90(bp._gemm_t_kernel, sig, cx, DIV + ("stride_xm",), 4, 2)
        report(f"swapped bipolar b{bits} mode{mode} 16x64x16w 4 warps", k, 64 * 512 / 128)
