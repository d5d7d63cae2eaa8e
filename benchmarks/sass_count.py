"""Offline SASS reading for Triton kernels (no GPU): compile for sm_90, find the loops, count instructions.

    PYTHONPATH=/tmp/tri36 .venv/bin/python benchmarks/sass_count.py gwint [name filter...] [--dump]
    PYTHONPATH=/tmp/tri36 .venv/bin/python benchmarks/sass_count.py gwint swapped     # the M = 16 / 128 kernel
    PYTHONPATH=/tmp/tri36 .venv/bin/python benchmarks/sass_count.py gwint deep        # the M = 1 deep GEMV

`/tmp/tri36` is an unpacked triton 3.6 wheel (the GPU machine's version; the venv's newer Triton generates
different code). Library use, for any kernel:

    from sass_count import compile_sm90, loops
    k = compile_sm90(fn, signature={"x_ptr": "*fp16", "N": "i32", "BITS": "constexpr"}, constexprs={"BITS": 4},
                     divisible=("x_ptr", "N"), num_warps=4, num_stages=2)
    k.n_regs, k.n_spills, loops(k.asm["sass"])   # -> [Loop(start, end, counts by opcode), ...]

A loop is the instruction range between a label and the last backward branch to it. `summary(k, w)` divides
each loop's instruction count, and the whole kernel's, by w, the weights one thread handles per loop iteration
(for a kernel without a loop, e.g. a fully unrolled one: per launch); the caller knows that number. The SASS is
cuobjdump's of the cubin (Triton's own listing stops at 4096 instructions).
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass, field

# Two spellings: cuobjdump's ("/*0a80*/  @P0 BRA `(.L_x_3) ;") and Triton's own listing ("01:-:-:-:8\t@P0 BRA LBB2;",
# control codes first, no offsets). Offsets here are instruction indices, which serve both.
_LABEL = re.compile(r"^(?:\.L_x_(\d+)|(LBB\w+)):")
_INSN = re.compile(r"^(?:/\*([0-9a-f]+)\*/|[0-9a-f-]{2}:[-0-9]:[-0-9]:[-Y]:\d+)\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
# a third spelling: this cuobjdump prints plain addresses ("@P0 BRA 0x1250 ;"), kept as the label "@1250"
_TARGET = re.compile(r"(?:\.L_x_(\d+)|(LBB\w+)|\b0x([0-9a-f]+)\b)")


@dataclass
class Loop:
    start: int  # index of the first instruction
    end: int  # index of the backward branch
    ops: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.ops)

    def counts(self, depth: int = 1) -> Counter:
        """Opcode counts, opcodes cut to `depth` dot-separated parts (LDG.E.128 -> LDG at depth 1)."""
        return Counter(".".join(o.split(".")[:depth]) for o in self.ops)


def parse(sass: str) -> tuple[list[tuple[int, str, str]], dict[str, int]]:
    """-> ([(index, opcode, operands)], {label: index of the instruction after it})."""
    insns, labels, pending = [], {}, []
    for line in sass.splitlines():
        line = line.strip()
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1) or m.group(2))
            continue
        m = _INSN.match(line)
        if m:
            for lab in pending:
                labels[lab] = len(insns)
            pending = []
            if m.group(1):
                labels["@" + m.group(1).lstrip("0")] = len(insns)
            insns.append((len(insns), m.group(3), m.group(4)))
    return insns, labels


def loops(sass: str) -> list[Loop]:
    """Every loop (backward branch) of the kernel, innermost-first is not guaranteed; sorted by start."""
    insns, labels = parse(sass)
    found = {}
    for off, op, rest in insns:
        if not op.startswith("BRA"):
            continue
        m = _TARGET.search(rest)
        lab = m and (m.group(1) or m.group(2) or "@" + m.group(3).lstrip("0"))
        if lab in labels and labels[lab] <= off:
            start = labels[lab]
            found[start] = max(found.get(start, 0), off)
    out = []
    for start, end in sorted(found.items()):
        out.append(Loop(start, end, [op for off, op, _ in insns if start <= off <= end and op != "NOP"]))
    return out


def compile_sm90(fn, signature: dict, constexprs: dict, divisible=(), num_warps: int = 4, num_stages: int = 2,
                 maxnreg: int | None = None):
    """triton.compile for sm_90 on a machine without a GPU (returns the CompiledKernel: asm, n_regs, n_spills)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    src = ASTSource(fn, sig, constexprs=dict(constexprs), attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 128),
                          options=dict(num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg))


def resources(k) -> dict:
    """Registers, spill stores/loads and stack bytes of a compiled kernel, from `cuobjdump -res-usage` on its cubin."""
    import os
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    out = {}
    for key, pat in (("regs", r"REG:(\d+)"), ("stack", r"STACK:(\d+)"), ("shared", r"SHARED:(\d+)"),
                     ("local", r"LOCAL:(\d+)")):
        m = re.search(pat, text)
        out[key] = int(m.group(1)) if m else None
    return out


def full_sass(k) -> str:
    """cuobjdump -sass of the kernel's cubin (Triton's own `asm["sass"]` listing can stop at 4096 instructions)."""
    import os
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout


def summary(k, weights_per_iter: float | None = None, top: int = 14) -> str:
    """One text block: registers, stack, and per loop its size, instructions per weight and top opcodes."""
    r = resources(k)
    lines = [f"regs {r['regs']}, stack {r['stack']} B, local {r['local']} B, shared {r['shared']} B"]
    sass = full_sass(k)
    insns, _ = parse(sass)
    ops = Counter(".".join(op.split(".")[:2]) for _, op, _ in insns if op != "NOP")
    pw = f", {sum(ops.values()) / weights_per_iter:.2f} per weight" if weights_per_iter else ""
    lines.append(f"  whole kernel: {sum(ops.values())} insns{pw}; "
                 + ", ".join(f"{o} {c}" for o, c in ops.most_common(top)))
    for lp in loops(sass):
        pw = f", {lp.n / weights_per_iter:.2f} per weight" if weights_per_iter else ""
        top_ops = ", ".join(f"{o} {c}" for o, c in lp.counts(2).most_common(top))
        lines.append(f"  loop [{lp.start}..{lp.end}]: {lp.n} insns{pw}; {top_ops}")
    return "\n".join(lines)


_GWINT_SIG = dict(x_ptr="*fp16", qw_ptr="*i32", s_ptr="*fp16", z_ptr="*fp16", b_ptr="*fp16", out_ptr="*fp16",
                  ws_ptr="*fp32", cnt_ptr="*i32", N="i32", K="i32", KW="i32", G="i32", group_size="i32",
                  k_iters="i32", split_k="i32", magic="i32")
_GWINT_DIV = ("x_ptr", "qw_ptr", "s_ptr", "out_ptr", "ws_ptr", "cnt_ptr", "N", "K", "KW")


_GWINT_T_SIG = dict(xp_ptr="*fp16", qw_ptr="*i32", s_ptr="*fp16", z_ptr="*u8", b_ptr="*fp16", out_ptr="*fp16",
                    ws_ptr="*fp32", cnt_ptr="*i32", M="i32", N="i32", KW="i32", KWP="i32", G="i32",
                    group_size="i32", stride_pm="i32", stride_om="i32", k_iters="i32", split_k="i32")
_GWINT_T_DIV = ("xp_ptr", "qw_ptr", "s_ptr", "out_ptr", "ws_ptr", "cnt_ptr", "N", "KW", "KWP", "stride_pm",
                "stride_om")


def gwint_swapped_cases():
    """The swapped tensor-core kernel (M = 16 and 128 tiles), fp16 and packed fp16x2 A operand, g128 symmetric:
    (name, kernel, signature, constexprs, divisible, warps, stages, weights per thread per K tile)."""
    from bitsmith.kernels import gwint_triton as gt

    cases = []
    for bits, bm, bn, bkw, warps, stages in ((4, 16, 128, 16, 4, 3), (8, 16, 128, 16, 4, 3), (4, 16, 128, 32, 4, 3),
                                             (4, 128, 128, 16, 8, 3), (8, 128, 128, 32, 8, 3),
                                             (4, 128, 128, 32, 8, 2)):
        P = 32 // bits
        gpt = gt._groups_per_tile(64, 128, bkw * P)
        for packed in (False, True):
            if gpt == 2 and not packed:
                continue
            cx = dict(BITS=bits, P=P, SYM=True, HAS_BIAS=False, DOT_F32=False, BLOCK_M=bm, BLOCK_N=bn,
                      BLOCK_KW=bkw, GROUP_M=8, PACKED=packed, ASM=packed, GPT=gpt,
                      TPG_SHIFT=gt._tpg_shift(64, 128, bkw * P))
            name = f"swapped_b{bits}_m{bm}_n{bn}_kw{bkw}_w{warps}_{'packed' if packed else 'fp16'}"
            cases.append((name, gt._gemm_t_kernel, _GWINT_T_SIG, cx, _GWINT_T_DIV, warps, stages,
                          bn * bkw * P / (32 * warps)))
    return cases


def gwint_cases():
    """(name, kernel, signature, constexprs, divisible, warps, stages, weights per thread per loop iteration)."""
    from bitsmith.kernels import gwint_triton as gt

    cases = gwint_swapped_cases()
    for bits in (4, 8):
        P = 32 // bits
        for bn, bkw, warps in ((128, 16, 4), (256, 8, 4)):
            cx = dict(BITS=bits, P=P, HI=gt._hi_shift(bits), SYM=True, HAS_BIAS=False, SCALE_MODE=0, EVEN=True,
                      BLOCK_N=bn, BLOCK_KW=bkw)
            cases.append((f"gemv_b{bits}_n{bn}_kw{bkw}_w{warps}", gt._gemv_kernel, _GWINT_SIG, cx, _GWINT_DIV, warps,
                          2, bn * bkw * P / (32 * warps)))
        for bn, bkw, warps, unroll in ((1024, 4, 4, 0), (1024, 4, 4, 8), (512, 4, 2, 8), (512, 8, 4, 4)):
            cx = dict(BITS=bits, P=P, HI=gt._hi_shift_wide(bits), SYM=True, HAS_BIAS=False, EVEN=True,
                      BLOCK_N=bn, BLOCK_KW=bkw, UNROLL=unroll)
            # per weight: a loop iteration is 2 tiles (UNROLL 0); unrolled, the whole kernel is UNROLL tiles
            tiles = 2 if unroll == 0 else unroll
            cases.append((f"wide_b{bits}_n{bn}_kw{bkw}_w{warps}_u{unroll}", gt._gemv_wide_kernel, _GWINT_SIG, cx,
                          _GWINT_DIV, warps, 1, tiles * bn * bkw * P / (32 * warps)))
            if unroll:  # the packed fp16x2 path
                cases.append((f"packed_b{bits}_n{bn}_kw{bkw}_w{warps}_u{unroll}", gt._gemv_wide_kernel, _GWINT_SIG,
                              cx | dict(PACKED=True, ASM=True), _GWINT_DIV, warps, 1, tiles * bn * bkw * P / (32 * warps)))
        for bn, rows, warps, unroll in ((32, 128, 8, 4), (32, 64, 4, 8), (32, 256, 16, 2), (64, 128, 8, 4),
                                        (16, 128, 4, 4), (32, 128, 8, 14)):
            if P == 4:  # 8-bit: twice the word rows for the same K
                unroll *= 2
            cx = dict(BITS=bits, P=P, SYM=True, HAS_BIAS=False, EVEN=True, BLOCK_N=bn, ROWS=rows, UNROLL=unroll,
                      ASM=True)
            cases.append((f"deep_b{bits}_n{bn}_r{rows}_w{warps}_u{unroll}", gt._gemv_deep_kernel, _GWINT_DEEP_SIG,
                          cx, _GWINT_DIV, warps, 1, unroll * rows * bn * P / (32 * warps)))
        # the fused decoder-layer variants (RMSNorm prologue; + SiLU-multiply epilogue) at the configurations the
        # H100 tuner picked for qkv / gate-up (session 7), K = 4096 in one split
        for bn, rows, warps, unroll in ((32, 256, 16, 2), (32, 512, 8, 1), (64, 128, 8, 4)):
            if P == 4:
                unroll *= 2
            for tag, extra in (("plain", {}), ("norm", dict(NORM=True)), ("normglu", dict(NORM=True, GLU=True))):
                cx = dict(BITS=bits, P=P, SYM=True, HAS_BIAS=False, EVEN=True, BLOCK_N=bn, ROWS=rows,
                          UNROLL=unroll, ASM=True, RMS_BLOCK=4096) | extra
                cases.append((f"deep{tag}_b{bits}_n{bn}_r{rows}_w{warps}_u{unroll}", gt._gemv_deep_kernel,
                              _GWINT_DEEP_SIG, cx, _GWINT_DIV, warps, 1, unroll * rows * bn * P / (32 * warps)))
    return cases


_GWINT_DEEP_SIG = dict(x_ptr="*fp16", qw_ptr="*i32", s_ptr="*fp16", z_ptr="*fp16", b_ptr="*fp16", out_ptr="*fp16",
                       ws_ptr="*fp32", cnt_ptr="*i32", nw_ptr="*fp16", N="i32", K="i32", KW="i32", G="i32",
                       group_size="i32", split_k="i32", eps="fp32")


def _gwint_main(argv: list[str]) -> int:
    """The gwint kernels for w4 and w8, symmetric, full tiles: the GEMVs (old and wide; the decode shapes' code) and
    the swapped tensor-core kernel (M = 16 / 128 tiles, g128)."""
    sys.path.insert(0, "src")
    import triton

    print("triton", triton.__version__)
    for name, kern, sig, cx, div, warps, stages, wpi in gwint_cases():
        if len(argv) > 1 and not any(a in name for a in argv[1:] if a != "--dump"):
            continue
        k = compile_sm90(kern, sig, cx, div, warps, stages)
        print(f"== {name} (num_warps {warps}, num_stages {stages})")
        print(summary(k, wpi))
        if "--dump" in argv:
            with open(f"/tmp/sass_{name}.txt", "w") as f:
                f.write(full_sass(k))
    return 0


if __name__ == "__main__":
    raise SystemExit(_gwint_main(sys.argv[1:]))
