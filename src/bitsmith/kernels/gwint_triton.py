"""Triton kernels for the `gwint` format (layout: see `bitsmith.kernels.gwint`).

Three regimes, one launcher (`linear`):

    M == 1          `_gemv_wide_kernel` where a K tile lies inside one group (tuned first), `_gemv_deep_kernel`
                    (fp16, 4/8-bit, groups of whole word-row pairs), else `_gemv_kernel`; no tensor cores. The
                    deep one puts threads and warps along K: a program owns 16-64 columns and (at K = 4096) the
                    whole K, so no split-K epilogue; one row reduction at the end (best at the 4096-wide decode
                    shapes). The wide one gives each thread 4 or 8 whole columns of a 4-row word tile
                    (every warp along N), does a fixed number of tiles per program (unrolled, so later tiles'
                    loads are issued early) and for fp16 with 4/8-bit codes dequantizes and multiplies two codes
                    per fp16x2 instruction (inline PTX; a Triton fallback under the interpreter). The older one
                    owns BLOCK_N output columns and a slice of K (split-K); the P code slots of a
                    [BLOCK_KW, BLOCK_N] word tile are unrolled, each a 2D tile in the load's layout.
                    `fused_gemv`: the deep one with a decoder layer's RMSNorm in its prologue and/or the
                    SiLU-multiply of interleaved gate/up columns in its epilogue (`fused_ops`).
    2 <= M < 256    `_gemm_kernel`: dequantize a K tile of weights to fp16/bf16 in registers and `tl.dot` it
                    (mma on Hopper for small BLOCK_M, wgmma from 64 rows); split-K for small M. Either one dot per
                    code slot (`sliced`: [BM, BLOCK_KW] x [BLOCK_KW, BN], no reshape of the weights) or one dot
                    on the reshaped [BLOCK_K, BN] tile; the tuner picks.
    M >= 256        `_dequant_kernel` writes W^T once, then cuBLAS (`DEQUANT_MIN_M`, from the measured crossover).

    1 <= M < 256    `_gemm_t_kernel` ("swapped", a tuning candidate beside the two above wherever each K tile lies
                    in one group): out^T = W @ x^T, so the weights are the mma's A operand and M its N dimension
                    (16..128). The word tile is copied to shared memory asynchronously; each code slot j is
                    dequantized elementwise straight into the registers of the A fragments (no shared-memory
                    round trip of dequantized weights) and dotted with a [BLOCK_KW, BLOCK_M] tile of activations
                    that `_xperm_kernel` (a second, small launch) laid out so that slot j's activations of a K
                    tile are contiguous. Triton 3.6 still waits for each such wgmma before the next (its A
                    operand is made inside the loop), so latency is hidden by several programs per SM.

Codes become floats with the exponent trick instead of int->float conversions (which run at a quarter of the
ALU rate): `code | 0x4B000000` read as float32 is 2^23 + code, `code | 0x6400` read as float16 is 1024 + code;
one subtraction of (magic + zero point) then gives the exact value (code - z).

Split-K partial sums are reduced without a second launch and without zero-filling anything per call: every
split atomically adds its fp32 tile into a workspace, then bumps a per-tile counter; the split that arrives last
reads the sum, writes the output (and bias), and puts the workspace tile and the counter back to zero. The
workspace is allocated once per (device, stream) and reused, so the forward has no host synchronisation and can
be captured in a CUDA graph once a call has warmed it up (tuning and workspace allocation happen outside capture).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
import triton.runtime.errors

from .launch import flat_rows, grouped_pid, median_replay_ms

MAGIC_F32 = 0x4B000000  # float32 2^23; a kernel argument so that it sits in a register (see `_slot`)
# Programmatic dependent launch of the M == 1 GEMVs (wide and deep; Hopper and later): launched with the PDL
# attribute, a GEMV may start while the kernel before it finishes; it loads its first weights (which no kernel
# writes), then waits (griddepcontrol.wait: the previous kernel complete, its writes visible) before it reads x or
# writes anything, then lets the next kernel launch. Off by default; BITSMITH_PDL=1 or `bench generate --pdl`.
PDL = os.environ.get("BITSMITH_PDL", "0") == "1"
DEQUANT_MIN_M = 256  # from this many rows on, dequantize once and call cuBLAS (see docs/results/kernels-gwint.md)


# --------------------------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _codes(w, BITS: tl.constexpr, P: tl.constexpr, P2: tl.constexpr):
    """w: int32 words [BKW, BN] -> codes int32 [BKW, P2, BN] (slots j >= P repeat slot 0; callers mask them)."""
    j = tl.arange(0, P2)
    shift = tl.where(j < P, j * BITS, 0)
    return (w[:, None, :] >> shift[None, :, None]) & ((1 << BITS) - 1)


@triton.jit
def _code_minus_zero_f32(q, zf):
    """Exact (code - z) in float32; zf = z + 2^23 (float32, broadcastable)."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - zf


@triton.jit
def _code_minus_zero_f16(q, zh):
    """Exact (code - z) in float16 (codes < 1024); zh = z + 1024 (float16, broadcastable)."""
    return (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - zh


@triton.jit
def _epilogue(acc, offs_m, offs_n, M, N, out_ptr, stride_om, b_ptr, ws_ptr, cnt_ptr, tile_id, split_k,
              HAS_BIAS: tl.constexpr):
    """acc fp32 [BM, BN] -> out (+ bias); with split_k > 1 the last split of this tile does the store."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if split_k == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        ws_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(ws_ptrs, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()  # every thread's adds are issued before the counter is released
        prev = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel")
        if prev == split_k - 1:
            tot = tl.load(ws_ptrs, mask=mask, other=0.0, volatile=True)
            if HAS_BIAS:
                tot += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptrs, tot.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(ws_ptrs, tl.zeros_like(tot), mask=mask)
            tl.atomic_xchg(cnt_ptr + tile_id, 0)


# --------------------------------------------------------------------------------------------------------------
# M == 1


@triton.jit
def _slot(w, hi, magic, j: tl.constexpr, BITS: tl.constexpr, HI: tl.constexpr):
    """Code slot j of each int32 word, as float32 2^23 + code * 2^p: one AND-OR, no shift.

    p = j * BITS - HI * (j * BITS + BITS > 23), the code's bit position in the word it is read from:
    slots whose bits end at or below bit 23 are masked in place (the code lands in the mantissa, times 2^p);
    the others come from `hi` = word >> HI, computed once per word. `magic` is 0x4B000000 passed at run time:
    as a register operand, AND and OR fuse into one LOP3 (with two immediates ptxas emits two).
    """
    MASK: tl.constexpr = (1 << BITS) - 1
    if j * BITS + BITS <= 23:
        f = ((w & (MASK << (j * BITS))) | magic).to(tl.float32, bitcast=True)
    else:
        f = ((hi & (MASK << (j * BITS - HI))) | magic).to(tl.float32, bitcast=True)
    return f


@triton.jit
def _pick(t, bit: tl.constexpr):
    """t [A, B, n] -> t[:, :, bit::2] as [A, B, n // 2] (register renaming when the pairs sit in one thread)."""
    lo, hi = tl.split(tl.reshape(t, [t.shape[0], t.shape[1], t.shape[2] // 2, 2]))
    r = lo
    if bit:
        r = hi
    return r


@triton.jit
def _take(a3, j: tl.constexpr, P: tl.constexpr):
    """a3 [A, B, P] (P a power of two) -> a3[:, :, j] as [A, B]."""
    t = _pick(a3, j & 1)
    if P >= 4:
        t = _pick(t, (j >> 1) & 1)
    if P >= 8:
        t = _pick(t, (j >> 2) & 1)
    if P >= 16:
        t = _pick(t, (j >> 3) & 1)
    if P >= 32:
        t = _pick(t, (j >> 4) & 1)
    return tl.reshape(t, [a3.shape[0], a3.shape[1]])


@triton.jit
def _gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
                 N, K, KW, G, group_size, k_iters, split_k, magic,
                 BITS: tl.constexpr, P: tl.constexpr, HI: tl.constexpr, SYM: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SCALE_MODE: tl.constexpr, EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    # x: [K], qweight: [KW, N] int32, scales/zeros: [G, N], out: [N]
    # EVEN: every tile of every split is full (no masks on the weight and x loads)
    # Slot j of word row kw holds k = kw * P + j; the P slots are unrolled, so every tensor is a 2D [BKW, BN] tile
    # in the layout of the word load and all reductions over K stay inside a thread until the end.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rw = tl.arange(0, BLOCK_KW)
    MAGIC: tl.constexpr = 8388608.0
    ZC: tl.constexpr = 1 << (BITS - 1)
    acc = tl.zeros([BLOCK_KW, BLOCK_N], dtype=tl.float32)
    kw_begin = pid_k * k_iters * BLOCK_KW
    for it in range(k_iters):
        kw0 = kw_begin + it * BLOCK_KW
        kw = kw0 + rw  # [BKW]
        if EVEN:
            w = tl.load(qw_ptr + kw[:, None] * N + offs_n[None, :])
        else:
            w = tl.load(qw_ptr + kw[:, None] * N + offs_n[None, :], mask=(kw[:, None] < KW) & n_mask[None, :],
                        other=0)
        hi = w >> HI
        kb = kw * P
        if SCALE_MODE == 0:  # the whole tile lies in one group
            g = tl.minimum((kw0 * P) // group_size, G - 1)
            s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            if not SYM:
                zf = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)[None, :]
        elif SCALE_MODE == 1:  # one group per word row
            g = tl.minimum(kb // group_size, G - 1)
            gs = g[:, None] * N + offs_n[None, :]
            s = tl.load(s_ptr + gs, mask=n_mask[None, :], other=0.0).to(tl.float32)
            if not SYM:
                zf = tl.load(z_ptr + gs, mask=n_mask[None, :], other=0).to(tl.float32)
        t = tl.zeros([BLOCK_KW, BLOCK_N], dtype=tl.float32)
        for j in tl.static_range(P):
            pos = j * BITS - HI * (j * BITS + BITS > 23)  # constexpr
            f = _slot(w, hi, magic, j, BITS, HI)  # 2^23 + code * 2^pos
            if EVEN:
                xj = tl.load(x_ptr + kb + j).to(tl.float32) * (1.0 / (1 << pos))
            else:
                xj = tl.load(x_ptr + kb + j, mask=(kb + j) < K, other=0.0).to(tl.float32) * (1.0 / (1 << pos))
            if SCALE_MODE == 2:  # one group per code
                g = tl.minimum((kb + j) // group_size, G - 1)
                gs = g[:, None] * N + offs_n[None, :]
                s = tl.load(s_ptr + gs, mask=n_mask[None, :], other=0.0).to(tl.float32)
                if not SYM:
                    zf = tl.load(z_ptr + gs, mask=n_mask[None, :], other=0).to(tl.float32)
            if SYM:
                v = f - (MAGIC + ZC * (1 << pos))  # exact (code - z) * 2^pos
            else:
                v = f - (zf * (1 << pos) + MAGIC)
            if SCALE_MODE == 2:
                v = v * s
            t += v * xj[:, None]
        if SCALE_MODE == 2:
            acc += t
        else:
            acc += t * s
    res = tl.sum(acc, axis=0)  # [BN]
    _epilogue(res[None, :], tl.arange(0, 1), offs_n, 1, N, out_ptr, N, b_ptr, ws_ptr, cnt_ptr, pid_n, split_k,
              HAS_BIAS)


@triton.jit
def _gemv_wide_tile(acc, w, x_ptr, s_ptr, z_ptr, kw0, offs_n, n_mask, K, N, G, group_size, magic,
                    BITS: tl.constexpr, P: tl.constexpr, HI: tl.constexpr, SYM: tl.constexpr, EVEN: tl.constexpr,
                    BLOCK_KW: tl.constexpr):
    """One [BKW, BN] word tile of `_gemv_wide_kernel` (inside one group) added to acc [BN]."""
    MAGIC: tl.constexpr = 8388608.0
    ZC: tl.constexpr = 1 << (BITS - 1)
    kb = (kw0 + tl.arange(0, BLOCK_KW)) * P  # [BKW], every thread holds all rows
    g = tl.minimum((kw0 * P) // group_size, G - 1)
    s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)  # [BN], a thread's own columns
    if not SYM:
        zf = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)
    hi = w >> HI
    t = tl.zeros(w.shape, dtype=tl.float32)
    for j in tl.static_range(P):
        pos = j * BITS - HI * (j * BITS + BITS > 23)  # constexpr
        f = _slot(w, hi, magic, j, BITS, HI)  # 2^23 + code * 2^pos
        # one x per (row, slot), scaled by 2^-pos, shared by the thread's columns (a broadcast load)
        if EVEN:
            xj = tl.load(x_ptr + kb + j).to(tl.float32) * (1.0 / (1 << pos))
        else:
            xj = tl.load(x_ptr + kb + j, mask=(kb + j) < K, other=0.0).to(tl.float32) * (1.0 / (1 << pos))
        if SYM:
            v = f - (MAGIC + ZC * (1 << pos))  # exact (code - z) * 2^pos
        else:
            v = f - (zf * (1 << pos) + MAGIC)[None, :]
        t += v * xj[:, None]
    return acc + tl.sum(t, axis=0) * s  # rows are in-thread: the sum is register adds


@triton.jit
def _pdl_wait(PDL: tl.constexpr):
    """With programmatic dependent launch (see `PDL`): wait until the previous kernel is complete and its writes
    visible (everything before this may only read weights), then let the next kernel launch (it waits likewise
    before it reads what this one writes)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _gemv_wide_words(qw_ptr, kw0, kw_end, rw, offs_n, n_mask, N, EVEN: tl.constexpr):
    """The [BKW, BN] word tile at word row kw0 (rows from kw_end on read as 0)."""
    ptrs = qw_ptr + (kw0 + rw)[:, None] * N + offs_n[None, :]
    if EVEN:
        w = tl.load(ptrs)
    else:
        w = tl.load(ptrs, mask=((kw0 + rw)[:, None] < kw_end) & n_mask[None, :], other=0)
    return w


# ---- packed fp16x2 path of the wide GEMV (fp16 activations, 4- and 8-bit codes)
#
# Two codes of a word become one fp16x2 register with one LOP3: (w & 0x000F000F) | 0x64006400 holds 1024 + code
# in each half (codes 0 and 4 of a 4-bit word; 0x00F000F0 gives 1024 + 16 * code for codes 1 and 5, w >> 8 the
# other four; 8-bit: 0x00FF00FF on w and w >> 8). One HSUB2 of the zero pair makes them exact (code - z) (x 16),
# one HFMA2 multiplies by the x pair (the 16 folded into x / 16) and accumulates in fp16, over two word rows
# (8 products per half for 4-bit, 4 for 8-bit), then the two halves go to fp32 once. That is about 1.9 (4-bit)
# and 2.25 (8-bit) instructions per weight instead of ~4 for the fp32 path; the fp16 partial sums cost about 2x
# the fp32 path's rounding error (measured 4e-4 relative on random data vs 2e-4). Under TRITON_INTERPRET=1, which
# cannot run inline assembly, the same arithmetic runs as fp16 Triton ops (`_pk_half_ref`).

_PK_X = tl.constexpr("mov.b32 $0, {$1, $2};")  # two fp16 -> one fp16x2 register


def _pk_word_asm(bits: int, word: int, acc: bool) -> str:
    """PTX for one word of the packed dot: argument $word (1: even row, 2: odd row), its x pairs (4-bit: $3..$6 /
    $7..$10, 8-bit: $3 $4 / $5 $6), zero pairs $z1 $z16 (4-bit: $11 $12; 8-bit: $7); the fp16x2 sum goes to t
    (the even row's first product initialises it)."""
    n = 4 if bits == 4 else 2  # x pairs per word
    xs = [3 + (word - 1) * n + i for i in range(n)]
    z1, z16 = (11, 12) if bits == 4 else (7, 7)
    first = "mul.rn.f16x2 t, a, ${x};" if not acc else "fma.rn.f16x2 t, a, ${x}, t;"
    fma = "fma.rn.f16x2 t, a, ${x}, t;"
    if bits == 4:  # pairs (0, 4), (1, 5) x 16, (2, 6), (3, 7) x 16
        steps = [("${w}".format(w=word), "k0", z1), ("${w}".format(w=word), "k1", z16), ("h", "k0", z1),
                 ("h", "k1", z16)]
    else:  # pairs (0, 2), (1, 3)
        steps = [("${w}".format(w=word), "k0", z1), ("h", "k0", z1)]
    lines = []
    for i, (src, mask, z) in enumerate(steps):
        if src == "h" and (i == 0 or steps[i - 1][0] != "h"):
            lines.append(f"shr.u32 h, ${word}, 8;")
        lines += [f"lop3.b32 a, {src}, {mask}, m, 0xEA;", f"sub.rn.f16x2 a, a, ${z};",
                  (first if i == 0 else fma).format(x=xs[i])]
    return "\n".join(lines)


def _pk_asm(bits: int) -> str:
    """$0 (f32) = sum of both halves of the fp16x2 dot of two words ($1 even row, $2 odd row) with their x pairs."""
    k0 = "0x000F000F" if bits == 4 else "0x00FF00FF"
    head = ["{", ".reg .b32 a, h, t, k0, k1, m;", ".reg .b16 lo, hi;", ".reg .f32 f0, f1;",
            f"mov.b32 k0, {k0};", "mov.b32 k1, 0x00F000F0;", "mov.b32 m, 0x64006400;"]
    tail = ["mov.b32 {lo, hi}, t;", "cvt.f32.f16 f0, lo;", "cvt.f32.f16 f1, hi;", "add.f32 $0, f0, f1;", "}"]
    return "\n".join(head + [_pk_word_asm(bits, 1, False), _pk_word_asm(bits, 2, True)] + tail)


_PK_ASM4 = tl.constexpr(_pk_asm(4))
_PK_ASM8 = tl.constexpr(_pk_asm(8))


@triton.jit
def _pk_code16(w, shift: tl.constexpr, mask: tl.constexpr):
    """fp16 1024 + ((w >> shift) & mask): one half of a packed pair, for the interpreter path."""
    return (((w >> shift) & mask) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _pk_half_ref(we, wo, xe, xo, zh1, zh16, h: tl.constexpr, BITS: tl.constexpr):
    """Half h (0 low, 1 high) of the packed dot (`_PK_ASM4` / `_PK_ASM8`) in fp16 Triton ops: xe / xo are the
    even / odd rows' x values for this half, in the PTX's order."""
    if BITS == 4:
        t = (_pk_code16(we, 16 * h, 0xF) - zh1) * xe[0]
        t += (_pk_code16(we, 16 * h, 0xF0) - zh16) * xe[1]
        t += (_pk_code16(we, 16 * h + 8, 0xF) - zh1) * xe[2]
        t += (_pk_code16(we, 16 * h + 8, 0xF0) - zh16) * xe[3]
        t += (_pk_code16(wo, 16 * h, 0xF) - zh1) * xo[0]
        t += (_pk_code16(wo, 16 * h, 0xF0) - zh16) * xo[1]
        t += (_pk_code16(wo, 16 * h + 8, 0xF) - zh1) * xo[2]
        t += (_pk_code16(wo, 16 * h + 8, 0xF0) - zh16) * xo[3]
    else:
        t = (_pk_code16(we, 16 * h, 0xFF) - zh1) * xe[0]
        t += (_pk_code16(we, 16 * h + 8, 0xFF) - zh1) * xe[1]
        t += (_pk_code16(wo, 16 * h, 0xFF) - zh1) * xo[0]
        t += (_pk_code16(wo, 16 * h + 8, 0xFF) - zh1) * xo[1]
    return t.to(tl.float32)


@triton.jit
def _pk_x(x_ptr, kb, K, j: tl.constexpr, sc: tl.constexpr, EVEN: tl.constexpr):
    """x[kb + j] * sc as fp16 (sc 1 or 1/16: exact)."""
    if EVEN:
        v = tl.load(x_ptr + kb + j)
    else:
        v = tl.load(x_ptr + kb + j, mask=(kb + j) < K, other=0.0)
    if sc != 1.0:
        v = v * sc
    return v


_PK_MUL = tl.constexpr("mul.rn.f16x2 $0, $1, $2;")


@triton.jit
def _pk_xpair(x_ptr, kb, K, j0: tl.constexpr, j1: tl.constexpr, sc: tl.constexpr, EVEN: tl.constexpr,
              ASM: tl.constexpr, nw_ptr, rstd16, NORM: tl.constexpr):
    """[rows] x pair (x[kb + j0], x[kb + j1]) * sc: one fp16x2 int32 (ASM) or a tuple of two fp16 vectors.

    NORM: the pair of RMSNorm(x) instead, fp16(x * rstd16) * weight (rstd16: 1 / rms(x) rounded to fp16, Llama's
    rounding but for that one extra rounding of rstd, < 2^-11 relative); one fp16 multiply per x and one fp16x2
    multiply per pair (the weight halves loaded like x's: a pairwise copy of the weight would need a cache keyed
    by tensor, and under torch.compile the op is not always handed the same tensor object)."""
    a = _pk_x(x_ptr, kb, K, j0, sc, EVEN)
    b = _pk_x(x_ptr, kb, K, j1, sc, EVEN)
    if NORM:
        a = a * rstd16
        b = b * rstd16
        wa = _pk_x(nw_ptr, kb, K, j0, 1.0, EVEN)
        wb = _pk_x(nw_ptr, kb, K, j1, 1.0, EVEN)
    if ASM:
        r = tl.inline_asm_elementwise(_PK_X, "=r,h,h", [a, b], dtype=tl.int32, is_pure=True, pack=1)
        if NORM:
            w2 = tl.inline_asm_elementwise(_PK_X, "=r,h,h", [wa, wb], dtype=tl.int32, is_pure=True, pack=1)
            r = tl.inline_asm_elementwise(_PK_MUL, "=r,r,r", [r, w2], dtype=tl.int32, is_pure=True, pack=1)
    else:
        if NORM:  # the same products in fp16 Triton ops
            a = a * wa
            b = b * wb
        r = (a, b)
    return r


@triton.jit
def _gemv_packed_tile(acc, we, wo, x_ptr, s_ptr, z_ptr, kw0, offs_n, n_mask, K, N, G, group_size,
                      BITS: tl.constexpr, P: tl.constexpr, SYM: tl.constexpr, EVEN: tl.constexpr,
                      BLOCK_KW: tl.constexpr, ASM: tl.constexpr, ROW_SCALES: tl.constexpr, nw_ptr, rstd16,
                      NORM: tl.constexpr):
    """One word tile of the wide GEMV, packed fp16x2 path: we / wo [BKW/2, BN] are its even / odd word rows.

    ROW_SCALES False (wide GEMV): the tile lies in one group, acc is [BN] and the rows are summed here.
    ROW_SCALES True (deep GEMV): each pair of word rows lies in one group (scales/zeros gathered per pair), acc is
    [BKW/2, BN] and the caller sums the rows once at the end (they are spread over threads and warps).
    NORM: x is RMS-normalised on the fly (see `_pk_xpair`; the deep GEMV's fused RMSNorm)."""
    ZC: tl.constexpr = 1 << (BITS - 1)
    kbe = (kw0 + 2 * tl.arange(0, BLOCK_KW // 2)) * P  # [BKW/2]: the even rows' first k
    kbo = kbe + P
    if ROW_SCALES:
        gs2 = tl.minimum(kbe // group_size, G - 1)[:, None] * N + offs_n[None, :]  # [BKW/2, BN]
        s = tl.load(s_ptr + gs2, mask=n_mask[None, :], other=0.0).to(tl.float32)
    else:
        g = tl.minimum((kw0 * P) // group_size, G - 1)
        s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    # zero pairs: fp16 1024 + z is the bit pattern 0x6400 | z (z < 1024), in both halves
    if SYM:
        z1 = tl.full([1, 1], (0x6400 | ZC) * 0x10001, tl.int32)
        z16 = tl.full([1, 1], (0x6400 | (16 * ZC)) * 0x10001, tl.int32)
    else:
        if ROW_SCALES:
            zi = tl.load(z_ptr + gs2, mask=n_mask[None, :], other=0).to(tl.int32)
        else:
            zi = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.int32)[None, :]
        z1 = (0x6400 | zi) * 0x10001
        z16 = (0x6400 | (zi * 16)) * 0x10001
    if BITS == 4:
        # pairs (0, 4), (1, 5) / 16, (2, 6), (3, 7) / 16 of each row
        xe0 = _pk_xpair(x_ptr, kbe, K, 0, 4, 1.0, EVEN, ASM, nw_ptr, rstd16, NORM)
        xe1 = _pk_xpair(x_ptr, kbe, K, 1, 5, 0.0625, EVEN, ASM, nw_ptr, rstd16, NORM)
        xe2 = _pk_xpair(x_ptr, kbe, K, 2, 6, 1.0, EVEN, ASM, nw_ptr, rstd16, NORM)
        xe3 = _pk_xpair(x_ptr, kbe, K, 3, 7, 0.0625, EVEN, ASM, nw_ptr, rstd16, NORM)
        xo0 = _pk_xpair(x_ptr, kbo, K, 0, 4, 1.0, EVEN, ASM, nw_ptr, rstd16, NORM)
        xo1 = _pk_xpair(x_ptr, kbo, K, 1, 5, 0.0625, EVEN, ASM, nw_ptr, rstd16, NORM)
        xo2 = _pk_xpair(x_ptr, kbo, K, 2, 6, 1.0, EVEN, ASM, nw_ptr, rstd16, NORM)
        xo3 = _pk_xpair(x_ptr, kbo, K, 3, 7, 0.0625, EVEN, ASM, nw_ptr, rstd16, NORM)
        if ASM:
            r = tl.inline_asm_elementwise(
                _PK_ASM4, "=r,r,r,r,r,r,r,r,r,r,r,r,r",
                [we, wo, xe0[:, None], xe1[:, None], xe2[:, None], xe3[:, None], xo0[:, None], xo1[:, None],
                 xo2[:, None], xo3[:, None], z1, z16], dtype=tl.float32, is_pure=True, pack=1)
        else:
            zh1 = (z1 & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
            zh16 = (z16 & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
            r = _pk_half_ref(we, wo, (xe0[0][:, None], xe1[0][:, None], xe2[0][:, None], xe3[0][:, None]),
                             (xo0[0][:, None], xo1[0][:, None], xo2[0][:, None], xo3[0][:, None]), zh1, zh16, 0, 4)
            r += _pk_half_ref(we, wo, (xe0[1][:, None], xe1[1][:, None], xe2[1][:, None], xe3[1][:, None]),
                              (xo0[1][:, None], xo1[1][:, None], xo2[1][:, None], xo3[1][:, None]), zh1, zh16, 1, 4)
    else:
        # pairs (0, 2), (1, 3) of each row
        xe0 = _pk_xpair(x_ptr, kbe, K, 0, 2, 1.0, EVEN, ASM, nw_ptr, rstd16, NORM)
        xe1 = _pk_xpair(x_ptr, kbe, K, 1, 3, 1.0, EVEN, ASM, nw_ptr, rstd16, NORM)
        xo0 = _pk_xpair(x_ptr, kbo, K, 0, 2, 1.0, EVEN, ASM, nw_ptr, rstd16, NORM)
        xo1 = _pk_xpair(x_ptr, kbo, K, 1, 3, 1.0, EVEN, ASM, nw_ptr, rstd16, NORM)
        if ASM:
            r = tl.inline_asm_elementwise(
                _PK_ASM8, "=r,r,r,r,r,r,r,r,r",
                [we, wo, xe0[:, None], xe1[:, None], xo0[:, None], xo1[:, None], z1, z16], dtype=tl.float32,
                is_pure=True, pack=1)
        else:
            zh1 = (z1 & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
            r = _pk_half_ref(we, wo, (xe0[0][:, None], xe1[0][:, None]), (xo0[0][:, None], xo1[0][:, None]),
                             zh1, zh1, 0, 8)
            r += _pk_half_ref(we, wo, (xe0[1][:, None], xe1[1][:, None]), (xo0[1][:, None], xo1[1][:, None]),
                              zh1, zh1, 1, 8)
    if ROW_SCALES:
        res = acc + r * s
    else:
        res = acc + tl.sum(r, axis=0) * s
    return res


@triton.jit
def _gemv_wide_words2(qw_ptr, kw0, kw_end, rh, offs_n, n_mask, N, EVEN: tl.constexpr):
    """The even and odd word rows of the tile at kw0, each [BKW/2, BN] (rows from kw_end on read as 0)."""
    re = kw0 + 2 * rh
    pe = qw_ptr + re[:, None] * N + offs_n[None, :]
    if EVEN:
        we = tl.load(pe)
        wo = tl.load(pe + N)
    else:
        we = tl.load(pe, mask=(re[:, None] < kw_end) & n_mask[None, :], other=0)
        wo = tl.load(pe + N, mask=((re + 1)[:, None] < kw_end) & n_mask[None, :], other=0)
    return we, wo


@triton.jit
def _gemv_wide_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
                      N, K, KW, G, group_size, k_iters, split_k, magic,
                      BITS: tl.constexpr, P: tl.constexpr, HI: tl.constexpr, SYM: tl.constexpr,
                      HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                      UNROLL: tl.constexpr, PACKED: tl.constexpr = False, ASM: tl.constexpr = False,
                      PDL: tl.constexpr = False):
    # x: [K], qweight: [KW, N] int32, scales/zeros: [G, N], out: [N]; every K tile lies inside one group.
    # UNROLL > 0: every split is exactly UNROLL tiles (k_iters == UNROLL), unrolled; 0: a run-time loop.
    # Unlike `_gemv_kernel`, BLOCK_N is wide (4 or 8 columns per thread: BLOCK_N = 128 or 256 x num_warps), so
    # the compiler puts every warp along N and each thread holds all BLOCK_KW word rows of its columns: x is one
    # broadcast scalar per (row, slot) shared by the thread's columns, the scales are the thread's own columns (no
    # shared-memory broadcast, no barrier), and the reduction over K never leaves the thread. The next tile's
    # words are loaded before the current tile is consumed, so two tiles of loads are in flight per thread.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rw = tl.arange(0, BLOCK_KW)
    kw_begin = pid_k * k_iters * BLOCK_KW
    kw_end = tl.minimum(kw_begin + k_iters * BLOCK_KW, KW)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    if PACKED:  # fp16x2 path (see _gemv_packed_tile); always unrolled
        rh = tl.arange(0, BLOCK_KW // 2)
        we, wo = _gemv_wide_words2(qw_ptr, kw_begin, kw_end, rh, offs_n, n_mask, N, EVEN)
        _pdl_wait(PDL)
        for i in tl.static_range(UNROLL):
            if i + 1 < UNROLL:
                we_next, wo_next = _gemv_wide_words2(qw_ptr, kw_begin + (i + 1) * BLOCK_KW, kw_end, rh, offs_n,
                                                     n_mask, N, EVEN)
            acc = _gemv_packed_tile(acc, we, wo, x_ptr, s_ptr, z_ptr, kw_begin + i * BLOCK_KW, offs_n, n_mask, K, N,
                                    G, group_size, BITS, P, SYM, EVEN, BLOCK_KW, ASM, False, x_ptr, 1.0, False)
            if i + 1 < UNROLL:
                we = we_next
                wo = wo_next
    elif UNROLL > 0:
        # k_iters == UNROLL tiles, straight-line code: the compiler is free to issue every tile's loads early
        w = _gemv_wide_words(qw_ptr, kw_begin, kw_end, rw, offs_n, n_mask, N, EVEN)
        _pdl_wait(PDL)
        for i in tl.static_range(UNROLL):
            if i + 1 < UNROLL:
                w_next = _gemv_wide_words(qw_ptr, kw_begin + (i + 1) * BLOCK_KW, kw_end, rw, offs_n, n_mask, N,
                                          EVEN)
            acc = _gemv_wide_tile(acc, w, x_ptr, s_ptr, z_ptr, kw_begin + i * BLOCK_KW, offs_n, n_mask, K, N, G,
                                  group_size, magic, BITS, P, HI, SYM, EVEN, BLOCK_KW)
            if i + 1 < UNROLL:
                w = w_next
    else:
        # a run-time count of tiles, two per iteration: b is loaded before a is consumed, the next a before b is
        # consumed (ptxas still issues the loop-carried loads of a late: see docs/results/kernels-gwint.md)
        w_a = _gemv_wide_words(qw_ptr, kw_begin, kw_end, rw, offs_n, n_mask, N, EVEN)
        _pdl_wait(PDL)
        n_pairs = (k_iters - 1) // 2
        for p in range(n_pairs):
            kw_a = kw_begin + 2 * p * BLOCK_KW
            w_b = _gemv_wide_words(qw_ptr, kw_a + BLOCK_KW, kw_end, rw, offs_n, n_mask, N, EVEN)
            acc = _gemv_wide_tile(acc, w_a, x_ptr, s_ptr, z_ptr, kw_a, offs_n, n_mask, K, N, G, group_size, magic,
                                  BITS, P, HI, SYM, EVEN, BLOCK_KW)
            w_a = _gemv_wide_words(qw_ptr, kw_a + 2 * BLOCK_KW, kw_end, rw, offs_n, n_mask, N, EVEN)
            acc = _gemv_wide_tile(acc, w_b, x_ptr, s_ptr, z_ptr, kw_a + BLOCK_KW, offs_n, n_mask, K, N, G,
                                  group_size, magic, BITS, P, HI, SYM, EVEN, BLOCK_KW)
        kw_a = kw_begin + 2 * n_pairs * BLOCK_KW
        if k_iters - 2 * n_pairs == 2:  # two tiles left
            w_b = _gemv_wide_words(qw_ptr, kw_a + BLOCK_KW, kw_end, rw, offs_n, n_mask, N, EVEN)
            acc = _gemv_wide_tile(acc, w_a, x_ptr, s_ptr, z_ptr, kw_a, offs_n, n_mask, K, N, G, group_size, magic,
                                  BITS, P, HI, SYM, EVEN, BLOCK_KW)
            acc = _gemv_wide_tile(acc, w_b, x_ptr, s_ptr, z_ptr, kw_a + BLOCK_KW, offs_n, n_mask, K, N, G,
                                  group_size, magic, BITS, P, HI, SYM, EVEN, BLOCK_KW)
        else:
            acc = _gemv_wide_tile(acc, w_a, x_ptr, s_ptr, z_ptr, kw_a, offs_n, n_mask, K, N, G, group_size, magic,
                                  BITS, P, HI, SYM, EVEN, BLOCK_KW)
    _epilogue(acc[None, :], tl.arange(0, 1), offs_n, 1, N, out_ptr, N, b_ptr, ws_ptr, cnt_ptr, pid_n, split_k,
              HAS_BIAS)


@triton.jit
def _gemv_deep_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, nw_ptr,
                      N, K, KW, G, group_size, split_k, eps,
                      BITS: tl.constexpr, P: tl.constexpr, SYM: tl.constexpr, HAS_BIAS: tl.constexpr,
                      EVEN: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, UNROLL: tl.constexpr,
                      ASM: tl.constexpr, PDL: tl.constexpr = False, NORM: tl.constexpr = False,
                      GLU: tl.constexpr = False, RMS_BLOCK: tl.constexpr = 1024):
    # x: [K], qweight: [KW, N] int32, scales/zeros: [G, N], out: [N]; each pair of word rows lies inside one group.
    # Program (pid_n, pid_k): BLOCK_N (16..64) columns x UNROLL chunks of ROWS word rows, unrolled, the next chunk's
    # words loaded before the current one is consumed. Unlike the wide GEMV the threads and warps lie along K
    # (Triton gives each thread 4 columns = one 16-byte load per word row, 8 / 4 / 2 threads per row for 32 / 16 / 64
    # columns, the rest of the threads and every warp on other rows), so a program can own a narrow column block
    # and its whole K: at K = 4096 there are N / 32 programs, no split-K, no workspace atomics, and the only
    # cross-thread step is one reduction over rows at the end. The packed fp16x2 arithmetic is the wide path's
    # (`_gemv_packed_tile`), with the scales (and zeros) gathered per pair of word rows.
    # Fused decoder-layer options (`fused_gemv`; one split only): NORM, x is the residual stream and the GEMV
    # multiplies RMSNorm(x) * nw (every program computes 1 / rms(x) itself: x is 8 KB at K = 4096, read from L2
    # while its first weights are in flight); GLU, the columns are interleaved (gate, up) pairs and the program
    # stores SiLU(gate) * up, [N / 2] (the biases slot may hold a residual added before the store, as for any M = 1
    # GEMV: out = residual + x W^T).
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rh = tl.arange(0, ROWS // 2)
    kw_begin = pid_k * (UNROLL * ROWS)
    kw_end = tl.minimum(kw_begin + UNROLL * ROWS, KW)
    acc = tl.zeros([ROWS // 2, BLOCK_N], dtype=tl.float32)  # per (row pair, column): summed over rows at the end
    we, wo = _gemv_wide_words2(qw_ptr, kw_begin, kw_end, rh, offs_n, n_mask, N, EVEN)  # [ROWS/2, BN] each
    _pdl_wait(PDL)
    rstd16 = 1.0
    if NORM:
        rstd16 = _rms_rstd(x_ptr, K, eps, RMS_BLOCK).to(tl.float16)
    for i in tl.static_range(UNROLL):
        if i + 1 < UNROLL:
            we_next, wo_next = _gemv_wide_words2(qw_ptr, kw_begin + (i + 1) * ROWS, kw_end, rh, offs_n, n_mask, N,
                                                 EVEN)
        acc = _gemv_packed_tile(acc, we, wo, x_ptr, s_ptr, z_ptr, kw_begin + i * ROWS, offs_n, n_mask, K, N, G,
                                group_size, BITS, P, SYM, EVEN, ROWS, ASM, True, nw_ptr, rstd16, NORM)
        if i + 1 < UNROLL:
            we = we_next
            wo = wo_next
    res = tl.sum(acc, axis=0)  # [BN]: in-thread, across the warp's rows (shuffles), across warps (shared memory)
    if GLU:
        _glu_store(res, pid_n, N, out_ptr, BLOCK_N)
    else:
        _epilogue(res[None, :], tl.arange(0, 1), offs_n, 1, N, out_ptr, N, b_ptr, ws_ptr, cnt_ptr, pid_n, split_k,
                  HAS_BIAS)


@triton.jit
def _rms_rstd(x_ptr, K, eps, BLOCK: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) over x [K] in fp32, as Llama's RMSNorm computes it (BLOCK >= K: one pass of
    wide loads, no loop)."""
    ss = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
        ss += v * v
    return 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)


@triton.jit
def _glu_store(res, pid_n, N, out_ptr, BLOCK_N: tl.constexpr):
    """res [BN] fp32 of interleaved (gate, up) columns -> out[pid_n * BN/2 ...] = SiLU(gate) * up, each step
    rounded to the output dtype as the unfused ops round (gate and up stored, SiLU's result, the product)."""
    g, u = tl.split(tl.reshape(res, [BLOCK_N // 2, 2]))  # [BN/2] each
    dt = out_ptr.dtype.element_ty
    g = g.to(dt).to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(dt) * u.to(dt)
    offs = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    tl.store(out_ptr + offs, a, mask=offs < N // 2)


# --------------------------------------------------------------------------------------------------------------
# M >= 2: tensor cores


@triton.jit
def _gemm_tile_reshaped(acc, w, x_ptr, s_ptr, z_ptr, offs_m, offs_n, m_mask, n_mask, kw0, kw, K, N, G, group_size,
                        stride_xm, BITS: tl.constexpr, P: tl.constexpr, P2: tl.constexpr, SYM: tl.constexpr,
                        SCALE_MODE: tl.constexpr, SCALE_AFTER: tl.constexpr, DOT_F32: tl.constexpr,
                        BLOCK_KW: tl.constexpr):
    """One K tile of `_gemm_kernel` through a [BK, BN] operand (k order: word-major, slot-minor; slots >= P masked)."""
    BLOCK_K: tl.constexpr = BLOCK_KW * P2
    BLOCK_N: tl.constexpr = offs_n.shape[0]
    DT = x_ptr.dtype.element_ty
    ZC: tl.constexpr = 1 << (BITS - 1)
    r = tl.arange(0, BLOCK_K)
    r_kw = r // P2
    r_j = r % P2
    q = _codes(w, BITS, P, P2)  # [BKW, P2, BN]
    k = (kw0 + r_kw) * P + r_j  # [BK]
    a = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                mask=m_mask[:, None] & ((r_j < P) & (k < K))[None, :], other=0.0)
    if SCALE_MODE == 0:
        g = tl.minimum((kw0 * P) // group_size, G - 1)
        s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0)
        if DT == tl.float16:
            if SYM:
                v = _code_minus_zero_f16(q, 1024.0 + ZC)
            else:
                z = (tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32) + 1024.0).to(tl.float16)
                v = _code_minus_zero_f16(q, z[None, None, :])
            if not SCALE_AFTER:
                v = v * s.to(tl.float16)[None, None, :]
        else:
            if SYM:
                v = _code_minus_zero_f32(q, 8388608.0 + ZC)
            else:
                z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32) + 8388608.0
                v = _code_minus_zero_f32(q, z[None, None, :])
            if not SCALE_AFTER:
                v = v * s.to(tl.float32)[None, None, :]
            v = v.to(DT)
    else:
        j = tl.arange(0, P2)
        if SCALE_MODE == 1:
            g = tl.minimum((kw * P) // group_size, G - 1)
            gs = (g[:, None] * N + offs_n[None, :])[:, None, :]  # [BKW, 1, BN]
        else:
            kk = kw[:, None] * P + j[None, :]
            g = tl.minimum(kk // group_size, G - 1)
            gs = g[:, :, None] * N + offs_n[None, None, :]  # [BKW, P2, BN]
        s = tl.load(s_ptr + gs, mask=n_mask[None, None, :], other=0.0).to(tl.float32)
        if SYM:
            v = _code_minus_zero_f32(q, 8388608.0 + ZC)
        else:
            v = _code_minus_zero_f32(q, tl.load(z_ptr + gs, mask=n_mask[None, None, :], other=0).to(tl.float32)
                                     + 8388608.0)
        v = (v * s).to(DT)
    b = tl.reshape(v, [BLOCK_K, BLOCK_N])
    if DOT_F32:  # the CPU interpreter cannot multiply bf16; it rounds operands to bf16 and multiplies in fp32
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if SCALE_AFTER:
        acc += tl.dot(a, b) * s.to(tl.float32)[None, :]
    else:
        acc = tl.dot(a, b, acc)  # in place: lets the compiler keep wgmma in flight across iterations
    return acc


@triton.jit
def _gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
                 M, N, K, KW, G, group_size, stride_xm, stride_om, k_iters, split_k, magic,
                 BITS: tl.constexpr, P: tl.constexpr, P2: tl.constexpr, HI: tl.constexpr, SYM: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SCALE_MODE: tl.constexpr, SCALE_AFTER: tl.constexpr, SLICED: tl.constexpr,
                 DOT_F32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, GROUP_M: tl.constexpr):
    # x: [M, K], qweight: [KW, N] int32, scales/zeros: [G, N], out: [M, N]
    # SLICED (P a power of two, SCALE_MODE 0): one dot per code slot j, [BM, BKW] x [BKW, BN], B built from the
    # word tile in place (no reshape of the weights); A's slot-j columns come from splitting the loaded x tile.
    # Otherwise: the [BKW, P2, BN] codes are reshaped into one [BK, BN] operand.
    DT = x_ptr.dtype.element_ty
    pid_m, pid_n = grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rw = tl.arange(0, BLOCK_KW)
    ZC: tl.constexpr = 1 << (BITS - 1)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    kw_begin = pid_k * k_iters * BLOCK_KW
    for it in range(k_iters):
        kw0 = kw_begin + it * BLOCK_KW
        kw = kw0 + rw
        w = tl.load(qw_ptr + kw[:, None] * N + offs_n[None, :], mask=(kw[:, None] < KW) & n_mask[None, :], other=0)
        if SLICED:
            kk = kw0 * P + tl.arange(0, BLOCK_KW * P)
            a3 = tl.reshape(tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                                    mask=m_mask[:, None] & (kk < K)[None, :], other=0.0), [BLOCK_M, BLOCK_KW, P])
            hi = w >> HI
            g = tl.minimum((kw0 * P) // group_size, G - 1)
            s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            if not SYM:
                zf = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)
            if SCALE_AFTER:
                part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for j in tl.static_range(P):
                pos = j * BITS - HI * (j * BITS + BITS > 23)  # constexpr
                f = _slot(w, hi, magic, j, BITS, HI)
                if SYM:
                    v = f - (8388608.0 + ZC * (1 << pos))  # exact (code - z) * 2^pos
                else:
                    v = f - (zf * (1 << pos) + 8388608.0)[None, :]
                if SCALE_AFTER:
                    b = (v * (1.0 / (1 << pos))).to(DT)
                else:
                    b = (v * (s * (1.0 / (1 << pos)))[None, :]).to(DT)
                a_j = _take(a3, j, P)
                if DOT_F32:
                    a_j = a_j.to(tl.float32)
                    b = b.to(tl.float32)
                if SCALE_AFTER:
                    part = tl.dot(a_j, b, part)
                else:
                    acc = tl.dot(a_j, b, acc)
            if SCALE_AFTER:
                acc += part * s[None, :]
        else:
            acc = _gemm_tile_reshaped(acc, w, x_ptr, s_ptr, z_ptr, offs_m, offs_n, m_mask, n_mask, kw0, kw, K, N, G,
                                      group_size, stride_xm, BITS, P, P2, SYM, SCALE_MODE, SCALE_AFTER, DOT_F32,
                                      BLOCK_KW)
    _epilogue(acc, offs_m, offs_n, M, N, out_ptr, stride_om, b_ptr, ws_ptr, cnt_ptr, pid_m * num_n + pid_n,
              split_k, HAS_BIAS)


# --------------------------------------------------------------------------------------------------------------
# 1 <= M < 256, weights as the A operand ("swapped"): out^T [N, M] = W [N, K] @ x^T [K, M]


@triton.jit
def _xperm_kernel(x_ptr, xp_ptr, M, K, stride_xm, stride_pm,
                  P: tl.constexpr, P2: tl.constexpr, BLOCK_KW: tl.constexpr, BLOCK_R: tl.constexpr,
                  ODD16: tl.constexpr = False):
    """xp[m, t * BK + j * BLOCK_KW + i] = x[m, (t * BLOCK_KW + i) * P + j] (zero past K), BK = BLOCK_KW * P.

    Within each K tile of `_gemm_t_kernel`, the activations of code slot j become one contiguous run of BLOCK_KW,
    so that the B operand of the slot-j dot is a plain tile (asynchronously copied, multi-buffered) of xp.
    ODD16: odd slots are also divided by 16 (exact; the packed 4-bit A operand holds 16 x their weights).
    """
    t = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    i = tl.arange(0, BLOCK_KW)
    j = tl.arange(0, P2)
    src = (t * BLOCK_KW + i)[None, :] * P + j[:, None]  # [P2, BKW]
    dst = t * (BLOCK_KW * P) + j[:, None] * BLOCK_KW + i[None, :]
    rm = (rows < M)[:, None, None]
    v = tl.load(x_ptr + rows[:, None, None] * stride_xm + src[None, :, :],
                mask=rm & (src < K)[None, :, :] & (j < P)[None, :, None], other=0.0)
    if ODD16:
        v = tl.where((j % 2 == 1)[None, :, None], v * 0.0625, v)
    tl.store(xp_ptr + rows[:, None, None] * stride_pm + dst[None, :, :], v, mask=rm & (j < P)[None, :, None])


# ---- packed fp16x2 A operand of the swapped kernel (fp16, 4- and 8-bit codes)
#
# An fp16 A fragment register of wgmma holds two elements of one row that are neighbours along K; with
# `inline_asm_elementwise(pack=2)` the asm sees such a pair (whatever the layout: every input is paired the same
# way, so the result is right for any pairing, only its speed depends on it). For slot j the pair's two words
# w0, w1 give one fp16x2 with one PRMT (byte j // 2 (4-bit) or j (8-bit) of w0 -> byte 0, of w1 -> byte 2) and
# one LOP3 ((t & 0x000F000F) | 0x64006400 = 1024 + code in each half; 0x00F000F0 gives 1024 + 16 x code for the
# odd 4-bit slot of the same byte, whose x `_xperm_kernel` divides by 16), then HSUB2 (1024 + z pair, exact) and
# HMUL2 (scale pair, the only rounding, as in the fp16 path). 4-bit: 7 instructions per 4 weights, one PRMT for
# both slots of a byte; 8-bit: 4 per 2 weights. Under TRITON_INTERPRET=1 `_pkt_ref` runs the same fp16 math.


def _pkt_asm(bits: int, j: int) -> str:
    """PTX: $0 (, $1) = fp16x2 A pairs of slot j (4-bit: slots j and j + 1); inputs: the two words, the zero
    pair(s) (fp16 1024 + z; 4-bit also 1024 + 16 z) and the scale pair."""
    if bits == 4:
        b = j // 2
        sel = b | ((4 + b) << 8)
        return "\n".join([
            "{", ".reg .b32 t, a, m;", "mov.b32 m, 0x64006400;", f"prmt.b32 t, $2, $3, {sel:#x};",
            "lop3.b32 a, t, 0x000F000F, m, 0xEA;", "sub.rn.f16x2 a, a, $4;", "mul.rn.f16x2 $0, a, $6;",
            "lop3.b32 a, t, 0x00F000F0, m, 0xEA;", "sub.rn.f16x2 a, a, $5;", "mul.rn.f16x2 $1, a, $6;", "}"])
    sel = j | ((4 + j) << 8)
    return "\n".join([
        "{", ".reg .b32 t, a, m;", "mov.b32 m, 0x64006400;", f"prmt.b32 t, $1, $2, {sel:#x};",
        "lop3.b32 a, t, 0x00FF00FF, m, 0xEA;", "sub.rn.f16x2 a, a, $3;", "mul.rn.f16x2 $0, a, $4;", "}"])


_PKT4_0, _PKT4_2, _PKT4_4, _PKT4_6 = (tl.constexpr(_pkt_asm(4, j)) for j in (0, 2, 4, 6))
_PKT8_0, _PKT8_1, _PKT8_2, _PKT8_3 = (tl.constexpr(_pkt_asm(8, j)) for j in range(4))


@triton.jit
def _pkt_ref(w, zh, sh, shift: tl.constexpr, mask: tl.constexpr):
    """fp16 ((((w >> shift) & mask) | 0x6400) - zh) * sh: one half of a packed A pair (interpreter twin)."""
    return ((((w >> shift) & mask) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - zh) * sh


@triton.jit
def _pkt_a(w, z1, z16, sh, j: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
    """A operand(s) of slot j from the [BN, BKW] word tile: 4-bit -> (slot j, 16 x slot j + 1), 8-bit -> slot j.
    z1 / z16 / sh: fp16 [BN, 1] (1024 + z, 1024 + 16 z, scale)."""
    if BITS == 4:
        if ASM:
            if j == 0:
                r = tl.inline_asm_elementwise(_PKT4_0, "=r,=r,r,r,r,r,r", [w, z1, z16, sh],
                                              dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
            elif j == 2:
                r = tl.inline_asm_elementwise(_PKT4_2, "=r,=r,r,r,r,r,r", [w, z1, z16, sh],
                                              dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
            elif j == 4:
                r = tl.inline_asm_elementwise(_PKT4_4, "=r,=r,r,r,r,r,r", [w, z1, z16, sh],
                                              dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
            else:
                r = tl.inline_asm_elementwise(_PKT4_6, "=r,=r,r,r,r,r,r", [w, z1, z16, sh],
                                              dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
        else:
            r = (_pkt_ref(w, z1, sh, 4 * j, 0xF), _pkt_ref(w, z16, sh, 4 * j, 0xF0))
    else:
        if ASM:
            if j == 0:
                r = tl.inline_asm_elementwise(_PKT8_0, "=r,r,r,r,r", [w, z1, sh], dtype=tl.float16, is_pure=True,
                                              pack=2)
            elif j == 1:
                r = tl.inline_asm_elementwise(_PKT8_1, "=r,r,r,r,r", [w, z1, sh], dtype=tl.float16, is_pure=True,
                                              pack=2)
            elif j == 2:
                r = tl.inline_asm_elementwise(_PKT8_2, "=r,r,r,r,r", [w, z1, sh], dtype=tl.float16, is_pure=True,
                                              pack=2)
            else:
                r = tl.inline_asm_elementwise(_PKT8_3, "=r,r,r,r,r", [w, z1, sh], dtype=tl.float16, is_pure=True,
                                              pack=2)
        else:
            r = _pkt_ref(w, z1, sh, 8 * j, 0xFF)
    return r


@triton.jit
def _gemm_t_kernel(xp_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
                   M, N, KW, KWP, G, group_size, stride_pm, stride_om, k_iters, split_k,
                   BITS: tl.constexpr, P: tl.constexpr, SYM: tl.constexpr, HAS_BIAS: tl.constexpr,
                   DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                   GROUP_M: tl.constexpr, PACKED: tl.constexpr = False, ASM: tl.constexpr = False,
                   TPG_SHIFT: tl.constexpr = -1, GPT: tl.constexpr = 1):
    # xp: [M, KWP * P] from `_xperm_kernel`, qweight: [KW, N] int32, scales/zeros: [G, N], out: [M, N].
    # Every K tile (BLOCK_KW words = BLOCK_KW * P codes) lies inside one group (GPT 1) or is exactly two groups
    # (GPT 2: 32-word 4-bit tiles with g128); the launcher checks.
    # The weights are the A operand: slot j of the [BLOCK_N, BLOCK_KW] word tile, dequantized elementwise, is a
    # [BLOCK_N, BLOCK_KW] operand that the compiler builds straight in the registers of the mma fragments (the
    # word tile goes global -> shared asynchronously, then each thread reads its own words); the B operand is
    # the slot-j run of xp, [BLOCK_KW, BLOCK_M]. The tiny M is the mma's N (>= 16), not its 64-row M.
    DT = xp_ptr.dtype.element_ty
    pid_m, pid_n = grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rw = tl.arange(0, BLOCK_KW)
    MASK: tl.constexpr = (1 << BITS) - 1
    ZC: tl.constexpr = 1 << (BITS - 1)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    kw_begin = pid_k * k_iters * BLOCK_KW
    for it in range(k_iters):
        kw0 = kw_begin + it * BLOCK_KW
        kw = kw0 + rw
        w = tl.load(qw_ptr + kw[None, :] * N + offs_n[:, None], mask=n_mask[:, None] & (kw < KW)[None, :], other=0)
        if GPT == 2:  # two groups per tile, BLOCK_KW / 2 words each: scales (zeros) per word column
            # a 2D gather load, not a select between two rows: Triton hoists the dot-operand layout through a
            # load but not through a select on an arange mask (A then went through shared memory: 1.5-1.8x slower)
            gcol = tl.minimum((kw0 // BLOCK_KW) * 2 + (rw >= BLOCK_KW // 2).to(tl.int32), G - 1)  # [BKW]
            gs2 = gcol[None, :] * N + offs_n[:, None]
            s = tl.load(s_ptr + gs2, mask=n_mask[:, None], other=0.0)  # [BN, BKW]
            if not SYM:
                zt = tl.load(z_ptr + gs2, mask=n_mask[:, None], other=0).to(tl.float32)
        else:
            if TPG_SHIFT >= 0:  # K tiles per group a power of two (or one group): a shift, not a division
                g = tl.minimum((kw0 // BLOCK_KW) >> TPG_SHIFT, G - 1)
            else:
                g = tl.minimum((kw0 * P) // group_size, G - 1)
            s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0)[:, None]  # [BN, 1]
            if not SYM:
                zt = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)[:, None]
        if DT == tl.float16:  # codes | 0x6400 read as fp16 are 1024 + code: one subtraction, one multiply
            if SYM:
                zh = tl.full([1, 1], 1024.0 + ZC, tl.float16)  # a tensor: a float argument would be fp32
            else:
                zh = (zt + 1024.0).to(tl.float16)
            sh = s
        else:  # bf16: exact (code - z) in fp32, scaled in fp32, rounded once to bf16
            if SYM:
                zf = 8388608.0 + ZC
            else:
                zf = zt + 8388608.0
            sf = s.to(tl.float32)
        if PACKED:  # fp16x2 A pairs (see `_pkt_a`); 4-bit: two slots per call, the odd one x 16 (x / 16 in xp)
            if SYM:
                z16 = tl.full([1, 1], 1024.0 + 16 * ZC, tl.float16)
            else:
                z16 = ((zh.to(tl.float32) - 1024.0) * 16.0 + 1024.0).to(tl.float16)
            STEP: tl.constexpr = 2 if BITS == 4 else 1
            for jj in tl.static_range(P // STEP):
                j0 = jj * STEP
                r = _pkt_a(w, zh, z16, sh, j0, BITS, ASM)
                if BITS == 4:
                    a_pair = r
                else:
                    a_pair = (r, r)
                for h in tl.static_range(STEP):
                    xb = tl.load(xp_ptr + offs_m[None, :] * stride_pm + (kw0 * P + (j0 + h) * BLOCK_KW + rw)[:, None],
                                 mask=m_mask[None, :] & (kw < KWP)[:, None], other=0.0)
                    acc = tl.dot(a_pair[h], xb, acc)
        else:
            for j in tl.static_range(P):
                q = (w >> (j * BITS)) & MASK
                if DT == tl.float16:
                    a = (_code_minus_zero_f16(q, zh) * sh).to(DT)
                else:
                    a = (_code_minus_zero_f32(q, zf) * sf).to(DT)
                xb = tl.load(xp_ptr + offs_m[None, :] * stride_pm + (kw0 * P + j * BLOCK_KW + rw)[:, None],
                             mask=m_mask[None, :] & (kw < KWP)[:, None], other=0.0)
                if DOT_F32:
                    acc = tl.dot(a.to(tl.float32), xb.to(tl.float32), acc)
                else:
                    acc = tl.dot(a, xb, acc)
    _epilogue(tl.trans(acc), offs_m, offs_n, M, N, out_ptr, stride_om, b_ptr, ws_ptr, cnt_ptr,
              pid_m * tl.cdiv(N, BLOCK_N) + pid_n, split_k, HAS_BIAS)


@triton.jit
def _dequant_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, K, KW, G, group_size,
                    BITS: tl.constexpr, P: tl.constexpr, P2: tl.constexpr, SYM: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    # -> out: W^T [K, N] in the output dtype
    kw = tl.program_id(0) * BLOCK_KW + tl.arange(0, BLOCK_KW)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    j = tl.arange(0, P2)
    w = tl.load(qw_ptr + kw[:, None] * N + offs_n[None, :], mask=(kw[:, None] < KW) & n_mask[None, :], other=0)
    q = _codes(w, BITS, P, P2)
    k = kw[:, None] * P + j[None, :]  # [BKW, P2]
    g = tl.minimum(k // group_size, G - 1)
    gs = g[:, :, None] * N + offs_n[None, None, :]
    s = tl.load(s_ptr + gs, mask=n_mask[None, None, :], other=0.0).to(tl.float32)
    if SYM:
        v = _code_minus_zero_f32(q, 8388608.0 + (1 << (BITS - 1)))
    else:
        v = _code_minus_zero_f32(q, tl.load(z_ptr + gs, mask=n_mask[None, None, :], other=0).to(tl.float32)
                                 + 8388608.0)
    mask = ((j[None, :] < P) & (k < K))[:, :, None] & n_mask[None, None, :]
    tl.store(out_ptr + k[:, :, None] * N + offs_n[None, None, :], (v * s).to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------------
# launchers


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pdl_kwargs() -> dict:
    """Launch arguments of the M == 1 GEMVs: the PDL constexpr and launch attribute where `PDL` is on (never under
    the interpreter, which runs no inline assembly and has no launch attributes)."""
    return dict(PDL=True, launch_pdl=True) if PDL and not _interpreting() else {}


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _hi_shift(bits: int) -> int:
    """Bit position of the first code slot that does not end at or below bit 23 (read from word >> this)."""
    j = 0
    while j * bits + bits <= 23:
        j += 1
    return j * bits


def _hi_shift_wide(bits: int) -> int:
    """`_gemv_wide_kernel`'s shift for the high slots: the first of them lands at bit >= 1, not 0 (a mask at bit 0
    of a shifted word is compiled to a bit-field extract, two instructions instead of one LOP3), and the last
    still ends at or below bit 23 (the float32 mantissa)."""
    return max(9, _hi_shift(bits) - bits)


def _scale_mode(G: int, group_size: int, P: int, block_kw: int) -> int:
    """0: a K-tile never crosses a group; 1: a word never crosses a group; 2: anything else."""
    if G == 1 or group_size % (block_kw * P) == 0:
        return 0
    if group_size % P == 0:
        return 1
    return 2


_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_RETIRED: list[tuple[torch.Tensor, torch.Tensor]] = []  # outgrown workspaces, kept alive for captured graphs


def _workspace(device: torch.device, n_acc: int, n_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed fp32 accumulators and int32 tile counters for one (device, stream); kernels leave them zeroed.

    One per stream, so that calls on concurrent streams never share one. Allocated (zero-filled) on first use; a
    first use inside CUDA graph capture allocates from the graph's pool and the zero-fill replays with the graph.
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    ws, cnt = _WORKSPACES.get(key, (None, None))
    if ws is None or ws.numel() < n_acc or cnt.numel() < n_tiles:
        if ws is not None:
            _RETIRED.append((ws, cnt))
        n_acc = max(n_acc, 0 if ws is None else ws.numel(), 1 << 16)
        n_tiles = max(n_tiles, 0 if cnt is None else cnt.numel(), 1 << 12)
        ws = torch.zeros(n_acc, dtype=torch.float32, device=device)
        cnt = torch.zeros(n_tiles, dtype=torch.int32, device=device)
        _WORKSPACES[key] = (ws, cnt)
    return ws, cnt


def _split(k_tiles: int, split_k: int) -> tuple[int, int]:
    """-> (k_iters per split, number of non-empty splits)."""
    split_k = max(1, min(split_k, k_tiles))
    k_iters = -(-k_tiles // split_k)
    return k_iters, -(-k_tiles // k_iters)


def launch_gemv(x2, qweight, scales, zeros, bias, out, bits, group_size, K, cfg):
    """x2 [1, K] -> out [1, N]. cfg: block_n, block_kw, split_k, num_warps."""
    KW, N = qweight.shape
    G = scales.shape[0]
    P = 32 // bits
    bkw = cfg["block_kw"]
    k_iters, split = _split(-(-KW // bkw), cfg["split_k"])
    n_blocks = -(-N // cfg["block_n"])
    ws, cnt = _workspace(x2.device, N if split > 1 else 0, n_blocks if split > 1 else 0)
    return _gemv_kernel[(n_blocks, split)](
        x2, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, out, ws, cnt,
        N, K, KW, G, group_size, k_iters, split, MAGIC_F32,
        BITS=bits, P=P, HI=_hi_shift(bits), SYM=zeros is None, HAS_BIAS=bias is not None,
        SCALE_MODE=_scale_mode(G, group_size, P, bkw),
        EVEN=K == KW * P and KW % bkw == 0 and (KW // bkw) % split == 0 and N % cfg["block_n"] == 0,
        BLOCK_N=cfg["block_n"], BLOCK_KW=bkw,
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2))


def wide_ok(bits: int, group_size: int, K: int, block_kw: int) -> bool:
    """Whether `_gemv_wide_kernel` takes this format with this K tile: every tile inside one group."""
    return _scale_mode(-(-K // group_size), group_size, 32 // bits, block_kw) == 0


def packed_ok(bits: int, dtype: torch.dtype, block_kw: int, unroll: int) -> bool:
    """Whether the packed fp16x2 path of the wide GEMV takes this: fp16 x, 4/8-bit codes, word-row pairs, unrolled."""
    return dtype == torch.float16 and bits in (4, 8) and block_kw % 2 == 0 and unroll > 0


def launch_gemv_wide(x2, qweight, scales, zeros, bias, out, bits, group_size, K, cfg):
    """x2 [1, K] -> out [1, N] through `_gemv_wide_kernel`. cfg: block_n, block_kw, split_k, num_warps, unroll;
    block_n should be 128 or 256 x num_warps (4 or 8 columns per thread; the kernel is correct for any power of
    two). unroll > 0 fixes the tiles per split (split_k is then ignored: ceil(tiles / unroll) splits)."""
    KW, N = qweight.shape
    G = scales.shape[0]
    P = 32 // bits
    bkw, bn = cfg["block_kw"], cfg["block_n"]
    if not wide_ok(bits, group_size, K, bkw):
        raise ValueError(f"the wide GEMV cannot take bits={bits}, group_size={group_size}, K={K} with "
                         f"block_kw={bkw} (a K tile must lie inside one group)")
    packed = bool(cfg.get("packed", False))
    if packed and not packed_ok(bits, x2.dtype, bkw, cfg.get("unroll", 0)):
        raise ValueError(f"the packed wide GEMV takes fp16 activations, 4- or 8-bit codes, an even block_kw and "
                         f"unroll > 0; got {x2.dtype}, bits={bits}, block_kw={bkw}, unroll={cfg.get('unroll', 0)}")
    k_tiles = -(-KW // bkw)
    unroll = cfg.get("unroll", 0)
    if unroll:  # splits of exactly `unroll` tiles (the last one's missing tiles are masked)
        k_iters, split = unroll, -(-k_tiles // unroll)
    else:
        k_iters, split = _split(k_tiles, cfg["split_k"])
    n_blocks = -(-N // bn)
    ws, cnt = _workspace(x2.device, N if split > 1 else 0, n_blocks if split > 1 else 0)
    return _gemv_wide_kernel[(n_blocks, split)](
        x2, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, out, ws, cnt,
        N, K, KW, G, group_size, k_iters, split, MAGIC_F32,
        BITS=bits, P=P, HI=_hi_shift_wide(bits), SYM=zeros is None, HAS_BIAS=bias is not None,
        EVEN=K == KW * P and KW % bkw == 0 and k_iters * split == k_tiles and N % bn == 0,
        BLOCK_N=bn, BLOCK_KW=bkw, UNROLL=unroll, PACKED=packed, ASM=packed and not _interpreting(),
        num_warps=cfg.get("num_warps", 4), num_stages=1, **_pdl_kwargs())


def deep_ok(bits: int, dtype: torch.dtype, group_size: int, K: int) -> bool:
    """Whether `_gemv_deep_kernel` takes this format: fp16 activations, 4- or 8-bit codes, and each pair of word
    rows (2 x 32 / bits codes) inside one group (one group per row, or group sizes a multiple of the pair)."""
    P = 32 // bits if bits else 0
    return (dtype == torch.float16 and bits in (4, 8)
            and (group_size >= K or group_size % (2 * P) == 0))


def launch_gemv_deep(x2, qweight, scales, zeros, bias, out, bits, group_size, K, cfg, norm=None, glu=False):
    """x2 [1, K] -> out [1, N] through `_gemv_deep_kernel`. cfg: block_n, rows (word rows per chunk, a power of two
    >= 2), unroll (chunks per program), num_warps; ceil(word rows / (rows x unroll)) splits along K (split-K
    epilogue only where that is more than one). norm = (weight [K] fp16, eps): multiply RMSNorm(x) instead of x;
    glu: out [1, N / 2] = SiLU(gate) * up of the interleaved (gate, up) columns (one split, no bias)."""
    KW, N = qweight.shape
    G = scales.shape[0]
    P = 32 // bits
    if not deep_ok(bits, x2.dtype, group_size, K):
        raise ValueError(f"the deep GEMV takes fp16 activations, 4- or 8-bit codes and groups of whole word-row "
                         f"pairs; got {x2.dtype}, bits={bits}, group_size={group_size}, K={K}")
    bn, rows, unroll = cfg["block_n"], cfg["rows"], cfg["unroll"]
    if rows < 2 or rows & (rows - 1) or unroll < 1:
        raise ValueError(f"deep GEMV: rows must be a power of two >= 2 and unroll >= 1, got {rows}, {unroll}")
    span = rows * unroll
    split = -(-KW // span)
    n_blocks = -(-N // bn)
    if (norm is not None or glu) and split > 1:
        raise ValueError(f"the deep GEMV fuses RMSNorm / SiLU-multiply only in one split along K; rows x unroll = "
                         f"{span} < {KW} word rows")
    if glu and (bias is not None or N % 2 or bn < 2):
        raise ValueError("the deep GEMV's SiLU-multiply epilogue takes an even N, no bias and block_n >= 2")
    if norm is not None and (norm[0].dtype != x2.dtype or norm[0].numel() != K):
        raise ValueError(f"RMSNorm weight must be [{K}] {x2.dtype}, got {tuple(norm[0].shape)} {norm[0].dtype}")
    asm = not _interpreting()
    nw = x2 if norm is None else norm[0].reshape(K)
    if norm is not None and nw.stride(0) != 1:
        raise ValueError("the RMSNorm weight must be contiguous")
    ws, cnt = _workspace(x2.device, N if split > 1 else 0, n_blocks if split > 1 else 0)
    return _gemv_deep_kernel[(n_blocks, split)](
        x2, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, out, ws, cnt,
        nw, N, K, KW, G, group_size, split, float(norm[1]) if norm else 0.0,
        BITS=bits, P=P, SYM=zeros is None, HAS_BIAS=bias is not None,
        EVEN=K == KW * P and KW == split * span and N % bn == 0,
        BLOCK_N=bn, ROWS=rows, UNROLL=unroll, ASM=asm, NORM=norm is not None, GLU=glu,
        RMS_BLOCK=min(_next_pow2(K), 8192) if norm is not None else 16,
        num_warps=cfg.get("num_warps", 8), num_stages=1, **_pdl_kwargs())


def launch_gemm(x2, qweight, scales, zeros, bias, out, bits, group_size, K, cfg):
    """x2 [M, K] -> out [M, N]. cfg: block_m, block_n, block_kw, split_k, scale_after, sliced, num_warps, num_stages."""
    M = x2.shape[0]
    KW, N = qweight.shape
    G = scales.shape[0]
    P = 32 // bits
    bm, bn, bkw = cfg["block_m"], cfg["block_n"], cfg["block_kw"]
    k_iters, split = _split(-(-KW // bkw), cfg["split_k"])
    num_m, num_n = -(-M // bm), -(-N // bn)
    ws, cnt = _workspace(x2.device, M * N if split > 1 else 0, num_m * num_n if split > 1 else 0)
    mode = _scale_mode(G, group_size, P, bkw)
    sliced = bool(cfg.get("sliced", False)) and mode == 0 and P == _next_pow2(P) and bkw >= 16
    return _gemm_kernel[(num_m * num_n, split)](
        x2, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, out, ws, cnt,
        M, N, K, KW, G, group_size, x2.stride(0), out.stride(0), k_iters, split, MAGIC_F32,
        BITS=bits, P=P, P2=_next_pow2(P), HI=_hi_shift(bits), SYM=zeros is None, HAS_BIAS=bias is not None,
        SCALE_MODE=mode, SCALE_AFTER=bool(cfg.get("scale_after", False)) and mode == 0, SLICED=sliced,
        DOT_F32=_interpreting() and x2.dtype == torch.bfloat16,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_KW=bkw, GROUP_M=cfg.get("group_m", 8),
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3))


def swapped_ok(bits: int, group_size: int, K: int, block_kw: int) -> bool:
    """Whether `_gemm_t_kernel` takes this format with this K tile: a dot needs K >= 16 (block_kw >= 16) and
    every K tile must lie inside one group (G == 1, or block_kw * P dividing the group size) or be exactly two
    groups (`_groups_per_tile`)."""
    P = 32 // bits
    G = -(-K // group_size)
    return block_kw >= 16 and (G == 1 or group_size % (block_kw * P) == 0 or _groups_per_tile(G, group_size,
                                                                                            block_kw * P) == 2)


def _groups_per_tile(G: int, group_size: int, tile_k: int) -> int:
    """2 where a K tile of tile_k codes is exactly two groups (scales per word column in the swapped kernel)."""
    return 2 if G > 1 and 2 * group_size == tile_k else 1


def packed_t_ok(bits: int, dtype: torch.dtype) -> bool:
    """Whether the swapped kernel's packed fp16x2 A operand applies: fp16 activations, 4- or 8-bit codes."""
    return dtype == torch.float16 and bits in (4, 8)


def permute_x(x2, bits: int, K: int, KW: int, cfg: dict) -> torch.Tensor:
    """`_xperm_kernel`: x2 [M, K] -> xp [M, k_tiles * block_kw * P], the swapped kernel's B operand layout."""
    M, P, bkw = x2.shape[0], 32 // bits, cfg["block_kw"]
    k_tiles = -(-KW // bkw)
    xp = torch.empty((M, k_tiles * bkw * P), dtype=x2.dtype, device=x2.device)
    br = min(_next_pow2(M), 4)
    _xperm_kernel[(k_tiles, -(-M // br))](x2, xp, M, K, x2.stride(0), xp.stride(0),
                                           P=P, P2=_next_pow2(P), BLOCK_KW=bkw, BLOCK_R=br,
                                           ODD16=bool(cfg.get("packed", False)) and bits == 4, num_warps=4)
    return xp


def launch_gemm_t(x2, qweight, scales, zeros, bias, out, bits, group_size, K, cfg, xp=None):
    """x2 [M, K] -> out [M, N] through `_xperm_kernel` + `_gemm_t_kernel` (xp: an already permuted x2, from
    `permute_x` with the same cfg, to time the main kernel alone).
    cfg: block_m, block_n, block_kw, split_k, group_m, num_warps, num_stages, packed."""
    M = x2.shape[0]
    KW, N = qweight.shape
    G = scales.shape[0]
    P = 32 // bits
    bm, bn, bkw = cfg["block_m"], cfg["block_n"], cfg["block_kw"]
    if not swapped_ok(bits, group_size, K, bkw):
        raise ValueError(f"the swapped kernel cannot take bits={bits}, group_size={group_size}, K={K} with "
                         f"block_kw={bkw}")
    packed = bool(cfg.get("packed", False))
    if packed and not packed_t_ok(bits, x2.dtype):
        raise ValueError(f"the packed swapped kernel takes fp16 activations and 4- or 8-bit codes; got {x2.dtype}, "
                         f"bits={bits}")
    k_tiles = -(-KW // bkw)
    k_iters, split = _split(k_tiles, cfg["split_k"])
    KWP = k_tiles * bkw
    if xp is None:
        xp = permute_x(x2, bits, K, KW, cfg)
    num_m, num_n = -(-M // bm), -(-N // bn)
    ws, cnt = _workspace(x2.device, M * N if split > 1 else 0, num_m * num_n if split > 1 else 0)
    return _gemm_t_kernel[(num_m * num_n, split)](
        xp, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, out, ws,
        cnt, M, N, KW, KWP, G, group_size, xp.stride(0), out.stride(0), k_iters, split,
        BITS=bits, P=P, SYM=zeros is None, HAS_BIAS=bias is not None,
        DOT_F32=_interpreting() and x2.dtype == torch.bfloat16,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_KW=bkw, GROUP_M=cfg.get("group_m", 8),
        PACKED=packed, ASM=packed and not _interpreting(), TPG_SHIFT=_tpg_shift(G, group_size, bkw * P),
        GPT=_groups_per_tile(G, group_size, bkw * P),
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3), maxnreg=cfg.get("maxnreg"))


def _tpg_shift(G: int, group_size: int, tile_k: int) -> int:
    """log2(K tiles per group) where that is a power of two (30 for a single group: every tile maps to group 0),
    else -1 (the kernel divides)."""
    if G == 1:
        return 30
    tpg = group_size // tile_k
    return tpg.bit_length() - 1 if tpg >= 1 and group_size % tile_k == 0 and tpg & (tpg - 1) == 0 else -1


def dequantize_t(qweight, scales, zeros, bits, group_size, K, dtype, block_n=64, block_kw=8):
    """W^T [K, N] in `dtype`, by the Triton kernel."""
    KW, N = qweight.shape
    P = 32 // bits
    out = torch.empty((K, N), dtype=dtype, device=qweight.device)
    _dequant_kernel[(-(-KW // block_kw), -(-N // block_n))](
        qweight, scales, zeros if zeros is not None else scales, out, N, K, KW, scales.shape[0], group_size,
        BITS=bits, P=P, P2=_next_pow2(P), SYM=zeros is None, BLOCK_N=block_n, BLOCK_KW=block_kw)
    return out


# --------------------------------------------------------------------------------------------------------------
# configs and tuning


_SMS: dict[str, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    key = str(device)
    if key not in _SMS:
        _SMS[key] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[key]


def _split_for(tiles: int, k_tiles: int, sms: int, waves: float) -> int:
    return max(1, min(k_tiles, round(waves * sms / max(tiles, 1))))


def _fit_groups(bkw: int, P: int, group_size: int, K: int) -> int:
    """Largest power-of-two word rows <= bkw whose K tile stays inside one group (when groups allow that)."""
    if group_size < K and group_size % P == 0:
        while bkw > 1 and group_size % (bkw * P) != 0:
            bkw //= 2
    return bkw


def gemv_configs(N: int, K: int, bits: int, group_size: int, sms: int) -> list[dict]:
    """Candidates for M == 1, the heuristic default first. At most 16 words per thread in flight per tile."""
    P = 32 // bits
    KW = -(-K // P)
    out = []
    for bn, bkw, warps, waves in ((128, 16, 4, 4.0), (256, 8, 4, 4.0), (64, 32, 4, 4.0), (256, 16, 8, 4.0),
                                  (512, 8, 8, 4.0), (128, 16, 4, 8.0), (256, 8, 4, 8.0)):
        bkw = _fit_groups(bkw, P, group_size, K)
        cfg = dict(block_n=bn, block_kw=bkw, num_warps=warps,
                   split_k=_split_for(-(-N // bn), -(-KW // bkw), sms, waves))
        if cfg not in out:
            out.append(cfg)
    return out


def gemv_wide_configs(N: int, K: int, bits: int, group_size: int, sms: int,
                      dtype: torch.dtype = torch.float16) -> list[dict]:
    """Candidates for `_gemv_wide_kernel` (M == 1), [] where no K tile fits inside a group; the heuristic default
    first. 4 or 8 columns per thread (block_n = 128 or 256 x warps), 4 word rows per tile; unrolled splits of
    `unroll` tiles (2..16) sized for about `waves` programs per SM, and one run-time-loop candidate."""
    P = 32 // bits
    KW = -(-K // P)
    bkw = _fit_groups(4, P, group_size, K)
    if not wide_ok(bits, group_size, K, bkw):
        return []
    k_tiles = -(-KW // bkw)
    out = []
    # (waves 8: the H100 tuning chose the smallest unroll offered at every decode shape, docs/results/kernels-gwint.md)
    for cols, warps, waves in ((8, 4, 2.0), (8, 2, 4.0), (8, 4, 4.0), (8, 2, 2.0), (8, 1, 4.0), (4, 4, 4.0),
                               (8, 4, 8.0), (8, 2, 8.0)):
        bn = 32 * cols * warps
        blocks = -(-N // bn)
        unroll = k_tiles * blocks / (waves * sms)  # tiles per program for that many programs
        unroll = max(2, min(16, _next_pow2(max(1, round(unroll)))))
        cfg = dict(kernel="wide", block_n=bn, block_kw=bkw, num_warps=warps, unroll=unroll, split_k=1)
        if cfg not in out:
            out.append(cfg)
    bn = 1024
    out.append(dict(kernel="wide", block_n=bn, block_kw=bkw, num_warps=4, unroll=0,
                    split_k=_split_for(-(-N // bn), k_tiles, sms, 2.0)))
    if packed_ok(bits, dtype, bkw, 1):
        # the fp16x2 path on each unrolled shape, first (2.4 vs 4.0 instructions per 4-bit weight, 3.0 vs 4.7 per
        # 8-bit one); of the fp32 path only its default and the run-time loop stay (compile time of the tuning)
        out = [c | dict(packed=True) for c in out if c["unroll"] > 0] + out[:1] + out[-1:]
    return out


def gemv_deep_configs(N: int, K: int, bits: int, group_size: int, sms: int,
                      dtype: torch.dtype = torch.float16) -> list[dict]:
    """Candidates for `_gemv_deep_kernel` (M == 1), [] where it does not apply (`deep_ok`). Each is (columns per
    program, warps, word rows per chunk, most word rows per program): the chunk is cut to the largest power of two
    dividing the word rows (so that chunks tile K exactly: unmasked loads), and K into as few splits as the cap
    allows that divide the chunks evenly (one at K = 4096 with 4-bit codes: no split-K epilogue).
    Offline SASS (Triton 3.6, sm_90): ptxas issues every word load of a program at its top only for some shapes
    (one 512-row chunk: 8 warps x 32 columns or 4 warps x 16 at 127 registers, 8 warps x 16 at 64); the chunked
    ones interleave loads with arithmetic at 42-100 registers and rely on more programs per SM. The H100 decides."""
    if not deep_ok(bits, dtype, group_size, K):
        return []
    KW = -(-K // (32 // bits))
    pow2_div = KW & -KW  # the largest power of two dividing KW
    out = []
    for bn, warps, rows, cap in ((32, 8, 512, 512), (16, 8, 512, 512), (16, 4, 512, 512), (32, 8, 128, 1024),
                                 (32, 16, 256, 1024),
                                 (64, 8, 128, 1024), (32, 8, 128, 2048), (32, 8, 256, 256)):
        rows = max(2, min(rows, _next_pow2(KW), pow2_div if pow2_div >= 64 else rows))
        chunks = -(-KW // rows)
        splits = -(-KW // max(rows, cap))
        while chunks % splits and splits < chunks:
            splits += 1
        cfg = dict(kernel="deep", block_n=bn, rows=rows, unroll=-(-chunks // splits), num_warps=warps)
        if cfg not in out:
            out.append(cfg)
    return out


def gemm_configs(M: int, N: int, K: int, bits: int, group_size: int, sms: int) -> list[dict]:
    """Candidates for M >= 2, the heuristic default first: (tile, warps, stages) x (sliced or reshaped B)."""
    P = 32 // bits
    P2 = _next_pow2(P)
    KW = -(-K // P)
    if M <= 16:
        shapes = [(16, 64, 128, 4, 3, 3.0), (16, 128, 128, 4, 4, 3.0), (16, 64, 256, 4, 3, 3.0)]
    elif M <= 32:
        shapes = [(32, 64, 128, 4, 3, 3.0), (32, 128, 128, 4, 3, 3.0)]
    elif M <= 64:
        shapes = [(64, 64, 128, 4, 4, 2.0), (64, 128, 64, 4, 4, 2.0), (64, 128, 128, 8, 3, 2.0)]
    else:
        shapes = [(128, 256, 64, 8, 3, 1.0), (128, 128, 64, 8, 3, 1.0), (128, 64, 64, 4, 4, 1.0),
                  (128, 256, 64, 8, 3, 2.0)]
    out = []
    for sliced in (False, True):
        if sliced and P != P2:
            continue
        for bm, bn, bk, warps, stages, waves in shapes:
            bkw = max(1, bk // P2)
            if sliced:
                bkw = max(bkw, 16)
            bkw = _fit_groups(bkw, P, group_size, K)
            if bkw * P2 < 16 or (sliced and (bkw < 16 or bm * bn > 128 * 128)):  # larger sliced tiles spill
                continue
            tiles = -(-M // bm) * -(-N // bn)
            cfg = dict(block_m=bm, block_n=bn, block_kw=bkw, num_warps=warps, num_stages=stages, group_m=8,
                       scale_after=bm <= 32, sliced=sliced, split_k=_split_for(tiles, -(-KW // bkw), sms, waves))
            if cfg not in out:
                out.append(cfg)
    return out


SMEM_BYTES = 232448  # the H100's shared memory per block (227 KiB)


def _swapped_stages(bm: int, bn: int, bkw: int, P: int, stages: int) -> int:
    """`stages`, lowered until the swapped kernel's buffers fit in shared memory: each stage holds a word tile
    (bn x bkw int32) and an activation tile (bm x bkw * P fp16); 4 KiB kept for the rest. (The H100 refused a
    128 x 128 x 32-word 4-bit tile at 3 stages: 241 KiB.)"""
    per_stage = bn * bkw * 4 + bm * bkw * P * 2
    return min(stages, (SMEM_BYTES - 4096) // per_stage)


def gemm_t_configs(M: int, N: int, K: int, bits: int, group_size: int, sms: int,
                   dtype: torch.dtype = torch.float16, two_groups: bool = False) -> list[dict]:
    """Candidates for the swapped kernel (`launch_gemm_t`), the heuristic default first; [] when the format does
    not fit it (see `swapped_ok`). block_m is the mma's N (M rounded up to 16..128); num_warps 2 gives mma.sync
    (Ampere-style) tiles, 4 and 8 give wgmma on Hopper (a warpgroup per 64 weight rows). Where the packed fp16x2
    A operand applies (`packed_t_ok`), every tile shape is offered with it first and the fp16 one only as the
    old default (offline SASS: 3.2 vs 4.7 loop instructions per 4-bit weight at M = 16). `two_groups`: also tiles
    of exactly two groups (32-word 4-bit g128 tiles), off by default: fewer instructions and half the wgmma
    waits per weight, but 1.03-1.55x slower than the 16-word tiles on the H100 (165-167 registers, the scales
    gathered per word column; docs/results/kernels-gwint.md)."""
    P = 32 // bits
    KW = -(-K // P)
    bm = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
    # (block_n, warps, stages, waves). Pruned by the H100 measurements in docs/results/kernels-gwint.md: at M = 16
    # mma.sync tiles (2 warps) and 256-row tiles were 1.2-1.6x slower than these; at M = 128 the 4-warp 128-row
    # and the 256-row tiles spill and were 1.05-1.2x slower.
    if bm <= 32:  # more splits only change a run-time argument (no extra compile)
        shapes = [(128, 4, 3, 4.0), (64, 4, 4, 4.0), (64, 4, 4, 8.0), (128, 4, 3, 8.0), (64, 4, 4, 2.0)]
    elif bm == 64:
        shapes = [(128, 4, 3, 1.0), (64, 4, 3, 2.0), (128, 8, 3, 2.0)]
    else:
        # (64 rows, 1 wave: 1.4-1.7x slower than the first on the H100 with the packed A operand)
        shapes = [(128, 8, 3, 1.0), (128, 8, 4, 2.0), (64, 4, 3, 2.0)]
        # two programs per SM: registers capped at 128 (154-158 otherwise) and 2 stages (74-82 KiB of shared
        # memory); offline the main loop is unchanged (48 B of stack, outside it)
        shapes += [(128, 8, 2, 2.0, 128), (128, 8, 2, 4.0, 128)]
    out = []
    for bkw in (16, 32):
        # 32-word tiles of codes under 8 bits only with the packed A operand (registers of the fp16 one)
        if not swapped_ok(bits, group_size, K, bkw) or (bkw == 32 and P > 4 and not packed_t_ok(bits, dtype)):
            continue
        if not two_groups and _groups_per_tile(-(-K // group_size), group_size, bkw * P) == 2:
            continue
        for bn, warps, stages, waves, *maxnreg in shapes:
            stages = _swapped_stages(bm, bn, bkw, P, stages)
            if stages < 2:
                continue
            tiles = -(-M // bm) * -(-N // bn)
            cfg = dict(kernel="swapped", block_m=bm, block_n=bn, block_kw=bkw, num_warps=warps, num_stages=stages,
                       group_m=8, split_k=_split_for(tiles, -(-KW // bkw), sms, waves))
            if maxnreg:
                cfg["maxnreg"] = maxnreg[0]
            if cfg not in out:
                out.append(cfg)
    if out and packed_t_ok(bits, dtype):
        out = [c | dict(packed=True) for c in out] + out[:1]
    return out


_TUNED: dict[tuple, dict] = {}
TUNE_LOG: list[dict] = []  # every timing the tuner took (read by the benchmark)


_FLUSH: dict[str, torch.Tensor] = {}


def time_cold_us(fn, reps: int = 8, replays: int = 5) -> float:
    """Microseconds per call of `fn` with a cold L2: CUDA graphs of (L2-sized memset, fn) x reps, minus the memsets.

    Graph replay keeps Python and launch overhead out of the number, so small kernels rank by their GPU time.
    """
    dev = torch.cuda.current_device()
    key = str(dev)
    if key not in _FLUSH:
        size = 2 * torch.cuda.get_device_properties(dev).L2_cache_size
        _FLUSH[key] = torch.empty(size, dtype=torch.uint8, device="cuda")
    flush = _FLUSH[key]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # allocates this stream's workspace outside capture
    graphs = []
    for with_fn in (True, False):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            for _ in range(reps):
                flush.zero_()
                if with_fn:
                    fn()
        graphs.append(g)
    torch.cuda.current_stream().wait_stream(stream)
    med = [median_replay_ms(g, replays) for g in graphs]
    return max(med[0] - med[1], 0.0) * 1e3 / reps


def _tune(key: tuple, candidates: list[dict], launch, tensors: dict | None = None) -> dict:
    """First call of a key on CUDA: time every candidate, keep the fastest; the first candidate under CUDA-graph
    capture, TRITON_INTERPRET=1, BITSMITH_TUNE=0 or with a single candidate.

    With `tensors` (the weight tensors by name; `launch(cfg, tensors)` launches on such a set) each candidate is
    timed like the benchmark table (`bench.graph_time_us`): one CUDA graph of calls on rotated copies of the
    weights that together exceed the L2 three times (bsr's `_rotated_copies`, issue 5: its cold-L2 timing had
    ranked configurations differently from the table), so every call streams its weights from HBM right after
    other calls did, as in a model's forward; the copies live during tuning only. Without `tensors`, or where the
    copies do not fit, `time_cold_us` (graphs of (L2-sized memset, call)) as before."""
    cfg = _TUNED.get(key)
    if cfg is not None:
        return cfg
    device_ok = torch.cuda.is_available() and not _interpreting()
    if (not device_ok or os.environ.get("BITSMITH_TUNE", "1") == "0" or len(candidates) == 1
            or torch.cuda.is_current_stream_capturing()):
        cfg = candidates[0]
    else:
        sets = None
        if tensors is not None:
            from .bsr import _rotated_copies

            sets = _rotated_copies(tensors)
        best = None
        for c in candidates:
            try:
                h = launch(c)  # compile and allocate outside the timed region
            except triton.runtime.errors.OutOfResources as e:  # e.g. shared memory on a smaller GPU: skip it
                TUNE_LOG.append({"key": key, "config": c, "error": str(e)})
                continue
            if sets:
                from .bench import graph_time_us

                t = graph_time_us([lambda c=c, ts=ts: launch(c, ts) for ts in sets], min_calls=32, replays=7)
            else:
                t = time_cold_us(lambda c=c: launch(c))
            TUNE_LOG.append({"key": key, "config": c, "us": t, "regs": getattr(h, "n_regs", None),
                             "spills": getattr(h, "n_spills", None), "timing": "rotated" if sets else "cold"})
            if best is None or t < best[0]:
                best = (t, c)
        del sets
        if best is None:
            raise RuntimeError(f"no tuning candidate could run for {key}: {TUNE_LOG[-1]}")
        cfg = best[1]
    _TUNED[key] = cfg
    return cfg


def linear(x, qweight, scales, zeros, bits, group_size, in_features, bias=None, config: dict | None = None,
           regime: str | None = None):
    """Triton path of `gwint.linear`: x [..., K] fp16/bf16 -> [..., N] in x's dtype.

    `config`/`regime` ("gemv", "gemm", "dequant") pin a kernel configuration (tests, benchmarks); a config with
    kernel="swapped" runs `launch_gemm_t` in either of the first two regimes, kernel="wide" runs
    `launch_gemv_wide` (one row only). By default the regime follows M
    and the configuration is tuned once per (shape, format) on the GPU, over the regime's own kernel and the
    swapped one (where the format fits it).
    """
    K = in_features
    N = qweight.shape[1]
    rows = flat_rows(x, K, N)
    x2, out, M = rows.x2, rows.out, rows.M
    if M == 0:
        return rows.result()
    if regime is None:
        regime = "gemv" if M == 1 else ("gemm" if M < DEQUANT_MIN_M else "dequant")
    args = (qweight, scales, zeros, bias)
    if regime == "dequant":
        wt = dequantize_t(qweight, scales, zeros, bits, group_size, K, x.dtype)
        torch.matmul(x2, wt, out=out)
        if bias is not None:
            out += bias
        return rows.result()
    if regime not in ("gemv", "gemm"):
        raise ValueError(f"unknown regime {regime!r}: expected gemv, gemm or dequant")
    if regime == "gemv" and M != 1:
        raise ValueError("the gemv regime takes exactly one row")
    if regime == "gemm" and config is not None and config.get("kernel") in ("wide", "deep"):
        raise ValueError(f"the {config['kernel']} GEMV takes exactly one row")
    sms = _num_sms(x.device)
    fmt_key = (bits, group_size, zeros is None, bias is not None, x.dtype, N, K)
    own = launch_gemv if regime == "gemv" else launch_gemm

    def go(c, t=None):  # t: the weight tensors by name (the tuner's rotated copies), else this call's
        kind = c.get("kernel")
        launch = (launch_gemm_t if kind == "swapped" else launch_gemv_wide if kind == "wide" else
                  launch_gemv_deep if kind == "deep" else own)
        a = args if t is None else (t["qweight"], t["scales"], t.get("zeros"), t.get("bias"))
        return launch(x2, *a, out, bits, group_size, K, c)

    if config is not None:
        cfg = config
    else:
        swapped = gemm_t_configs(M, N, K, bits, group_size, sms, x.dtype)
        if not swapped:  # e.g. 4-bit g64 (finequant-w4's usual size): only tiles of exactly two groups fit it
            swapped = gemm_t_configs(M, N, K, bits, group_size, sms, x.dtype, two_groups=True)
        if regime == "gemv":
            # one row: the swapped kernel came within 2-4 % of the GEMV for 8-bit codes (32-word tiles) and was
            # 1.3x slower for 4-bit ones at 8192x8192 (docs/results/kernels-gwint.md), so only the former compete
            cands = (gemv_wide_configs(N, K, bits, group_size, sms, x.dtype)
                     + gemv_deep_configs(N, K, bits, group_size, sms, x.dtype)
                     + gemv_configs(N, K, bits, group_size, sms) + [c for c in swapped if c["block_kw"] >= 32])
            key = ("gemv",) + fmt_key
        else:
            own_cands = gemm_configs(M, N, K, bits, group_size, sms)
            if swapped:  # where both apply, the older kernel's sliced tiles were its best (measured); keep those
                own_cands = [c for c in own_cands if c.get("sliced")][:2] or own_cands[:1]
            cands = swapped + own_cands
            key = ("gemm", _next_pow2(M)) + fmt_key
        weights = {k: v for k, v in zip(("qweight", "scales", "zeros", "bias"), args) if v is not None}
        cfg = _tune(key, cands, go, weights)
    go(cfg)
    return rows.result()


# --------------------------------------------------------------------------------------------------------------
# decoder-layer fusions of the M == 1 GEMV (see `bitsmith.kernels.fused_ops`)


def fused_deep_configs(N: int, K: int, bits: int, group_size: int, sms: int, dtype: torch.dtype,
                       glu: bool = False) -> list[dict]:
    """The deep GEMV's candidates that keep K in one split (what the RMSNorm prologue and the SiLU-multiply
    epilogue need), [] where none does or the format does not fit the deep kernel."""
    KW = -(-K // (32 // bits))
    return [c for c in gemv_deep_configs(N, K, bits, group_size, sms, dtype)
            if c["rows"] * c["unroll"] >= KW and (not glu or c["block_n"] >= 2)]


def fused_gemv(x, qweight, scales, zeros, bits, group_size, in_features, norm_weight=None, eps: float = 0.0,
               residual=None, glu: bool = False, config: dict | None = None):
    """One row: [residual +] (RMSNorm(x) * norm_weight | x) @ W^T [-> SiLU(gate) * up of interleaved columns] in
    one launch of the deep GEMV, or None where it does not apply (M != 1, bf16, 3-bit, a group size the deep
    kernel does not take, K too long for one split, a residual together with glu): the caller then composes the
    unfused ops. x [..., K] -> [..., N] ([..., N / 2] with glu)."""
    K = in_features
    N = qweight.shape[1]
    if x.numel() != K or x.shape[-1] != K or (glu and (residual is not None or N % 2)):
        return None
    if norm_weight is not None and (norm_weight.dtype != x.dtype or norm_weight.numel() != K):
        return None
    sms = _num_sms(x.device)
    cands = [config] if config is not None else fused_deep_configs(N, K, bits, group_size, sms, x.dtype, glu)
    if not cands or not deep_ok(bits, x.dtype, group_size, K):
        return None
    x2 = x.reshape(1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((1, N // 2 if glu else N), dtype=x.dtype, device=x.device)
    res = None if residual is None else residual.reshape(N)
    if res is not None and res.stride(0) != 1:
        res = res.contiguous()
    norm = None if norm_weight is None else (norm_weight.reshape(K), eps)

    def go(c, t=None):
        a = (qweight, scales, zeros) if t is None else (t["qweight"], t["scales"], t.get("zeros"))
        return launch_gemv_deep(x2, *a, res, out, bits, group_size, K, c, norm=norm, glu=glu)

    if config is None:
        key = ("fused", norm is not None, glu, bits, group_size, zeros is None, res is not None, x.dtype, N, K)
        weights = {k: v for k, v in zip(("qweight", "scales", "zeros"), (qweight, scales, zeros)) if v is not None}
        config = _tune(key, cands, go, weights)
    go(config)
    return out.reshape(*x.shape[:-1], out.shape[1])
