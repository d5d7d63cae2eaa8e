"""The M = 1 kernel of `bsr` for int4 values and fp16 activations: packed fp16x2 dequantization (as gwint's M = 1
path does it), the next step's loads issued by hand before this step's arithmetic.

Layout (see `bsr`): codes uint8 [B, R, C/2], byte j of a block row holds column j (low nibble) and column j + C/2
(high nibble). Here they are read as int32 words [B, R, NW] (NW = C / 8 words per block row, 8 codes each): word q
holds columns 4q..4q+3 (low nibbles of its bytes 0..3) and 4q+C/2..4q+C/2+3 (high nibbles).

Per word, two PRMTs put bytes (0, 1) and (2, 3) into the two 16-bit halves of a register, so that each half pair
lines up with a *natural* pair of fp16 activations (x[4q], x[4q+1]) / (x[4q+2], x[4q+3]): x needs no shuffling and
is loaded as it lies (int64 = four fp16). Then per half pair: one LOP3 ((a & 0x000F000F) | 0x64006400 is fp16
1024 + code in each half; 0x00F000F0 gives 1024 + 16 code for the high nibbles), one HSUB2 of 1032 (low) or one
HFMA2 by 1/16 minus 72 (high, exact: 64 + code - 72), one HFMA2 with the x pair, accumulated in fp16 over two words
(8 products per half, like gwint), then the two halves go to fp32 once and are scaled once per (block, row): 14
instructions per 8 weights for the arithmetic; with loads, addresses and masks the loop is 3.3-3.5 SASS instructions
per weight against 7.1 for the fp32 path of `_bsr_gemv_kernel` (Triton 3.6 for sm_90, read offline;
docs/results/blocksparse.md, third pass). Under TRITON_INTERPRET=1 (no inline assembly) the same
arithmetic runs as fp16 Triton ops (`_pkb_ref`).

A program owns BLOCK_R rows of one block row and NBLK of its stored blocks per step, as T = NBLK * BLOCK_R
(block, row) pairs, one per thread slot, each a whole row of NW words (16-byte loads for 32-column blocks).
Loop options: `prefetch` (the next step's loads by hand), `clamp` (no masked loads), `UNIFORM` (every block row
holds cnt blocks: no crow load). `_bsr_gemv_pk_ell_kernel`: the
same for equal block rows with the steps unrolled (cnt a constant). Which one runs: `launch` (config keys).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def ok(params: dict, dtype: torch.dtype) -> bool:
    """Whether the packed kernel takes this weight: int4 values, fp16 activations, one scale per (block, row)
    (the gwint scale layout: group_size a multiple of block_cols or >= in_features), 16-column multiples (code
    words in pairs)."""
    if triton is None or params.get("bits") != 4 or dtype != torch.float16:
        return False
    C, g = params["block_cols"], params["group_size"]
    return C % 16 == 0 and (g % C == 0 or g >= params["in_features"])


def _asm() -> str:
    """$0 f32 = dot of two code words ($1, $2) with their x: $3 / $4 the low / high columns of word 1 (int64, four
    fp16 each), $5 / $6 those of word 2."""
    lines = ["{", ".reg .b32 a01, a23, b, t, m, k0, k1, z1, s16, z16, x0, x1;", ".reg .b16 lo, hi;",
             ".reg .f32 f0, f1;", "mov.b32 m, 0x64006400;", "mov.b32 k0, 0x000F000F;", "mov.b32 k1, 0x00F000F0;",
             "mov.b32 z1, 0x64086408;",  # fp16 1032 = 1024 + 8 (the zero code), both halves
             "mov.b32 s16, 0x2C002C00;",  # fp16 1/16
             "mov.b32 z16, 0xD480D480;"]  # fp16 -72 = -(1024 / 16 + 8)
    first = True
    for w, xl, xh in ((1, 3, 4), (2, 5, 6)):
        lines += [f"prmt.b32 a01, ${w}, ${w}, 0x1100;",  # bytes 0, 1 in the halves' low bytes
                  f"prmt.b32 a23, ${w}, ${w}, 0x3322;",  # bytes 2, 3
                  f"mov.b64 {{x0, x1}}, ${xl};"]
        for a, x in (("a01", "x0"), ("a23", "x1")):
            lines += [f"lop3.b32 b, {a}, k0, m, 0xEA;", "sub.rn.f16x2 b, b, z1;",
                      f"mul.rn.f16x2 t, b, {x};" if first else f"fma.rn.f16x2 t, b, {x}, t;"]
            first = False
        lines.append(f"mov.b64 {{x0, x1}}, ${xh};")
        for a, x in (("a01", "x0"), ("a23", "x1")):
            lines += [f"lop3.b32 b, {a}, k1, m, 0xEA;", "fma.rn.f16x2 b, b, s16, z16;",
                      f"fma.rn.f16x2 t, b, {x}, t;"]
    lines += ["mov.b32 {lo, hi}, t;", "cvt.f32.f16 f0, lo;", "cvt.f32.f16 f1, hi;", "add.f32 $0, f0, f1;", "}"]
    return "\n".join(lines)


if triton is not None:
    from .bsr import _row_tile, _split_epilogue, _split_range

    _PKB_ASM = tl.constexpr(_asm())

    @triton.jit
    def _h16(v, shift: tl.constexpr):
        """fp16 whose bits are (v >> shift) & 0xFFFF (v int32 or int64)."""
        return ((v >> shift) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)

    @triton.jit
    def _pkb_word_ref(t, w, xl, xh, h: tl.constexpr):
        """Half h of one word's packed products (`_PKB_ASM`) in fp16 Triton ops, added to t (fp16)."""
        for k in tl.static_range(2):  # the PRMT pairs: bytes (0, 1), then (2, 3); half h takes byte 2k + h
            byte = (w >> (8 * (2 * k + h))) & 0xFF
            lo = _h16(byte & 0xF | 0x6400, 0) - 1032.0
            hi = _h16(byte & 0xF0 | 0x6400, 0) * 0.0625 - 72.0
            t += lo * _h16(xl, 32 * k + 16 * h) + hi * _h16(xh, 32 * k + 16 * h)
        return t

    @triton.jit
    def _pkb_ref(w0, w1, xl0, xh0, xl1, xh1):
        r = tl.zeros(w0.shape, dtype=tl.float32)
        for h in tl.static_range(2):
            t = tl.zeros(w0.shape, dtype=tl.float16)
            t = _pkb_word_ref(t, w0, xl0, xh0, h)
            t = _pkb_word_ref(t, w1, xl1, xh1, h)
            r += t.to(tl.float32)
        return r

    @triton.jit
    def _pkb_dot(w0, w1, xl0, xh0, xl1, xh1, ASM: tl.constexpr):
        """fp32 [T]: two code words per slot times their x (see `_asm`)."""
        if ASM:
            r = tl.inline_asm_elementwise(_PKB_ASM, "=r,r,r,l,l,l,l", [w0, w1, xl0, xh0, xl1, xh1],
                                          dtype=tl.float32, is_pure=True, pack=1)
        else:
            r = _pkb_ref(w0, w1, xl0, xh0, xl1, xh1)
        return r

    @triton.jit
    def _opaque(v, ASM: tl.constexpr):
        """v, hidden from Triton's contiguity analysis (on the GPU): a [T] load of scales whose addresses run
        along T would otherwise get a vectorized layout of its own and a shared-memory conversion per step."""
        if ASM:
            v = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [v], dtype=tl.int32, is_pure=True, pack=1)
        return v

    @triton.jit
    def _scale_offset(cb, srow, N, GPB: tl.constexpr, UNSIGNED: tl.constexpr = True):
        """[T] offsets of the slots' scales in [ceil(K / g), N], g = GPB blocks (GPB 0: one group), srow the row
        of the matrix. UNSIGNED: the group as an unsigned division (a shift for power-of-two GPB: column indexes
        are >= 0) rather than the masked loop's signed one."""
        if GPB == 0:
            grp = cb * 0
        elif UNSIGNED:
            grp = (cb.to(tl.uint32) // GPB).to(tl.int32)
        else:
            grp = cb // GPB
        return grp * N + srow

    @triton.jit
    def _pkb_loads(v_ptr, x_ptr, s_ptr, cb, blk, valid, rr, srow, N, R: tl.constexpr, C: tl.constexpr,
                   NW: tl.constexpr, GPB: tl.constexpr, VOL: tl.constexpr = False):
        """One step's operands for the T slots, each row as P = NW / 2 word pairs, all of a row in one thread:
        codes int32 [T, P, 2] (8-byte loads), x int64 [T, P, 2] (16-byte loads) of the low columns (x word
        (p, i): columns 4 (2p + i) .. +3 of the block) and of the high ones (the same + C/2), scales fp32 [T].
        cb [T]: the blocks' column indexes (loaded a step earlier by the caller)."""
        P: tl.constexpr = NW // 2
        qq = (2 * tl.arange(0, P))[None, :, None] + tl.arange(0, 2)[None, None, :]  # [1, P, 2]: word in the row
        m3 = valid[:, None, None]
        w = tl.load(v_ptr + (blk * (R * NW) + rr * NW)[:, None, None] + qq, mask=m3, other=0, volatile=VOL)
        xb = (cb * (C // 4))[:, None, None] + qq  # int64 index of the word's four low columns
        xl = tl.load(x_ptr + xb, mask=m3, other=0)
        xh = tl.load(x_ptr + xb + C // 8, mask=m3, other=0)
        sc = tl.load(s_ptr + _scale_offset(cb, srow, N, GPB, False), mask=valid, other=0.0)
        return w, xl, xh, sc.to(tl.float32)

    @triton.jit
    def _pkb_step(acc, w, xl, xh, sc, ASM: tl.constexpr):
        """acc [T] += scale x the dot of the slot's row of words with its x."""
        wa, wb = tl.split(w)  # words 2p, 2p + 1: [T, P]
        xla, xlb = tl.split(xl)
        xha, xhb = tl.split(xh)
        return acc + tl.sum(_pkb_dot(wa, wb, xla, xha, xlb, xhb, ASM), axis=1) * sc

    @triton.jit
    def _pkb_clamped_dot(col_ptr, v_ptr, x_ptr, s_ptr, blk, rr, srow, N, R: tl.constexpr, C: tl.constexpr,
                         GPB: tl.constexpr, ASM: tl.constexpr):
        """[T] scale x the dot of each slot's row of block `blk` [T] with its x, all loads unmasked: the callers
        clamp `blk` to a stored block and drop the clamped slots' results. The unmasked twin of `_pkb_loads` +
        `_pkb_step`, shared by the crow kernel's `CLAMP` loop and the equal-rows kernel."""
        NW: tl.constexpr = C // 8
        P: tl.constexpr = NW // 2
        qq = (2 * tl.arange(0, P))[None, :, None] + tl.arange(0, 2)[None, None, :]  # [1, P, 2]: word in the row
        cb = tl.load(col_ptr + blk)
        w = tl.load(v_ptr + (blk * (R * NW) + rr * NW)[:, None, None] + qq)  # int32 [T, P, 2]
        xb = (cb * (C // 4))[:, None, None] + qq  # int64 index of the word's four low columns
        # (ptxas schedules the scale loads after most of the arithmetic whatever their form: volatile, or
        # per-block scales without the column index: the seventh pass)
        sc = tl.load(s_ptr + _scale_offset(cb, srow, N, GPB)).to(tl.float32)
        xl = tl.load(x_ptr + xb)
        xh = tl.load(x_ptr + xb + C // 8)
        wa, wb = tl.split(w)
        xla, xlb = tl.split(xl)
        xha, xhb = tl.split(xh)
        return tl.sum(_pkb_dot(wa, wb, xla, xha, xlb, xhb, ASM), axis=1) * sc

    @triton.jit(do_not_specialize=["chunk", "n_split"])
    def _bsr_gemv_pk_kernel(x_ptr, crow_ptr, col_ptr, v_ptr, s_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, N, chunk,
                            n_split, R: tl.constexpr, C: tl.constexpr, BLOCK_R: tl.constexpr,
                            NBLK: tl.constexpr, GPB: tl.constexpr, HAS_BIAS: tl.constexpr,
                            FENCE: tl.constexpr, PREFETCH: tl.constexpr, ASM: tl.constexpr, order_ptr=None,
                            ORDER: tl.constexpr = False, VOL: tl.constexpr = False, CLAMP: tl.constexpr = False,
                            cnt=0, UNIFORM: tl.constexpr = False):
        # x_ptr: x [K] as int64 (four fp16 each); v_ptr: codes as int32 words [B, R, NW]; out [N]. Program (pid, s)
        # owns BLOCK_R rows of one block row and split s of its stored blocks (`bsr._split_range`); slot
        # t = j * BLOCK_R + i of a step is block j of the step, row i.
        NW: tl.constexpr = C // 8
        T: tl.constexpr = NBLK * BLOCK_R
        pid = _row_tile(order_ptr, ORDER)
        row0 = pid * BLOCK_R
        brow = row0 // R
        sub = row0 - brow * R
        if UNIFORM:  # every block row holds cnt blocks (crow[r] = r * cnt): no crow load ahead of everything
            start = brow * cnt
            end = start + cnt
        else:
            start = tl.load(crow_ptr + brow)
            end = tl.load(crow_ptr + brow + 1)
        lo, hi, parts = _split_range(start, end, tl.program_id(1), chunk, n_split)
        slot = tl.arange(0, T)
        jb = slot // BLOCK_R
        tt = slot % BLOCK_R
        rr = sub + tt
        srow = row0 + _opaque(tt, ASM)  # the scales' column in [G, N]
        acc = tl.zeros((T,), dtype=tl.float32)
        if PREFETCH:
            # step i+1's codes, x and scales are issued before step i's arithmetic, and step i+2's column indexes
            # (x and the scales depend on them: loaded a step ahead, their latency is not waited for in line).
            # ptxas sinks the next step's loads below this step's arithmetic (SASS read offline, Triton 3.6), which
            # undoes the prefetch; VOL makes the code loads volatile (LDG.STRONG.SYS, not cached in L1, which
            # streamed codes do not need), which ptxas keeps at the top of the loop
            blk = lo + jb
            cb = tl.load(col_ptr + blk, mask=blk < hi, other=0)
            cb1 = tl.load(col_ptr + blk + NBLK, mask=blk + NBLK < hi, other=0)
            w, xl, xh, sc = _pkb_loads(v_ptr, x_ptr, s_ptr, cb, blk, blk < hi, rr, srow, N, R, C, NW, GPB)
            for i in range(lo, hi, NBLK):
                blk1 = blk + NBLK
                cb2 = tl.load(col_ptr + blk1 + NBLK, mask=blk1 + NBLK < hi, other=0)
                w1, xl1, xh1, sc1 = _pkb_loads(v_ptr, x_ptr, s_ptr, cb1, blk1, blk1 < hi, rr, srow, N, R, C, NW,
                                               GPB, VOL)
                acc = _pkb_step(acc, w, xl, xh, sc, ASM)
                w, xl, xh, sc, blk, cb1 = w1, xl1, xh1, sc1, blk1, cb2
        elif CLAMP:
            # no masked loads: slots past the row's end read its last block again (L1/L2 hits) and add nothing
            # (a select on the dot): the predicated loads' zero-fill (CS2R per register) and predicates go away
            # (SASS, Triton 3.6: the loop is instruction-heavy, ~3.3 per weight, and every SM runs ~8 programs)
            for i in range(lo, hi, NBLK):
                blk = i + jb
                d = _pkb_clamped_dot(col_ptr, v_ptr, x_ptr, s_ptr, tl.minimum(blk, hi - 1), rr, srow, N, R, C, GPB,
                                     ASM)
                acc += tl.where(blk < hi, d, 0.0)
        else:
            for i in range(lo, hi, NBLK):
                blk = i + jb
                cb = tl.load(col_ptr + blk, mask=blk < hi, other=0)
                w, xl, xh, sc = _pkb_loads(v_ptr, x_ptr, s_ptr, cb, blk, blk < hi, rr, srow, N, R, C, NW, GPB)
                acc = _pkb_step(acc, w, xl, xh, sc, ASM)
        res = tl.sum(tl.reshape(acc, (NBLK, BLOCK_R)), axis=0)  # [BLOCK_R]
        if tl.program_id(1) < parts:
            _split_epilogue(res[None, :], tl.arange(0, 1), row0 + tl.arange(0, BLOCK_R), 1, N, out_ptr, N, b_ptr,
                            ws_ptr, cnt_ptr, pid, tl.program_id(1), parts, HAS_BIAS, FENCE)


    @triton.jit
    def _bsr_gemv_pk_ell_kernel(x_ptr, col_ptr, v_ptr, s_ptr, b_ptr, out_ptr, N, R: tl.constexpr, C: tl.constexpr,
                                BLOCK_R: tl.constexpr, NBLK: tl.constexpr, CNT: tl.constexpr, GPB: tl.constexpr,
                                HAS_BIAS: tl.constexpr, ASM: tl.constexpr):
        # Every block row holds CNT stored blocks (row-balanced masks: crow[r] = r * CNT, never read), so a
        # program's blocks follow from its id: no crow load, and every step's column indexes and codes can be
        # issued at once (the steps are unrolled: STEPS is a constant), leaving only column index -> x / scale
        # as a dependent load. Program pid owns rows pid * BLOCK_R .. + BLOCK_R of one block row and all its
        # blocks; slot t = j * BLOCK_R + i as in `_bsr_gemv_pk_kernel`; the last step's slots past CNT re-read
        # block CNT - 1 (no masked loads, as `CLAMP`) and add nothing. No split-K: the rows are equal.
        T: tl.constexpr = NBLK * BLOCK_R
        STEPS: tl.constexpr = (CNT + NBLK - 1) // NBLK
        row0 = tl.program_id(0) * BLOCK_R
        brow = row0 // R
        slot = tl.arange(0, T)
        jb = slot // BLOCK_R
        tt = slot % BLOCK_R
        rr = row0 - brow * R + tt  # row inside the block
        srow = row0 + _opaque(tt, ASM)  # the scales' column in [G, N]
        base = brow * CNT
        acc = tl.zeros((T,), dtype=tl.float32)
        for st in tl.static_range(STEPS):
            j = st * NBLK + jb  # [T] block of the block row
            # the last step's slots past CNT re-read block CNT - 1 and are dropped below
            blk = base + tl.minimum(j, CNT - 1) if (st + 1) * NBLK > CNT else base + j
            d = _pkb_clamped_dot(col_ptr, v_ptr, x_ptr, s_ptr, blk, rr, srow, N, R, C, GPB, ASM)
            if (st + 1) * NBLK > CNT:
                d = tl.where(j < CNT, d, 0.0)
            acc += d
        res = tl.sum(tl.reshape(acc, (NBLK, BLOCK_R)), axis=0)  # [BLOCK_R]
        offs = row0 + tl.arange(0, BLOCK_R)
        if HAS_BIAS:
            res += tl.load(b_ptr + offs).to(tl.float32)
        tl.store(out_ptr + offs, res.to(out_ptr.dtype.element_ty))


def launch(x2: torch.Tensor, tensors: dict, params: dict, bias, out: torch.Tensor, cfg: dict, ws, cnt, chunk: int,
           n_split: int, fence: bool, order: dict) -> bool:
    """Launch the packed kernel for x2 [1, K]; False (nothing launched) where x or the codes cannot be read as
    int64 / int32 words (a storage offset that is not a multiple of the word), so that the caller falls back.
    Where every block row holds the same number of blocks (`bsr.uniform_row_blocks`), `ell: "unrolled"` tiles run
    `_bsr_gemv_pk_ell_kernel` (whole rows, one split) and `ell: "loop"` tiles the crow kernel without its crow
    load (`UNIFORM`); elsewhere both run the crow kernel of the same tile ("unrolled": its `clamp` form), so an
    `ell` config is correct for any weight. `maxnreg` (config) caps the unrolled kernel's registers (ptxas's
    .maxnreg): tiles that fit one wave only at <= 32 registers carry it (`bsr.configs`)."""
    try:
        xw = x2.view(torch.int64)
        vw = tensors["qvalues"].view(torch.int32)
    except RuntimeError:
        return False
    N, C, g = params["out_features"], params["block_cols"], params["group_size"]
    s = tensors["scales"]
    gpb = g // C if g < params["in_features"] else 0  # blocks per scale group (0: one group per row)
    from .bsr import uniform_row_blocks

    ell = cfg.get("ell")
    cnt_ell = uniform_row_blocks(tensors["crow_indices"]) if ell else None
    if cnt_ell is not None and ell == "unrolled" and n_split == 1:  # equal rows: the crow-free unrolled kernel
        _bsr_gemv_pk_ell_kernel[(N // cfg["block_r"],)](
            xw, tensors["col_indices"], vw, s, bias if bias is not None else s, out, N, R=params["block_rows"], C=C,
            BLOCK_R=cfg["block_r"], NBLK=cfg["nblk"], CNT=cnt_ell, GPB=gpb, HAS_BIAS=bias is not None, ASM=fence,
            **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") and fence else {}),
            num_warps=cfg.get("num_warps", 4),
            num_stages=1)
        return True
    _bsr_gemv_pk_kernel[(N // cfg["block_r"], n_split)](
        xw, tensors["crow_indices"], tensors["col_indices"], vw, s, bias if bias is not None else s, out, ws, cnt,
        N, chunk, n_split, R=params["block_rows"], C=C, BLOCK_R=cfg["block_r"], NBLK=cfg["nblk"],
        GPB=gpb,
        HAS_BIAS=bias is not None, FENCE=fence, PREFETCH=bool(cfg.get("prefetch", True)), ASM=fence,
        VOL=bool(cfg.get("volatile")) and fence, CLAMP=bool(cfg.get("clamp") or ell == "unrolled"),
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 1), cnt=cnt_ell or 0,
        UNIFORM=cnt_ell is not None, **order)
    return True
