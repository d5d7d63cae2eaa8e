"""The M >= 2 kernel of `bsr` for thin blocks (block_rows under 16, e.g. 1x16): weights expanded to dense tiles
in registers, times a dense x tile on the tensor cores.

`_bsr_mm_kernel` gives a program BLOCK_R rows of ONE block row, so that all its rows share the x segments it
gathers; with R = 1 that is one output row per program and a CUDA-core multiply-reduce (0.06x of cuBLAS at M = 16,
docs/results/blocksparse.md). Here a program owns BLOCK_N output rows of different block rows and walks K in
windows of KT columns (S = KT / C block slots); in each window it rebuilds the dense [BLOCK_N, KT] weight tile from
the stored blocks that fall in it (zeros elsewhere) and multiplies it with the dense x tile [BLOCK_M, KT] by
`tl.dot`. x is read once per tile, not gathered per row; the tensor cores do the zeros' work too (at 50-80 %
sparsity still far under their rate at M <= 128), and only the stored blocks are read from memory.

Which stored block sits in which slot comes from a window table derived from (crow, col) once per weight and cached
(`window_table`, like `bsr.row_order`): int32 [NW, NB] (NW = ceil(KB / S) windows, window-major so that a step's
loads across block rows are contiguous), entry (w, r) = (blocks of block row r in windows before w) << 16 | the
slot bits of window w. In the kernel, slot s of block row r holds stored block crow[r] + start + (set bits below s)
when bit s is set. The table's addresses depend on the loop counter only, so a step's chain is table -> values,
and the column indexes are not read at all. Needs KB < 2^15 and S <= 16.

Split-K (`chunk` = windows per program, 0: all of K): programs of one tile meet in bsr's stored-partials epilogue.
Values in the model dtype only (quantized thin blocks keep `_bsr_mm_kernel`).

Measured (H100, docs/results/blocksparse.md, fourth pass): 1x16 blocks at 8192x8192, M = 16: 0.91x of cuBLAS at
50 % (52.9 us; the multiply-reduce path 806 us), 1.22x at 80 %; M = 128 0.43-0.45x (6240 us before, 50 %).
"""

from __future__ import annotations

import weakref

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

MAX_SLOTS = 16  # slot bits per table entry (the low half-word)


def ok(params: dict, dtype: torch.dtype) -> bool:
    """Whether the thin kernel takes this weight: values in the model dtype, fp16/bf16 x, power-of-two block sides,
    a block width that some K-tile of 16..128 columns holds in at most 16 slots, fewer than 2^15 block columns."""
    if triton is None or params.get("bits") is not None or dtype not in (torch.float16, torch.bfloat16):
        return False
    R, C, K = params["block_rows"], params["block_cols"], params["in_features"]
    pow2 = all(v > 0 and v & (v - 1) == 0 for v in (R, C))
    return pow2 and C <= 128 and K // C < (1 << 15)


_TABLES: dict[tuple, tuple] = {}


def window_table(tensors: dict, params: dict, slots: int) -> torch.Tensor:
    """int32 [NW, NB]: per window of `slots` block columns and block row, (blocks of the row in earlier windows)
    << 16 | bit s set where block column w * slots + s is stored. Built on the weight's device with torch ops (no
    host sync) and cached per (crow, col, versions, slots); under CUDA-graph capture built into the graph's memory
    and not cached."""
    if not 1 <= slots <= MAX_SLOTS:
        raise ValueError(f"bsr thin windows hold 1..{MAX_SLOTS} block slots, got {slots}")
    crow, col = tensors["crow_indices"], tensors["col_indices"]
    try:
        version = (crow._version, col._version)
    except RuntimeError:  # inference tensors have no version counter
        version = None
    key = (id(crow), id(col), slots)
    hit = _TABLES.get(key)
    if hit is not None and hit[0]() is crow and hit[1]() is col and hit[2] == version and version is not None:
        return hit[3]
    NB = crow.numel() - 1
    KB = params["in_features"] // params["block_cols"]
    NW = -(-KB // slots)
    dev = crow.device
    counts = (crow[1:] - crow[:-1]).to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(NB, device=dev), counts, output_size=int(params["nnz_blocks"]))
    c = col.to(torch.int64)
    win, slot = c // slots, c % slots
    flat = rows * NW + win  # [B] (row, window) cell of each stored block
    n_in = torch.zeros(NB * NW, dtype=torch.int64, device=dev).index_add_(0, flat, torch.ones_like(flat))
    bits = torch.zeros(NB * NW, dtype=torch.int64, device=dev).index_add_(0, flat, 1 << slot)  # distinct slots
    n_in = n_in.view(NB, NW)
    before = torch.cumsum(n_in, 1) - n_in  # [NB, NW] blocks of the row in earlier windows
    table = ((before << 16) | bits.view(NB, NW)).to(torch.int32).t().contiguous()  # [NW, NB]
    capturing = crow.is_cuda and torch.cuda.is_current_stream_capturing()
    if version is not None and not capturing:
        def drop(ref, key=key):
            if key in _TABLES:
                del _TABLES[key]

        _TABLES[key] = (weakref.ref(crow, drop), weakref.ref(col, drop), version, table)
    return table


def configs(M: int, params: dict, sms: int = 132) -> list[dict]:
    """Thin-kernel launch candidates (`thin` True): block_m (x rows), block_n (output rows), kt (window columns),
    chunk (windows per program; 0: all of K), warps, stages.

    Triton 3.6 pipelines the window loop with one buffer (a step's values and x in flight per program; TTGIR read
    offline), and whole-K tiles make only N / block_n programs (128 at 8192 rows and 64-row tiles, one per SM):
    so most candidates split K, for several programs per SM (`per_sm`), each with its own step in flight."""
    C, K, N = params["block_cols"], params["in_features"], params["out_features"]
    bm = min(128, max(16, 1 << max(0, (M - 1).bit_length())))
    # (block_m, block_n, kt, warps, stages, programs per SM (0: whole K), unroll of the split sums)
    # First H100 call (s50/s80-b1x16, 8192x8192): best M = 16 tile 128 rows x 64 columns, 8 per SM (57 /
    # 40 us; 64-row tiles 67-77 us, whole K 126-134 us); best M = 128 tile 128 x 64 rows, 4 per SM (116 us).
    # Second call: wider windows (128/256 columns) and 8 warps were slower (60-96 us at M = 16), so is splitting
    # more finely (82.7 us at 16 per SM): the last split of a tile sums the others one dependent L2 load after the
    # other; `unroll` 4 issues four of those loads together (`bsr._split_epilogue`): third call, s50 58.1 -> 52.9
    # us, s80 40.0 -> 41.2 us (8192x8192, M = 16)
    if bm <= 16:
        tiles = ((bm, 128, 64, 4, 3, 8, 4), (bm, 128, 64, 4, 3, 8, 1), (bm, 128, 128, 4, 3, 8, 1),
                 (bm, 128, 64, 4, 3, 16, 4), (bm, 128, 128, 4, 3, 16, 4), (bm, 256, 64, 8, 3, 8, 1),
                 (bm, 64, 64, 4, 3, 16, 4), (bm, 64, 128, 4, 3, 8, 1), (bm, 64, 64, 4, 3, 8, 1))
    else:
        tiles = ((bm, 64, 64, 4, 3, 4, 1), (bm, 64, 128, 4, 3, 4, 1), (bm, 64, 64, 4, 3, 8, 4),
                 (bm, 64, 128, 4, 3, 8, 4), (bm, 128, 64, 8, 3, 4, 1), (min(bm, 64), 128, 64, 4, 3, 8, 1),
                 (bm, 64, 64, 8, 3, 4, 1))
    out = []
    for bmt, bn, kt, warps, stages, per_sm, unroll in tiles:
        if C < 8:  # Triton 3.6 fails to compile 64/128-row x tiles with 4-column blocks (checked offline)
            bmt = 16
        slots = kt // C
        if not 1 <= slots <= MAX_SLOTS:
            kt = C * min(MAX_SLOTS, max(1, 64 // C))  # the nearest window that fits the slot bits
            slots = kt // C
        if kt < 16:
            continue
        nw = -(-(K // C) // slots)
        tiles_n = -(-N // bn) * -(-M // bmt)
        parts = min(nw, max(1, round(per_sm * sms / tiles_n))) if per_sm else 1
        chunk = -(-nw // parts) if parts > 1 else 0
        c = dict(thin=True, block_m=bmt, block_n=bn, kt=kt, chunk=chunk, num_warps=warps, num_stages=stages)
        if chunk and unroll > 1:
            c["unroll"] = unroll
        if c not in out:
            out.append(c)
    return out


if triton is not None:
    from .bsr import _split_epilogue, _split_range

    @triton.jit
    def _thin_tile(aux_ptr, v_ptr, base, brow, sub, n_ok, i, NB, R: tl.constexpr, C: tl.constexpr,
                   S: tl.constexpr, BLOCK_N: tl.constexpr, ASM: tl.constexpr):
        """The dense weight tile [BLOCK_N, S * C] of window i: stored blocks in their slots, zeros elsewhere."""
        a = tl.load(aux_ptr + i * NB + brow, mask=n_ok, other=0)  # [BN]
        start = base + (a >> 16)
        offs_s = tl.arange(0, S)
        bit = (a[:, None] >> offs_s[None, :]) & 1  # [BN, S]: slot s holds a stored block
        # rank[n, s]: stored blocks in slots below s, the population count of the bits under s (popc on the GPU;
        # a sum over S slots under the interpreter, which has no inline assembly)
        if ASM:
            under = a[:, None] & ((1 << offs_s[None, :]) - 1)
            rank = tl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [under], dtype=tl.int32, is_pure=True,
                                             pack=1)
        else:
            below = (offs_s[None, :] < offs_s[:, None]).to(tl.int32)  # [S (s), S (j)]: j < s
            rank = tl.sum(bit[:, None, :] * below[None, :, :], axis=2)  # [BN, S]
        blk = start[:, None] + rank
        offs_c = tl.arange(0, C)
        w = tl.load(v_ptr + (blk * (R * C) + (sub * C)[:, None])[:, :, None] + offs_c[None, None, :],
                    mask=(bit != 0)[:, :, None], other=0.0)  # [BN, S, C]
        return tl.reshape(w, (BLOCK_N, S * C))

    @triton.jit(do_not_specialize=["chunk", "n_split"])
    def _bsr_thin_kernel(x_ptr, crow_ptr, aux_ptr, v_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, NB, NW,
                         stride_xm, stride_om, chunk, n_split, R: tl.constexpr, C: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KT: tl.constexpr, HAS_BIAS: tl.constexpr,
                         FENCE: tl.constexpr, DOT_F32: tl.constexpr, ASM: tl.constexpr = False,
                         UNROLL: tl.constexpr = 1):
        # x [M, K], values [B, R, C], out [M, N]. Program (n, m, s) owns output rows BLOCK_N * n.., x rows
        # BLOCK_M * m.. and split s of the NW windows (`bsr._split_range` over windows, chunk per split).
        S: tl.constexpr = KT // C
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        brow = offs_n // R
        sub = offs_n - brow * R
        base = tl.load(crow_ptr + brow, mask=n_ok, other=0)  # [BN]
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        offs_k = tl.arange(0, KT)
        lo, hi, parts = _split_range(0, NW, tl.program_id(2), chunk, n_split)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in range(lo, hi):
            w = _thin_tile(aux_ptr, v_ptr, base, brow, sub, n_ok, i, NB, R, C, S, BLOCK_N, ASM)  # [BN, KT]
            k = i * KT + offs_k
            xk = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & (k < K)[None, :],
                         other=0.0)  # [BM, KT]
            if DOT_F32:  # the interpreter's bf16 dot
                acc += tl.dot(xk.to(tl.float32), tl.trans(w.to(tl.float32)))
            else:
                acc += tl.dot(xk, tl.trans(w.to(xk.dtype)))
        if tl.program_id(2) < parts:
            _split_epilogue(acc, offs_m, offs_n, M, N, out_ptr, stride_om, b_ptr, ws_ptr, cnt_ptr,
                            pid_n * tl.num_programs(1) + pid_m, tl.program_id(2), parts, HAS_BIAS, FENCE, UNROLL)


def launch(x2: torch.Tensor, tensors: dict, params: dict, bias, out: torch.Tensor, cfg: dict) -> None:
    """x2 [M, K] -> out [M, N] by the thin kernel (config from `configs`; `n_split` forces the split count)."""
    from . import bsr

    M = x2.shape[0]
    N, K, R, C = params["out_features"], params["in_features"], params["block_rows"], params["block_cols"]
    kt, bn, bm = cfg["kt"], cfg["block_n"], cfg["block_m"]
    if kt % C or not 1 <= kt // C <= MAX_SLOTS:
        raise ValueError(f"bsr thin window of {kt} columns must hold 1..{MAX_SLOTS} whole {C}-column blocks")
    if not ok(params, x2.dtype):
        raise ValueError("bsr thin launches take values in the model dtype, fp16/bf16 x, power-of-two blocks")
    table = window_table(tensors, params, kt // C)
    NB = N // R
    NW = table.shape[0]
    chunk = cfg.get("chunk") or NW
    n_split = 1 if chunk >= NW else max(1, min(cfg.get("n_split") or -(-NW // chunk), bsr.MAX_SPLITS))
    num_m = triton.cdiv(M, bm)
    tiles = triton.cdiv(N, bn) * num_m
    ws, cnt = bsr._split_workspace(x2.device, n_split * M * N if n_split > 1 else 0, tiles if n_split > 1 else 0)
    v = tensors["values"]
    interp = bsr._interpreting()
    _bsr_thin_kernel[(triton.cdiv(N, bn), num_m, n_split)](
        x2, tensors["crow_indices"], table, v, bias if bias is not None else v, out, ws, cnt, M, N, K, NB, NW,
        x2.stride(0), out.stride(0), chunk, n_split, R=R, C=C, BLOCK_M=bm, BLOCK_N=bn, KT=kt,
        HAS_BIAS=bias is not None, FENCE=not interp, DOT_F32=interp and x2.dtype == torch.bfloat16, ASM=not interp,
        UNROLL=cfg.get("unroll", 1),
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2))
