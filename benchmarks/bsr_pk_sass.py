"""Offline SASS of the packed int4 GEMV of `bsr` (no GPU): registers, spills, instruction counts and where the
loads sit, for the crow kernel (`_bsr_gemv_pk_kernel`, plain and `clamp`) and the equal-rows kernel
(`_bsr_gemv_pk_ell_kernel`), 32x32 blocks, group-128 scales, 51 blocks per block row (s80-b32-w4-row).

    PYTHONPATH=/tmp/tri36 .venv/bin/python benchmarks/bsr_pk_sass.py [name filter...] [--dump]

`/tmp/tri36` is an unpacked triton 3.6 wheel (the GPU machine's version). Per case: registers, the whole kernel's
instructions per weight a thread handles (the ell kernel has no loop: the whole launch), the loop's (crow kernel),
and the order of the global loads (LDG index, width) before the first HFMA2, which says whether the codes of
every step are issued before any arithmetic. --dump writes /tmp/sass_bsrpk_<name>.txt.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from sass_count import compile_sm90, full_sass, parse, summary  # noqa: E402

CNT = 51  # blocks per block row at 80 % of 256 block columns
_PTRS = dict(x_ptr="*i64", col_ptr="*i32", v_ptr="*i32", s_ptr="*fp16", b_ptr="*fp16", out_ptr="*fp16")


def cases():
    from bitsmith.kernels import bsr_pk

    out = []
    crow_sig = dict(_PTRS, crow_ptr="*i32", ws_ptr="*fp32", cnt_ptr="*i32", N="i32", chunk="i32", n_split="i32",
                    cnt="i32")
    for br, nblk, warps, clamp, uniform in ((8, 32, 4, False, False), (8, 32, 4, True, False),
                                            (16, 16, 4, True, False), (8, 32, 4, False, True),
                                            (16, 32, 8, False, True), (16, 16, 4, True, True),
                                            (32, 16, 8, False, True), (32, 32, 16, False, True),
                                            (16, 32, 16, False, True)):
        cx = dict(R=32, C=32, BLOCK_R=br, NBLK=nblk, GPB=4, HAS_BIAS=False, FENCE=True, PREFETCH=False, ASM=True,
                  CLAMP=clamp, UNIFORM=uniform)
        wpt = br * nblk * 32 / (32 * warps)  # weights per thread per loop iteration
        tag = "_clamp" if clamp else ""
        out.append((f"{'uniform' if uniform else 'crow'}_r{br}_n{nblk}_w{warps}{tag}",
                    bsr_pk._bsr_gemv_pk_kernel, crow_sig, cx, warps, wpt, None))
    ell_sig = dict(_PTRS, N="i32")
    for br, nblk, warps in ((8, 32, 4), (16, 16, 4), (4, 64, 4), (8, 64, 8), (16, 32, 8), (8, 16, 4), (4, 32, 2),
                             (32, 16, 8), (32, 32, 16), (16, 64, 16), (16, 32, 16), (16, 8, 4), (32, 8, 8)):
        cx = dict(R=32, C=32, BLOCK_R=br, NBLK=nblk, CNT=CNT, GPB=4, HAS_BIAS=False, ASM=True)
        wpt = br * CNT * 32 / (32 * warps)  # weights per thread per launch (the kernel has no loop)
        # maxnreg 32 where the tuner's config sets it (`bsr.configs`: tiles that fit one wave only at 32 registers)
        mx = 32 if (nblk, warps) in ((64, 16), (32, 16), (64, 8)) else None
        out.append((f"ell_r{br}_n{nblk}_w{warps}", bsr_pk._bsr_gemv_pk_ell_kernel, ell_sig, cx, warps, wpt, mx))
    return out


def load_order(sass: str) -> str:
    """The global loads up to the first HFMA2: 'LDG.E.128 x3, LDG.E x2, ...' (run-length, in program order)."""
    insns, _ = parse(sass)
    runs = []
    for _, op, _ in insns:
        if op.startswith("HFMA2") or op.startswith("HADD2") or op.startswith("HMUL2"):
            break
        if op.startswith("LDG"):
            if runs and runs[-1][0] == op:
                runs[-1][1] += 1
            else:
                runs.append([op, 1])
    return ", ".join(f"{op} x{n}" for op, n in runs)


def main(argv: list[str]) -> int:
    import triton

    print("triton", triton.__version__)
    names = [a for a in argv if not a.startswith("--")]
    for name, fn, sig, cx, warps, wpt, mx in cases():
        if names and not any(n in name for n in names):
            continue
        k = compile_sm90(fn, sig, cx, divisible=("x_ptr", "col_ptr", "v_ptr", "s_ptr", "out_ptr", "N"),
                         num_warps=warps, num_stages=1, maxnreg=mx)
        sass = full_sass(k)
        print(f"== {name} (num_warps {warps})")
        print(summary(k, wpt))
        print("  loads before the first fp16x2 op:", load_order(sass))
        if "--dump" in argv:
            with open(f"/tmp/sass_bsrpk_{name}.txt", "w") as f:
                f.write(sass)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
