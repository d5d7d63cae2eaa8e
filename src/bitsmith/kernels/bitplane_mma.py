"""Bit-plane (bipolar-INT) M = 1 GEMV on the tensor cores: `mma.sync` m16n8k16 with the weights built per thread.

Why: the f16x2 GEMV of `bitplane` spends LOP3 + HSUB2 + HFMA2 (+ fp32 flushes) on every pair of weights, ~2.9 SASS
instructions per weight at 2 bits, so at M = 1 it is bound by instruction issue as much as by HBM. Here the pair
is only built (`bits` LOP3, as in `_gemv_pair_asm`) and one mma multiplies 256 weights by x: the HSUB2 is folded
into one constant mma per 16 K columns and the HFMA2 into the tensor cores.

Work of one warp per K tile (128 columns of K = 4 plane words, inside one scale group): 64 output rows as four
16-row mma tiles. Lane l (g = l // 4, t = l % 4) owns rows rA .. rA + 3 and rA + 32 .. rA + 35 (rA = 4 g, one
16-byte load per plane for each run of 4) and plane word kw0 + t of them; it loads the 32 activations of that word.

    A (16 x 16 fp16, registers): tile p's rows g / g + 8 are the lane's rows r_2p / r_2p+1; mma step m (0..7)
        takes slot pairs jj = 2m (A columns 2t, 2t + 1) and jj = 2m + 1 (columns 2t + 8, 2t + 9) of the lane's
        word: each register is the f16x2 (2^(10-q) + u_j, 2^(10-q) + u_(j+16)) made by `bits` LOP3 (u = the
        bipolar level index, q its window position; exact).
    B (16 x 8): the same K columns of x, (x_j, x_(j+16)) pairs: every B column is x (M = 1), so every D column
        holds the same sums and each lane reads its own rows' results (no shuffles).
    E: one more mma per step with the constant A = 2^(10-q) + L/2 (L = 2^bits - 1) gives sum_k (2^(10-q) + L/2) x_k,
        so D - E = sum_k (u_k - L/2) x_k exactly as the rule needs: w = s (2u - L) = 2 s (u - L/2).
    Per K tile: acc_row += s_row (D_row - E) in fp32; x2 at the end. Split-K partials as in `gwint_triton`.

MODE 2 is inline PTX (loads, LOP3, PRMT, mma); MODE 1 is a plain-Triton twin for TRITON_INTERPRET=1 that does the
same per-lane loads and bit arithmetic and sums the four lanes of an mma row group explicitly (fp32 sums, so it
matches the PTX to rounding, not bit for bit). The lane <-> element map relies on a 1D [32 * num_warps] tensor
holding one element per thread (Triton's default layout; no memory op here lets Triton re-lay those tensors out).

Limits (else the caller uses the other kernels): fp16 activations, kind bipolar, no offset, N % 4 == 0, group_size
a multiple of 128 (or one group). x is zero-padded to whole K tiles when K % 128 != 0.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = tl = None

TILE_K = 128  # K columns per tile: 4 words of 32 slots, one per lane of a quad
_TK = tl.constexpr(TILE_K) if triton is not None else None


if triton is not None:
    from .bitplane import _h2_prefetch, _h2_sub_const, _halves, _shift_to
    from .gwint_triton import _interpreting, _workspace

    _MMA = tl.constexpr("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, "
            "{$10, $11, $12, $13};")
    _LD4 = tl.constexpr("ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];")
    _LD2 = tl.constexpr("ld.global.nc.v2.b32 {$0, $1}, [$2];")

    @triton.constexpr_function
    def _a_asm(bits, q):
        """PTX: one A register, the f16x2 (2^(10-q) + u_j, 2^(10-q) + u_(j+16)) from `bits` pre-shifted plane words
        ($1..) whose bits j, j + 16 of plane i sit at q + i, q + 16 + i (as in `_gemv_pair_asm`, no subtraction)."""
        bits, q = int(bits), int(q)
        mask = (1 << q) | (1 << (q + 16))
        magic = ((25 - q) << 10) * 0x10001
        lines = ["{", ".reg .b32 t;", f"lop3.b32 t, $1, {mask:#x}, {magic:#x}, 0xEA;"]
        for i in range(1, bits):
            lines.append(f"lop3.b32 t, ${1 + i}, {mask << i:#x}, t, 0xEA;")
        lines += ["mov.b32 $0, t;", "}"]
        return "\n".join(lines)

    @triton.constexpr_function
    def _e_asm(bits, q0, q1):
        """PTX: D = E_A B + C with the constant A whose columns of step (q0, q1) hold 2^(10-q) + L/2 (rows alike)."""
        c0, c1 = _h2_sub_const(bits, q0), _h2_sub_const(bits, q1)
        return ("{\n.reg .b32 a, b;\n"
                f"mov.b32 a, {c0:#x};\nmov.b32 b, {c1:#x};\n"
                "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {a, a, b, b}, {$4, $5}, "
                "{$6, $7, $8, $9};\n}")

    @triton.jit
    def _ld4(addr, MODE: tl.constexpr, ptr, off):
        """4 consecutive int32 at element offset off (MODE 2: one 16-byte load at byte address addr)."""
        if MODE == 2:
            a, b, c, d = tl.inline_asm_elementwise(_LD4, "=r,=r,=r,=r,l", [addr], dtype=(tl.int32,) * 4,
                                                   is_pure=True, pack=1)
        else:
            a = tl.load(ptr + off)
            b = tl.load(ptr + off + 1)
            c = tl.load(ptr + off + 2)
            d = tl.load(ptr + off + 3)
        return a, b, c, d

    @triton.jit
    def _scales4(addr, MODE: tl.constexpr, ptr, off):
        """4 consecutive fp16 scales at element offset off, as fp32."""
        if MODE == 2:
            u, v = tl.inline_asm_elementwise(_LD2, "=r,=r,l", [addr], dtype=(tl.int32, tl.int32), is_pure=True,
                                             pack=1)
            s0, s1 = _halves(u)
            s2, s3 = _halves(v)
        else:
            s0 = tl.load(ptr + off)
            s1 = tl.load(ptr + off + 1)
            s2 = tl.load(ptr + off + 2)
            s3 = tl.load(ptr + off + 3)
        return s0.to(tl.float32), s1.to(tl.float32), s2.to(tl.float32), s3.to(tl.float32)

    @triton.jit
    def _x_loads(x_ptr, x_a, xo, MODE: tl.constexpr):
        """The lane's 32 x values from element offset xo: 16 int32 of fp16 pairs (x_2a, x_2a+1) (MODE 2, four
        16-byte loads), or 32 fp16 tensors (MODE 1)."""
        xs = ()
        if MODE == 2:
            for v in tl.static_range(4):
                x0, x1, x2, x3 = _ld4(x_a + (xo + 8 * v) * 2, MODE, x_ptr, xo)
                xs = xs + (x0, x1, x2, x3)
        else:
            for j in tl.static_range(32):
                xs = xs + (tl.load(x_ptr + xo + j),)
        return xs

    @triton.jit
    def _tile_loads(pl_ptr, x_ptr, s_ptr, pl_a, x_a, s_a, po, xo, so, db, plane_stride, BITS: tl.constexpr,
                    MODE: tl.constexpr):
        """One K tile's loads of a lane: plane words (per plane, its 8 rows), its 32 x values (16 int32 of fp16
        pairs (x_2a, x_2a+1) in MODE 2; 32 fp16 in MODE 1), the 8 rows' scales (fp32). po / xo / so: element
        offsets of the lane's first word of plane 0, first x, first scale (rows rA..rA+3; the second run of
        rows starts db rows further: 32, less where clamped at N)."""
        words = ()
        for i in tl.static_range(BITS):
            oa = po + i * plane_stride
            a0, a1, a2, a3 = _ld4(pl_a + oa * 4, MODE, pl_ptr, oa)
            b0, b1, b2, b3 = _ld4(pl_a + (oa + db) * 4, MODE, pl_ptr, oa + db)
            words = words + ((a0, a1, a2, a3, b0, b1, b2, b3),)
        xs = _x_loads(x_ptr, x_a, xo, MODE)
        s0, s1, s2, s3 = _scales4(s_a + so * 2, MODE, s_ptr, so)
        s4, s5, s6, s7 = _scales4(s_a + (so + db) * 2, MODE, s_ptr, so + db)
        return words, xs, (s0, s1, s2, s3, s4, s5, s6, s7)

    @triton.jit
    def _win(words, r: tl.constexpr, start: tl.constexpr, BITS: tl.constexpr):
        """Row r's plane words shifted for the window starting at slot `start` (bit j of plane i -> j - start + 1
        + i); planes >= BITS repeat plane 0 and are never read."""
        c0 = _shift_to(words[0][r], start - 1, 0)
        c1, c2, c3, c4, c5, c6, c7 = c0, c0, c0, c0, c0, c0, c0
        if BITS > 1:
            c1 = _shift_to(words[1][r], start - 1, 1)
        if BITS > 2:
            c2 = _shift_to(words[2][r], start - 1, 2)
        if BITS > 3:
            c3 = _shift_to(words[3][r], start - 1, 3)
        if BITS > 4:
            c4 = _shift_to(words[4][r], start - 1, 4)
        if BITS > 5:
            c5 = _shift_to(words[5][r], start - 1, 5)
        if BITS > 6:
            c6 = _shift_to(words[6][r], start - 1, 6)
        if BITS > 7:
            c7 = _shift_to(words[7][r], start - 1, 7)
        return c0, c1, c2, c3, c4, c5, c6, c7

    @triton.constexpr_function
    def _class_mask(bits, k):
        """Bit positions p with (p % 16) % bits == k (the same in both fp16 halves), as a signed int32 value."""
        bits, k = int(bits), int(k)
        v = sum(1 << p for p in range(32) if (p % 16) % bits == k)
        return v - (1 << 32) if v >= 1 << 31 else v

    @triton.constexpr_function
    def _bsel_asm(k):
        return f"lop3.b32 $0, $1, $2, {int(k) & 0xFFFFFFFF:#x}, 0xE4;"

    @triton.jit
    def _bsel(k: tl.constexpr, a, b, MODE: tl.constexpr):
        """Bits of a where k is set, of b elsewhere (one LOP3)."""
        if MODE == 2:
            return tl.inline_asm_elementwise(_bsel_asm(k), "=r,r,r", [a, b], dtype=tl.int32,
                                             is_pure=True, pack=1)
        else:
            return b ^ ((a ^ b) & k)

    @triton.jit
    def _merged(c, cls: tl.constexpr, BITS: tl.constexpr, MODE: tl.constexpr):
        """MERGE: one word holding the codes of every slot pair jj of class cls ((jj - start) % BITS == cls) of a
        window: plane i's bit of slot jj sits at q + i (q = jj - start + 1), i.e. at positions = cls + 1 + i
        (mod BITS), so planes interleave without overlap: BITS - 1 LOP3 (bit selects) per class and window."""
        m = c[0]
        for i in tl.static_range(1, BITS):
            m = _bsel(_class_mask(BITS, (cls + 1 + i) % BITS), c[i], m, MODE)
        return m

    @triton.jit
    def _src(words, r: tl.constexpr, start: tl.constexpr, BITS: tl.constexpr, MERGE: tl.constexpr,
             MODE: tl.constexpr):
        """Row r's A-register sources for the window at `start`: the shifted plane words (8-tuple), or with MERGE
        the merged words of the window's classes (padded to 8)."""
        c = _win(words, r, start, BITS)
        if MERGE:
            m0 = _merged(c, 0, BITS, MODE)  # classes a window does not use are dead code
            m1, m2, m3 = m0, m0, m0
            if BITS > 1:
                m1 = _merged(c, 1, BITS, MODE)
            if BITS > 2:
                m2 = _merged(c, 2, BITS, MODE)
            if BITS > 3:
                m3 = _merged(c, 3, BITS, MODE)
            c = (m0, m1, m2, m3, m0, m0, m0, m0)
        return c

    @triton.jit
    def _a_bits(src, jj: tl.constexpr, start: tl.constexpr, BITS: tl.constexpr, MERGE: tl.constexpr,
                MODE: tl.constexpr):
        """The A register (int32 holding the f16x2 (2^(10-q) + u_jj, 2^(10-q) + u_(jj+16))) of slot pair jj."""
        q: tl.constexpr = jj - start + 1
        if MERGE:
            mask: tl.constexpr = (((1 << BITS) - 1) << q) * 0x10001
            if MODE == 2:
                return tl.inline_asm_elementwise(
                    f"lop3.b32 $0, $1, {mask:#x}, {((25 - q) << 10) * 0x10001:#x}, 0xEA;", "=r,r",
                    [src[(jj - start) % BITS]], dtype=tl.int32, is_pure=True, pack=1)
            else:
                return (src[(jj - start) % BITS] & mask) | (((25 - q) << 10) * 0x10001)
        else:
            if MODE == 2:
                # all 8 words are passed (planes >= BITS repeat plane 0); the PTX reads $1..$BITS
                return tl.inline_asm_elementwise(_a_asm(BITS, q), "=r,r,r,r,r,r,r,r,r",
                                                 [src[0], src[1], src[2], src[3], src[4], src[5], src[6], src[7]],
                                                 dtype=tl.int32, is_pure=True, pack=1)
            else:
                M0: tl.constexpr = (1 << q) | (1 << (q + 16))
                f = (src[0] & M0) | (((25 - q) << 10) * 0x10001)
                for i in tl.static_range(1, BITS):
                    f = f | (src[i] & (M0 << i))
                return f

    @triton.jit
    def _quad_sum(v, NT: tl.constexpr):
        """MODE 1: the sum over the 4 lanes of each quad (what the mma adds over its K columns), on every lane."""
        s = tl.sum(tl.reshape(v, [NT // 4, 4]), axis=1)
        return tl.reshape(tl.broadcast_to(s[:, None], [NT // 4, 4]), [NT])

    @triton.jit
    def _x_pair(xs, jj: tl.constexpr):
        """MODE 2: B register (x_jj, x_jj+16) from the lane's 16 pair registers (x_2a, x_2a+1)."""
        sel: tl.constexpr = 0x7632 if jj % 2 == 1 else 0x5410
        return tl.inline_asm_elementwise(f"prmt.b32 $0, $1, $2, {sel:#x};", "=r,r,r", [xs[jj // 2], xs[8 + jj // 2]],
                                         dtype=tl.int32, is_pure=True, pack=1)

    @triton.jit
    def _tile_mma(words, xs, BITS: tl.constexpr, MERGE: tl.constexpr, NT: tl.constexpr):
        """MODE 2: one K tile -> (D - E) per row of the lane (8 fp32 tensors [NT])."""
        WIN: tl.constexpr = 10 - BITS
        z = tl.zeros([NT], dtype=tl.float32)
        d = (z,) * 16  # D of tile p: c0..c3 in d[4p..4p+3] (c0 = row r_2p, c2 = row r_2p+1; c1, c3 alike)
        e = (z,) * 4
        c = [_src(words, r, 0, BITS, MERGE, 2) for r in (0, 1, 2, 3, 4, 5, 6, 7)]  # per row, current window
        for m in tl.static_range(8):
            b0 = _x_pair(xs, 2 * m)
            b1 = _x_pair(xs, 2 * m + 1)
            if (2 * m) % WIN == 0 and m > 0:
                c = [_src(words, r, (2 * m // WIN) * WIN, BITS, MERGE, 2) for r in (0, 1, 2, 3, 4, 5, 6, 7)]
            lo_c = c  # the window of slot 2m
            if (2 * m + 1) % WIN == 0:
                c = [_src(words, r, ((2 * m + 1) // WIN) * WIN, BITS, MERGE, 2) for r in (0, 1, 2, 3, 4, 5, 6, 7)]
            nd = ()
            for p in tl.static_range(4):
                a0 = _a_bits(lo_c[2 * p], 2 * m, (2 * m // WIN) * WIN, BITS, MERGE, 2)
                a1 = _a_bits(lo_c[2 * p + 1], 2 * m, (2 * m // WIN) * WIN, BITS, MERGE, 2)
                a2 = _a_bits(c[2 * p], 2 * m + 1, ((2 * m + 1) // WIN) * WIN, BITS, MERGE, 2)
                a3 = _a_bits(c[2 * p + 1], 2 * m + 1, ((2 * m + 1) // WIN) * WIN, BITS, MERGE, 2)
                r0, r1, r2, r3 = tl.inline_asm_elementwise(
                    _MMA, "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", [a0, a1, a2, a3, b0, b1, d[4 * p], d[4 * p + 1],
                                                             d[4 * p + 2], d[4 * p + 3]],
                    dtype=(tl.float32,) * 4, is_pure=True, pack=1)
                nd = nd + (r0, r1, r2, r3)
            d = nd
            e = tl.inline_asm_elementwise(_e_asm(BITS, 1 + (2 * m) % WIN, 1 + (2 * m + 1) % WIN),
                                          "=f,=f,=f,=f,r,r,f,f,f,f", [b0, b1, e[0], e[1], e[2], e[3]],
                                          dtype=(tl.float32,) * 4, is_pure=True, pack=1)
        return [d[4 * (r // 2) + 2 * (r % 2)] - e[0] for r in (0, 1, 2, 3, 4, 5, 6, 7)]

    @triton.jit
    def _tile_twin(words, xs, BITS: tl.constexpr, MERGE: tl.constexpr, NT: tl.constexpr):
        """MODE 1: the same sums as `_tile_mma` (same A bits), lane products summed over each quad in fp32."""
        WIN: tl.constexpr = 10 - BITS
        L: tl.constexpr = (1 << BITS) - 1
        z = tl.zeros([NT], dtype=tl.float32)
        d = (z, z, z, z, z, z, z, z)
        for jj in tl.static_range(16):
            c = [_src(words, r, (jj // WIN) * WIN, BITS, MERGE, 1) for r in (0, 1, 2, 3, 4, 5, 6, 7)]
            xl = xs[jj].to(tl.float32)
            xh = xs[jj + 16].to(tl.float32)
            nd = ()
            for r in tl.static_range(8):
                lo, hi = _halves(_a_bits(c[r], jj, (jj // WIN) * WIN, BITS, MERGE, 1))
                off = (1 << (10 - 1 - jj % WIN)) + L * 0.5  # 2^(10-q) + L/2, exact
                nd = nd + (d[r] + (lo.to(tl.float32) - off) * xl + (hi.to(tl.float32) - off) * xh,)
            d = nd
        return [_quad_sum(v, NT) for v in d]

    @triton.jit
    def _tile_offsets(kt, t, rA, N, KW, k_tiles, G, group_size, EVEN_K: tl.constexpr):
        """Element offsets (int64) of K tile kt for a lane: plane 0 word, first x, first scale. EVEN_K (every
        tile full, k_tiles * UNROLL splits exactly): no clamping; else tiles past k_tiles re-read the last one
        (their weight is 0) and words past KW re-read word KW - 1 (x is zero there)."""
        if EVEN_K:
            kw = kt * 4 + t
        else:
            kt = tl.minimum(kt, k_tiles - 1)
            kw = tl.minimum(kt * 4 + t, KW - 1)
        gi = tl.minimum((kt * _TK) // group_size, G - 1)
        return (kw.to(tl.int64) * N + rA, (kt * _TK + 32 * t).to(tl.int64), (gi * N + rA).to(tl.int64))

    @triton.jit
    def _gemv_mma_kernel(x_ptr, pl_ptr, s_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
                         N, KW, G, group_size, k_tiles, split_k,
                         BITS: tl.constexpr, HAS_BIAS: tl.constexpr, MODE: tl.constexpr, UNROLL: tl.constexpr,
                         NT: tl.constexpr, EVEN_K: tl.constexpr, MERGE: tl.constexpr = False,
                         PREFETCH: tl.constexpr = False):
        # x: [k_tiles * 128] fp16 (zero past K); planes [BITS, KW, N] int32; scales [G, N]; out [N].
        # Program (pid_n, pid_k): rows pid_n * 64 * warps .. (64 per warp), K tiles pid_k * UNROLL .. + UNROLL
        # (straight-line: the next tile's loads are issued before this tile's arithmetic). Tiles past k_tiles
        # re-read the last one with weight 0.
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        lane = tl.arange(0, NT)
        g = (lane % 32) // 4
        t = lane % 4
        rowA = pid_n * (2 * NT) + (lane // 32) * 64 + 4 * g  # rows rowA .. +3 and rowA + 32 .. +35
        rA = tl.minimum(rowA, N - 4)  # N % 4 == 0: a run of 4 is all in or all out (out: read, never stored)
        db = tl.minimum(rowA + 32, N - 4) - rA  # the second run, relative to the first
        pl_a = pl_ptr.to(tl.int64)
        x_a = x_ptr.to(tl.int64)
        s_a = s_ptr.to(tl.int64)
        plane_stride = KW.to(tl.int64) * N
        z = tl.zeros([NT], dtype=tl.float32)
        acc = (z, z, z, z, z, z, z, z)
        kt0 = pid_k * UNROLL
        if PREFETCH:  # the program's words and scales into L2 at once
            _h2_prefetch(pl_ptr, s_ptr, kt0 * 4, pid_n, N, KW, G, group_size, BITS, 4 * UNROLL, 2 * NT, False)
        nxt = _tile_loads(pl_ptr, x_ptr, s_ptr, pl_a, x_a, s_a, *_tile_offsets(kt0, t, rA, N, KW, k_tiles, G, group_size,
                                                                           EVEN_K), db, plane_stride, BITS, MODE)
        for i in tl.static_range(UNROLL):
            cur = nxt
            if i + 1 < UNROLL:
                nxt = _tile_loads(pl_ptr, x_ptr, s_ptr, pl_a, x_a, s_a,
                                  *_tile_offsets(kt0 + i + 1, t, rA, N, KW, k_tiles, G, group_size, EVEN_K),
                                  db, plane_stride, BITS, MODE)
            if MODE == 2:
                dv = _tile_mma(cur[0], cur[1], BITS, MERGE, NT)
            else:
                dv = _tile_twin(cur[0], cur[1], BITS, MERGE, NT)
            if EVEN_K:
                acc = [acc[r] + cur[2][r] * dv[r] for r in (0, 1, 2, 3, 4, 5, 6, 7)]
            else:
                live = (kt0 + i < k_tiles).to(tl.float32)
                acc = [acc[r] + (cur[2][r] * live) * dv[r] for r in (0, 1, 2, 3, 4, 5, 6, 7)]
        # rows r < 4: rowA + r, else rowA + 28 + r; lane t == 0 of each quad writes (all four hold the same sums)
        for r in tl.static_range(8):
            row = rowA + (r if r < 4 else 28 + r)
            mask = (row < N) & (t == 0)
            v = 2.0 * acc[r]
            if split_k == 1:
                if HAS_BIAS:
                    v += tl.load(b_ptr + row, mask=mask, other=0.0).to(tl.float32)
                tl.store(out_ptr + row, v.to(out_ptr.dtype.element_ty), mask=mask)
            else:
                tl.atomic_add(ws_ptr + row, v, mask=mask, sem="relaxed")
        if split_k > 1:
            tl.debug_barrier()  # every thread's adds are issued before the counter is released
            prev = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
            if prev == split_k - 1:
                for r in tl.static_range(8):
                    row = rowA + (r if r < 4 else 28 + r)
                    mask = (row < N) & (t == 0)
                    tot = tl.load(ws_ptr + row, mask=mask, other=0.0, volatile=True)
                    if HAS_BIAS:
                        tot += tl.load(b_ptr + row, mask=mask, other=0.0).to(tl.float32)
                    tl.store(out_ptr + row, tot.to(out_ptr.dtype.element_ty), mask=mask)
                    tl.store(ws_ptr + row, tl.zeros_like(tot), mask=mask)
                tl.atomic_xchg(cnt_ptr + pid_n, 0)


def mma_ok(N: int, K: int, group_size: int, kind: str, offset, dtype: torch.dtype) -> bool:
    """Whether `_gemv_mma_kernel` takes this layer."""
    return (triton is not None and kind == "bipolar" and offset is None and dtype == torch.float16 and N % 4 == 0
            and (group_size % TILE_K == 0 or group_size >= K))


def launch_gemv_mma(x2, planes, scales, bias, out, group_size, K, cfg):
    """x2 [1, K] fp16 -> out [1, N]. cfg: num_warps (64 rows each), unroll (K tiles per program), optional mode."""
    bits, KW, N = planes.shape
    G = scales.shape[0]
    if not mma_ok(N, K, group_size, "bipolar", None, x2.dtype):
        raise ValueError("the mma GEMV takes fp16 bipolar weights without offset, N % 4 == 0, groups of 128k")
    k_tiles = -(-K // TILE_K)
    xv = x2.reshape(-1)
    if K % TILE_K or xv.data_ptr() % 16:  # whole tiles of x, 16-byte aligned (zero past K)
        xp = torch.zeros(k_tiles * TILE_K, dtype=x2.dtype, device=x2.device)
        xp[:K] = xv
        xv = xp
    warps, unroll = cfg["num_warps"], min(cfg["unroll"], k_tiles)
    split = -(-k_tiles // unroll)
    n_blocks = -(-N // (64 * warps))
    ws, cnt = _workspace(x2.device, N if split > 1 else 0, n_blocks if split > 1 else 0)
    mode = cfg.get("mode", 1 if _interpreting() else 2)
    return _gemv_mma_kernel[(n_blocks, split)](
        xv, planes, scales, bias if bias is not None else scales, out, ws, cnt, N, KW, G, group_size, k_tiles, split,
        BITS=bits, HAS_BIAS=bias is not None, MODE=mode, UNROLL=unroll, NT=32 * warps,
        EVEN_K=K % TILE_K == 0 and k_tiles % unroll == 0, MERGE=bool(cfg.get("merge", False)) and 2 <= bits <= 4,
        PREFETCH=bool(cfg.get("prefetch")) and mode == 2, num_warps=warps, num_stages=1)


def gemv_mma_configs(N: int, K: int, bits: int, group_size: int, kind: str, offset, dtype, sms: int) -> list[dict]:
    """Tuning candidates ([] where the kernel does not apply): warps per program x K tiles per program."""
    if not mma_ok(N, K, group_size, kind, offset, dtype):
        return []
    k_tiles = -(-K // TILE_K)
    out = []
    # (warps, K tiles per program, merged plane words for 2..4 bits); offline sm_90: 1.5 / 2.1 / 2.8 SASS
    # instructions per weight at 2 / 3 / 4 bits merged (u8), 2.0 / 2.8 / 3.3 unmerged (u4)
    # H100 (docs/results/bitplane.md): 4 warps, 2 tiles best; the L2 prefetch (prefetch=1, pinned configs only)
    # ran 3-15 % slower than the same config without, so it is no tuning candidate
    for warps, unroll, merge, pf in ((4, 2, 1, 0), (4, 4, 1, 0), (2, 4, 1, 0), (4, 8, 1, 0), (8, 2, 1, 0)):
        if bits > 4 or bits == 1:
            merge = 0
        cfg = dict(kernel="mma", num_warps=warps, unroll=min(unroll, k_tiles), merge=merge, prefetch=pf)
        if cfg not in out:
            out.append(cfg)
    return out
