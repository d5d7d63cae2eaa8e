"""Bit-plane (bipolar-INT) M = 1..16 on the tensor cores: the `bitplane_mma` weight path with up to 16 columns of x.

Same A registers as the M = 1 GEMV (`bitplane_mma`: per lane 8 rows x one plane word, `bits` LOP3 per slot pair
or one on merged plane words, one constant mma for the level offset). Differences:

- B holds real columns: lane (g, t) loads row min(g, M - 1) of x (and row min(g + 8, M - 1) for a second n8 block
  when M > 8), so D's columns are the batch rows; a lane ends with rows r_0..r_7 x columns 2t, 2t + 1 (and
  8 + 2t, 9 + 2t), all 4 lanes of a quad hold different columns. M = 1 works too (every column is row 0).
- The warps of a program share the same 64 rows and take interleaved K tiles (tile kt0 + i * warps + w), so
  their partial sums meet in the program (a cross-warp `tl.sum`) and split-K adds warps-times fewer atomics.

MODE 1 (TRITON_INTERPRET=1) is a plain-Triton twin: per lane the products of its word for every column of x, summed
over the lane quad, then the lane's own columns picked.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = tl = None

from .bitplane_mma import TILE_K, mma_ok

if triton is not None:
    from .bitplane import _h2_prefetch, _halves
    from .bitplane_mma import (_MMA, _TK, _a_bits, _e_asm, _quad_sum, _src, _tile_loads, _tile_offsets, _x_loads,
                               _x_pair)
    from .gwint_triton import _interpreting, _workspace

    @triton.jit
    def _tile_mma_nb(words, xs0, xs1, BITS: tl.constexpr, MERGE: tl.constexpr, NB: tl.constexpr,
                     NT: tl.constexpr):
        """MODE 2: one K tile -> (D - E) per (row r, column slot cc) of the lane, flat index r * 2 NB + cc
        (cc: columns 2t, 2t + 1, then 8 + 2t, 9 + 2t)."""
        WIN: tl.constexpr = 10 - BITS
        z = tl.zeros([NT], dtype=tl.float32)
        d = (z,) * (16 * NB)  # tile p, block b: c0..c3 at ((p * NB + b) * 4 ..)
        e = (z,) * (4 * NB)
        c = [_src(words, r, 0, BITS, MERGE, 2) for r in (0, 1, 2, 3, 4, 5, 6, 7)]
        for m in tl.static_range(8):
            b00 = _x_pair(xs0, 2 * m)
            b01 = _x_pair(xs0, 2 * m + 1)
            b10 = b00
            b11 = b01
            if NB == 2:
                b10 = _x_pair(xs1, 2 * m)
                b11 = _x_pair(xs1, 2 * m + 1)
            if (2 * m) % WIN == 0 and m > 0:
                c = [_src(words, r, (2 * m // WIN) * WIN, BITS, MERGE, 2) for r in (0, 1, 2, 3, 4, 5, 6, 7)]
            lo_c = c
            if (2 * m + 1) % WIN == 0:
                c = [_src(words, r, ((2 * m + 1) // WIN) * WIN, BITS, MERGE, 2) for r in (0, 1, 2, 3, 4, 5, 6, 7)]
            nd = ()
            for p in tl.static_range(4):
                a0 = _a_bits(lo_c[2 * p], 2 * m, (2 * m // WIN) * WIN, BITS, MERGE, 2)
                a1 = _a_bits(lo_c[2 * p + 1], 2 * m, (2 * m // WIN) * WIN, BITS, MERGE, 2)
                a2 = _a_bits(c[2 * p], 2 * m + 1, ((2 * m + 1) // WIN) * WIN, BITS, MERGE, 2)
                a3 = _a_bits(c[2 * p + 1], 2 * m + 1, ((2 * m + 1) // WIN) * WIN, BITS, MERGE, 2)
                for b in tl.static_range(NB):
                    r0, r1, r2, r3 = tl.inline_asm_elementwise(
                        _MMA, "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f",
                        [a0, a1, a2, a3, b00 if b == 0 else b10, b01 if b == 0 else b11, d[(p * NB + b) * 4],
                         d[(p * NB + b) * 4 + 1], d[(p * NB + b) * 4 + 2], d[(p * NB + b) * 4 + 3]],
                        dtype=(tl.float32,) * 4, is_pure=True, pack=1)
                    nd = nd + (r0, r1, r2, r3)
            d = nd
            ne = ()
            for b in tl.static_range(NB):
                ne = ne + tl.inline_asm_elementwise(
                    _e_asm(BITS, 1 + (2 * m) % WIN, 1 + (2 * m + 1) % WIN), "=f,=f,=f,=f,r,r,f,f,f,f",
                    [b00 if b == 0 else b10, b01 if b == 0 else b11, e[4 * b], e[4 * b + 1], e[4 * b + 2],
                     e[4 * b + 3]], dtype=(tl.float32,) * 4, is_pure=True, pack=1)
            e = ne
        out = ()
        for i in tl.static_range(16 * NB):  # row r = i // (2 NB), column slot cc = i % (2 NB)
            out = out + (d[((i // (2 * NB) // 2) * NB + i % (2 * NB) // 2) * 4 + 2 * (i // (2 * NB) % 2)
                           + i % (2 * NB) % 2] - e[(i % (2 * NB) // 2) * 4 + i % (2 * NB) % 2],)
        return out

    @triton.jit
    def _tile_twin_nb(words, xall, t, BITS: tl.constexpr, MERGE: tl.constexpr, NB: tl.constexpr,
                      NT: tl.constexpr):
        """MODE 1: `_tile_mma_nb`'s sums. xall: per column m (0 .. 8 NB - 1) the lane's 32 x values."""
        WIN: tl.constexpr = 10 - BITS
        L: tl.constexpr = (1 << BITS) - 1
        MB: tl.constexpr = 8 * NB
        z = tl.zeros([NT], dtype=tl.float32)
        pr = (z,) * (8 * MB)  # per (row r, column m): r * MB + m
        for jj in tl.static_range(16):
            c = [_src(words, r, (jj // WIN) * WIN, BITS, MERGE, 1) for r in (0, 1, 2, 3, 4, 5, 6, 7)]
            off = (1 << (10 - 1 - jj % WIN)) + L * 0.5  # 2^(10-q) + L/2, exact
            npr = ()
            for r in tl.static_range(8):
                lo, hi = _halves(_a_bits(c[r], jj, (jj // WIN) * WIN, BITS, MERGE, 1))
                lo = lo.to(tl.float32) - off
                hi = hi.to(tl.float32) - off
                for m in tl.static_range(MB):
                    npr = npr + (pr[r * MB + m] + lo * xall[m][jj].to(tl.float32) + hi * xall[m][jj + 16].to(tl.float32),)
            pr = npr
        out = ()
        for i in tl.static_range(16 * NB):  # row i // (2 NB), column 2t + 8 (cc // 2) + cc % 2, cc = i % (2 NB)
            v = _quad_sum(pr[(i // (2 * NB)) * MB + 8 * (i % (2 * NB) // 2) + i % (2 * NB) % 2], NT)
            v = tl.where(t == 1, _quad_sum(pr[(i // (2 * NB)) * MB + 8 * (i % (2 * NB) // 2) + i % (2 * NB) % 2 + 2],
                                           NT), v)
            v = tl.where(t == 2, _quad_sum(pr[(i // (2 * NB)) * MB + 8 * (i % (2 * NB) // 2) + i % (2 * NB) % 2 + 4],
                                           NT), v)
            v = tl.where(t == 3, _quad_sum(pr[(i // (2 * NB)) * MB + 8 * (i % (2 * NB) // 2) + i % (2 * NB) % 2 + 6],
                                           NT), v)
            out = out + (v,)
        return out

    @triton.jit
    def _gemm_mma_kernel(x_ptr, pl_ptr, s_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
                         M, N, KW, G, group_size, k_tiles, split_k, stride_xm, stride_om,
                         BITS: tl.constexpr, HAS_BIAS: tl.constexpr, MODE: tl.constexpr, UNROLL: tl.constexpr,
                         NT: tl.constexpr, EVEN_K: tl.constexpr, MERGE: tl.constexpr, NB: tl.constexpr,
                         PREFETCH: tl.constexpr = False):
        # x: [M, >= k_tiles * 128] fp16 (zero past K); planes [BITS, KW, N] int32; scales [G, N]; out [M, N].
        # Program (pid_n, pid_k): rows pid_n * 64 .. + 63; warp w takes K tiles kt0 + i * W + w, i < UNROLL.
        W: tl.constexpr = NT // 32
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        lane = tl.arange(0, NT)
        wv = lane // 32
        g = (lane % 32) // 4
        t = lane % 4
        rowA = pid_n * 64 + 4 * g
        rA = tl.minimum(rowA, N - 4)  # N % 4 == 0: a run of 4 rows is all in or all out
        db = tl.minimum(rowA + 32, N - 4) - rA
        x_a = x_ptr.to(tl.int64)
        pl_a = pl_ptr.to(tl.int64)
        s_a = s_ptr.to(tl.int64)
        plane_stride = KW.to(tl.int64) * N
        xr0 = tl.minimum(g, M - 1).to(tl.int64) * stride_xm  # B columns: x rows g (and g + 8), clamped to M - 1
        xr1 = tl.minimum(g + 8, M - 1).to(tl.int64) * stride_xm
        z = tl.zeros([NT], dtype=tl.float32)
        acc = (z,) * (16 * NB)
        if PREFETCH:  # the program's words and scales into L2 at once
            _h2_prefetch(pl_ptr, s_ptr, pid_k * (UNROLL * W) * 4, pid_n, N, KW, G, group_size, BITS, 4 * UNROLL * W, 64,
                         False)
        kt0 = pid_k * (UNROLL * W) + wv
        po, xo, so = _tile_offsets(kt0, t, rA, N, KW, k_tiles, G, group_size, EVEN_K)
        nxt = _tile_loads(pl_ptr, x_ptr, s_ptr, pl_a, x_a, s_a, po, xo + xr0, so, db, plane_stride, BITS, MODE)
        nx1 = nxt[1]
        if MODE == 2 and NB == 2:
            nx1 = _x_loads(x_ptr, x_a, xo + xr1, MODE)
        for i in tl.static_range(UNROLL):
            cur = nxt
            cx1 = nx1
            xo_c = xo
            if i + 1 < UNROLL:
                po, xo, so = _tile_offsets(kt0 + (i + 1) * W, t, rA, N, KW, k_tiles, G, group_size, EVEN_K)
                nxt = _tile_loads(pl_ptr, x_ptr, s_ptr, pl_a, x_a, s_a, po, xo + xr0, so, db, plane_stride, BITS,
                                  MODE)
                nx1 = nxt[1]
                if MODE == 2 and NB == 2:
                    nx1 = _x_loads(x_ptr, x_a, xo + xr1, MODE)
            if MODE == 2:
                dv = _tile_mma_nb(cur[0], cur[1], cx1, BITS, MERGE, NB, NT)
            else:
                xall = ()
                for m in tl.static_range(8 * NB):
                    xall = xall + (_x_loads(x_ptr, x_a, xo_c + tl.minimum(m, M - 1).to(tl.int64) * stride_xm, 1),)
                dv = _tile_twin_nb(cur[0], xall, t, BITS, MERGE, NB, NT)
            sc = cur[2]
            if not EVEN_K:
                live = (kt0 + i * W < k_tiles).to(tl.float32)
                sc = [v * live for v in sc]
            nacc = ()
            for j in tl.static_range(16 * NB):
                nacc = nacc + (acc[j] + sc[j // (2 * NB)] * dv[j],)
            acc = nacc
        # the warps' partial sums meet (one [32] vector per (row, column) slot), then lane l of the result
        # holds what lane l of every warp held: rows of g = l // 4, columns of t = l % 4
        l32 = tl.arange(0, 32)
        g32 = l32 // 4
        t32 = l32 % 4
        for j in tl.static_range(16 * NB):
            v = 2.0 * tl.sum(tl.reshape(acc[j], [W, 32]), axis=0)
            row = pid_n * 64 + 4 * g32 + (j // (2 * NB) if j // (2 * NB) < 4 else 28 + j // (2 * NB))
            col = 2 * t32 + (j % (2 * NB) % 2) + 8 * (j % (2 * NB) // 2)
            mask = (row < N) & (col < M)
            if split_k == 1:
                if HAS_BIAS:
                    v += tl.load(b_ptr + row, mask=mask, other=0.0).to(tl.float32)
                tl.store(out_ptr + col * stride_om + row, v.to(out_ptr.dtype.element_ty), mask=mask)
            else:
                tl.atomic_add(ws_ptr + col * N + row, v, mask=mask, sem="relaxed")
        if split_k > 1:
            tl.debug_barrier()  # every thread's adds are issued before the counter is released
            prev = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
            if prev == split_k - 1:
                for j in tl.static_range(16 * NB):
                    row = pid_n * 64 + 4 * g32 + (j // (2 * NB) if j // (2 * NB) < 4 else 28 + j // (2 * NB))
                    col = 2 * t32 + (j % (2 * NB) % 2) + 8 * (j % (2 * NB) // 2)
                    mask = (row < N) & (col < M)
                    tot = tl.load(ws_ptr + col * N + row, mask=mask, other=0.0, volatile=True)
                    if HAS_BIAS:
                        tot += tl.load(b_ptr + row, mask=mask, other=0.0).to(tl.float32)
                    tl.store(out_ptr + col * stride_om + row, tot.to(out_ptr.dtype.element_ty), mask=mask)
                    tl.store(ws_ptr + col * N + row, tl.zeros_like(tot), mask=mask)
                tl.atomic_xchg(cnt_ptr + pid_n, 0)


def launch_gemm_mma(x2, planes, scales, bias, out, group_size, K, cfg):
    """x2 [M, K] fp16 (M <= 16) -> out [M, N]. cfg: num_warps (sharing 64 rows, interleaved K tiles), unroll (K
    tiles per warp), merge, optional mode."""
    bits, KW, N = planes.shape
    M = x2.shape[0]
    G = scales.shape[0]
    if not (1 <= M <= 16 and mma_ok(N, K, group_size, "bipolar", None, x2.dtype)):
        raise ValueError("the mma GEMM takes M <= 16 rows of fp16, bipolar weights without offset, N % 4 == 0")
    k_tiles = -(-K // TILE_K)
    xs = x2
    if K % TILE_K or x2.data_ptr() % 16 or x2.stride(0) % 8:  # whole tiles, 16-byte aligned rows, zero past K
        xs = torch.zeros((M, k_tiles * TILE_K), dtype=x2.dtype, device=x2.device)
        xs[:, :K] = x2
    warps, unroll = cfg["num_warps"], cfg["unroll"]
    unroll = max(1, min(unroll, -(-k_tiles // warps)))
    split = -(-k_tiles // (warps * unroll))
    n_blocks = -(-N // 64)
    ws, cnt = _workspace(x2.device, M * N if split > 1 else 0, n_blocks if split > 1 else 0)
    mode = cfg.get("mode", 1 if _interpreting() else 2)
    return _gemm_mma_kernel[(n_blocks, split)](
        xs, planes, scales, bias if bias is not None else scales, out, ws, cnt, M, N, KW, G, group_size, k_tiles,
        split, xs.stride(0), out.stride(0),
        BITS=bits, HAS_BIAS=bias is not None, MODE=mode, UNROLL=unroll, NT=32 * warps,
        EVEN_K=K % TILE_K == 0 and k_tiles % (unroll * warps) == 0,
        MERGE=bool(cfg.get("merge", False)) and 2 <= bits <= 4, NB=1 if M <= 8 else 2,
        PREFETCH=bool(cfg.get("prefetch")) and mode == 2, num_warps=warps, num_stages=1)


def gemm_mma_configs(M: int, N: int, K: int, bits: int, group_size: int, kind: str, offset, dtype) -> list[dict]:
    """Tuning candidates for M <= 16 ([] where the kernel does not apply): (warps, K tiles per warp, merge)."""
    if M > 16 or not mma_ok(N, K, group_size, kind, offset, dtype):
        return []
    out = []
    for warps, unroll, merge, pf in ((4, 2, 1, 1), (4, 4, 1, 1), (2, 4, 1, 1), (8, 2, 1, 1), (4, 1, 1, 1),
                                     (4, 2, 1, 0)):
        if not 2 <= bits <= 4:
            merge = 0
        cfg = dict(kernel="mma_k", num_warps=warps, unroll=unroll, merge=merge, prefetch=pf)
        if cfg not in out:
            out.append(cfg)
    return out
