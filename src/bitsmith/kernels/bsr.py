"""Block-sparse weights (format `bsr`, version 1): BSR blocks, values in the model dtype or quantized (int8/int4).

Layout, for a Linear with weight W [N, K] (N = out_features, K = in_features) cut into blocks of R x C (R =
`block_rows` output rows, C = `block_cols` input columns; N % R == 0 and K % C == 0), NB = N / R block rows,
KB = K / C block columns, `nnz_blocks` = B stored blocks:

    crow_indices  int32 [NB + 1]        block row r holds the stored blocks crow[r] .. crow[r+1]-1 (crow[0] = 0,
                                        crow[NB] = B, non-decreasing); an empty block row has crow[r] == crow[r+1]
    col_indices   int32 [B]             block column (0 .. KB-1) of each stored block, strictly increasing within
                                        a block row
    values        fp16|bf16|fp32 [B, R, C]      (bits null) each block row-major: values[b, i, j] = W[r R + i, c C + j]
    qvalues       uint8 [B, R, C]               (bits 8) offset-binary codes: q = code - 128
                  uint8 [B, R, C / 2]           (bits 4) two codes per byte, "split halves": byte j of a block row
                                                holds column j in its low nibble and column j + C/2 in its high
                                                nibble; q = code - 8
    scales        fp16|bf16 [ceil(K / g), N]    (bits 4|8, g = `group_size` >= C) FineQuant/gwint group scales:
                                                W[n, k] = q * scales[k // g, n]; g is a multiple of C (or >= K),
                                                so a block never straddles two groups
                  fp16|bf16 [B, R, C / g]       (bits 4|8, g < C, g divides C) one scale per block row segment
                                                of g columns: values[b, i, j] = q * scales[b, i, j // g]

Blocks that are not stored are exactly zero. Dequantization is exact (scales times small integers). The quantized
values follow FineQuant's rules (symmetric, scale-only, offset-binary codes as in `gwint`): `from_gwint` converts a
gwint-packed weight whose pruned blocks are zero without changing a single dequantized value, as long as each gwint
group either spans whole blocks (g % C == 0, or one group per row) or tiles a block (C % g == 0). Scales of groups
whose blocks were all pruned are still stored in the first layout (they cost 16 / g bits per weight of the matrix).

Params in config.json: in_features, out_features, block_rows, block_cols, nnz_blocks, bits (null, 4 or 8),
group_size (null unless quantized).

Kernels (Triton, fp16/bf16 activations, CUDA; TRITON_INTERPRET=1 runs them on the CPU for tests). A program owns
BLOCK_R consecutive output rows inside one block row (so one crow range), BLOCK_M rows of x and a run of that block
row's stored blocks, NBLK blocks per step, accumulating in fp32:

    M == 1        `_bsr_gemv_kernel`: no tensor cores; [NBLK, BLOCK_R, CW] tiles times the gathered x segments,
                  reduced on CUDA cores (memory-bound: the stored blocks are read once).
    M >= 2        `_bsr_mm_kernel`: `tl.dot` of the gathered x tile [BLOCK_M, NBLK*CW] with the block tile^T when
                  the tiles are at least 16 on each side, else the same multiply-reduce as GEMV. Quantized blocks
                  are dequantized in registers (exponent trick, one LOP3 per code) before the dot.

    M >= 2, R < 16 `bsr_thin._bsr_thin_kernel` (values in the model dtype): BLOCK_N rows of several block rows
                  per program, each K window's stored blocks expanded to a dense tile in registers, `tl.dot` with
                  the dense x tile (launch config key `thin`; candidates ahead of the multiply-reduce path).

`prefetch` in the launch config (values in the model dtype only; num_stages 1): both loops issue the next step's
loads before this step's products, by hand: Triton 3.6 pipelines the mm loop with one buffer and the GEMV loop not
at all, so otherwise a program has one step's loads in flight. `packed` (M = 1, fp16 x, int4 codes): the fp16x2
kernel of `bsr_pk` (its `clamp` and `ell` (equal block rows) tiles: docs/formats/bsr.md). `order`:
programs take the row tiles longest block row first (`row_order`). The tuner times candidates like the benchmark
table (rotated weight copies, `_tune`).

Split-K (`chunk` > 0 in the launch config; offered to the tuner with BITSMITH_BSR_SPLIT=1): a block row's
stored blocks are spread over several programs; each stores its fp32 partial tile in a [splits, M, N] workspace
(plain stores, no atomics on data) and counts itself in; the last to count sums the others' partials and writes
the output (`_split_epilogue`; no host sync, CUDA-graph safe). Block rows no longer than a chunk skip all that.
Block shapes whose sides are not powers of two run the torch reference. On the CPU, `bitsmith.kernels.bsr_cpu`
(gather + batched matmul) is used. What was measured: docs/results/blocksparse.md; format notes: docs/formats/bsr.md.
"""

from __future__ import annotations

import math
import os
import weakref

import torch

from ..compress.formats import PackedFormat, register_format

FORMAT_NAME = "bsr"
FORMAT_VERSION = 1
VALUE_BITS = (None, 4, 8)

try:  # Triton is optional at import time (the torch reference and the CPU path work without it)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


# --------------------------------------------------------------------------------------------------------------
# layout helpers


def check_params(p: dict) -> str | None:
    """What is wrong with (untrusted) bsr params, or None."""
    def pos_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    for key in ("block_rows", "block_cols"):
        if not pos_int(p.get(key)):
            return f"bsr {key!r} must be a positive integer, got {p.get(key)!r}"
    N, K, R, C = p["out_features"], p["in_features"], p["block_rows"], p["block_cols"]
    if N % R or K % C:
        return f"bsr block {R}x{C} does not tile the {N}x{K} weight (out_features % rows, in_features % cols)"
    nnz = p.get("nnz_blocks")
    if not isinstance(nnz, int) or isinstance(nnz, bool) or not 0 <= nnz <= (N // R) * (K // C):
        return f"bsr 'nnz_blocks' must be an integer 0..{(N // R) * (K // C)}, got {nnz!r}"
    bits, g = p.get("bits"), p.get("group_size")
    if bits not in VALUE_BITS or isinstance(bits, bool):
        return f"bsr 'bits' must be null (values in the model dtype), 4 or 8, got {bits!r}"
    if bits is None:
        if g is not None:
            return "bsr 'group_size' is only allowed with quantized values (bits 4 or 8)"
    else:
        if not pos_int(g) or not (g % C == 0 or g >= K or C % g == 0):
            return (f"bsr 'group_size' must be a multiple of block_cols ({C}), at least in_features, or a divisor of"
                    f" block_cols, got {g!r}")
        if bits == 4 and C % 2:
            return f"bsr int4 needs an even block_cols (two codes per byte), got {C}"
    return None


def tensor_specs(params: dict, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of one module's packed tensors (used to build modules on the meta device)."""
    N, K, R, C = params["out_features"], params["in_features"], params["block_rows"], params["block_cols"]
    B, bits = params["nnz_blocks"], params.get("bits")
    specs = {"crow_indices": ((N // R + 1,), torch.int32), "col_indices": ((B,), torch.int32)}
    if bits is None:
        specs["values"] = ((B, R, C), dtype)
    else:
        specs["qvalues"] = ((B, R, C if bits == 8 else C // 2), torch.uint8)
        g = params["group_size"]
        specs["scales"] = ((math.ceil(K / g), N), dtype) if block_scales(params) is False else ((B, R, C // g), dtype)
    return specs


def block_scales(params: dict) -> bool:
    """Whether the scales are stored per block ([B, R, C/g], g < C) rather than per group ([ceil(K/g), N])."""
    g, C = params["group_size"], params["block_cols"]
    return g < C and g < params["in_features"]


def block_mask(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """bool [N / R, K / C]: which blocks of w [N, K] hold a nonzero."""
    R, C = block
    N, K = w.shape
    return (w.reshape(N // R, R, K // C, C) != 0).any(dim=3).any(dim=1)


def _index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mask [NB, KB] -> (crow int32 [NB+1], col int32 [B]) in row-major block order."""
    counts = mask.sum(dim=1)
    crow = torch.zeros(mask.shape[0] + 1, dtype=torch.int64, device=mask.device)
    crow[1:] = torch.cumsum(counts, 0)
    col = mask.nonzero()[:, 1]
    return crow.to(torch.int32), col.to(torch.int32)


def _blocks(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """w [N, K] -> [NB, KB, R, C] (a view-permute copy)."""
    R, C = block
    N, K = w.shape
    return w.reshape(N // R, R, K // C, C).permute(0, 2, 1, 3)


def pack(w: torch.Tensor, block: tuple[int, int], mask: torch.Tensor | None = None) -> tuple[dict, dict]:
    """Dense w [N, K] -> (params, tensors) with values in w's dtype. `mask` [NB, KB] defaults to the nonzero blocks;
    blocks outside the mask are dropped (they are taken to be zero)."""
    R, C = block
    N, K = w.shape
    if N % R or K % C:
        raise ValueError(f"block {R}x{C} does not tile a {N}x{K} weight")
    if mask is None:
        mask = block_mask(w, block)
    crow, col = _index(mask)
    values = _blocks(w, block)[mask].contiguous()  # [B, R, C], row-major block order
    params = {"in_features": K, "out_features": N, "block_rows": R, "block_cols": C,
              "nnz_blocks": int(values.shape[0]), "bits": None, "group_size": None}
    return params, {"crow_indices": crow, "col_indices": col, "values": values}


def pack_codes4(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [..., C] in 0..15 -> [..., C/2] bytes, column j low nibble, column j + C/2 high nibble."""
    half = codes.shape[-1] // 2
    return (codes[..., :half] | (codes[..., half:] << 4)).to(torch.uint8)


def unpack_codes4(packed: torch.Tensor) -> torch.Tensor:
    """[..., C/2] bytes -> codes uint8 [..., C]."""
    return torch.cat([packed & 0xF, packed >> 4], dim=-1)


def from_gwint(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int,
               in_features: int, block: tuple[int, int], mask: torch.Tensor | None = None) -> tuple[dict, dict]:
    """A gwint-packed weight (symmetric, bits 4 or 8) -> bsr (params, tensors) with the same dequantized values.

    `mask` [NB, KB] defaults to the blocks whose codes are not all the zero code; the dropped blocks must
    dequantize to zero (they do when the weight was pruned before quantizing: symmetric codes keep zero exact).
    """
    from . import gwint

    if zeros is not None:
        raise ValueError("bsr stores symmetric (scale-only) codes: asymmetric gwint weights have no exact zero")
    if bits not in (4, 8):
        raise ValueError(f"bsr quantized values are int4 or int8, got {bits}-bit gwint")
    R, C = block
    K = in_features
    N = qweight.shape[1]
    if N % R or K % C:
        raise ValueError(f"block {R}x{C} does not tile a {N}x{K} weight")
    if not (group_size % C == 0 or group_size >= K or C % group_size == 0):
        raise ValueError(f"gwint group size {group_size} and block width {C} do not nest (one must divide the other)")
    if bits == 4 and C % 2:
        raise ValueError(f"int4 bsr needs an even block width, got {C}")
    codes = gwint.unpack_codes(qweight, bits, K)  # [N, K]
    zero_code = 1 << (bits - 1)
    if mask is None:
        mask = block_mask(codes.to(torch.int16) - zero_code, block)
    crow, col = _index(mask)
    blocks = _blocks(codes, block)[mask]  # [B, R, C] codes
    params = {"in_features": K, "out_features": N, "block_rows": R, "block_cols": C,
              "nnz_blocks": int(blocks.shape[0]), "bits": bits, "group_size": group_size}
    if block_scales(params):  # g < C: the scales of each block row segment, taken per stored block
        seg_cols = torch.arange(0, K, group_size, device=qweight.device)  # [K / g]
        s_full = scales.t()[:, seg_cols // group_size]  # [N, K / g]
        s_out = s_full.reshape(N // R, R, K // C, C // group_size).permute(0, 2, 1, 3)[mask].contiguous()
    else:  # g >= C: the group scales as they are
        s_out = scales.contiguous()
    qv = blocks if bits == 8 else pack_codes4(blocks)
    return params, {"crow_indices": crow, "col_indices": col, "qvalues": qv.contiguous(), "scales": s_out}


def block_values(tensors: dict, params: dict, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The stored blocks, dequantized: [B, R, C] in `dtype` (default: the values' / scales' dtype)."""
    bits = params.get("bits")
    if bits is None:
        v = tensors["values"]
        return v if dtype is None else v.to(dtype)
    q = tensors["qvalues"]
    codes = q if bits == 8 else unpack_codes4(q)
    g, R, C = params["group_size"], params["block_rows"], params["block_cols"]
    s = tensors["scales"]
    if block_scales(params):
        per = s.to(torch.float32).repeat_interleave(g, dim=-1)  # [B, R, C]
    else:  # scales[k0 // g, rows of the block] for every stored block
        crow = tensors["crow_indices"].to(torch.int64)
        rows = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=s.device), crow[1:] - crow[:-1])
        grp = tensors["col_indices"].to(torch.int64) * C // g  # [B]
        n_idx = rows[:, None] * R + torch.arange(R, device=s.device)[None, :]  # [B, R]
        per = s.to(torch.float32)[grp[:, None], n_idx][:, :, None]  # [B, R, 1]
    w = (codes.to(torch.float32) - (1 << (bits - 1))) * per
    return w.to(dtype or s.dtype)


def dequantize(tensors: dict, params: dict, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The exact dense weight [N, K]."""
    N, K, R, C = params["out_features"], params["in_features"], params["block_rows"], params["block_cols"]
    v = block_values(tensors, params, dtype)
    crow = tensors["crow_indices"].to(torch.int64)
    col = tensors["col_indices"].to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(N // R, device=v.device), crow[1:] - crow[:-1])
    out = torch.zeros(N // R, K // C, R, C, dtype=v.dtype, device=v.device)
    out[rows, col] = v
    return out.permute(0, 2, 1, 3).reshape(N, K)


def linear_reference(x: torch.Tensor, tensors: dict, params: dict, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) -> [..., N] through the exact dense weight."""
    return torch.nn.functional.linear(x, dequantize(tensors, params, x.dtype), bias)


def use_triton(x: torch.Tensor) -> bool:
    from .gwint import use_triton as _use

    return triton is not None and _use(x)


def linear(x: torch.Tensor, tensors: dict, params: dict, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The op packed modules call: Triton on CUDA, the gather path on CPU, the torch reference elsewhere."""
    R, C = params["block_rows"], params["block_cols"]
    if use_triton(x) and _pow2(R) and _pow2(C):
        return triton_linear(x, tensors, params, bias)
    if x.device.type == "cpu":
        from . import bsr_cpu

        return bsr_cpu.linear(x, tensors, params, bias)
    return linear_reference(x, tensors, params, bias)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# --------------------------------------------------------------------------------------------------------------
# Triton kernels

MAGIC_F32 = 0x4B000000  # float32 2^23, passed at run time so that (code & mask) | magic is one LOP3


if triton is not None:
    from .gwint_triton import _num_sms, time_cold_us

    @triton.jit
    def _fenced(x, ON: tl.constexpr):
        """x, returned through a GPU-scope acq_rel fence in every thread holding it (ON False: the interpreter)."""
        if ON:
            x = tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.b32 $0, $1;", "=r,r", [x], dtype=tl.int32,
                                          is_pure=False, pack=1)
        return x

    @triton.jit
    def _split_epilogue(acc, offs_m, offs_n, M, N, out_ptr, stride_om, b_ptr, ws_ptr, cnt_ptr, tile_id, s, parts,
                        HAS_BIAS: tl.constexpr, FENCE: tl.constexpr, UNROLL: tl.constexpr = 1):
        """acc fp32 [BM, BN] of split s -> out (+ bias). With parts > 1 the splits meet without atomics on data:
        split s stores its partial tile at ws[s] (ws: fp32 [n_split, M, N]; plain stores, so a layout that
        holds an element in several threads only writes it twice), every thread fences once (GPU scope; the
        result is the counter's address, so the count cannot move above it), a CTA barrier, then one acq_rel
        count per program; the split that counts last fences once per thread, adds the other splits' partials
        to its own tile (L2 reads), writes the output and puts the counter back to zero. Partials are never
        zeroed: only ws[0 .. parts-1] of a tile is read, after every one of them was stored.

        Why this form (H100, 2026-11-24): the atomic-add epilogue of the first split-K version gave wrong sums
        with 64/128-row x tiles unless every thread fenced after its adds; that fence, applied to an [BN] offset
        tensor, became one MEMBAR per element a thread held (~20 per thread) and made every split slower than
        whole rows; atomic adds on the thin path's 16 x 4 tiles (fewer elements than threads) were wrong too,
        likely elements held by several threads added more than once. Stores make both questions moot.

        UNROLL > 1 (bsr_thin): the last split loads four partials per iteration, their loads issued together
        (SASS: 16 LDG then the FADDs), where the plain loop issues one partial's loads and waits for its adds
        (many splits: a tail of about one L2 latency per split)."""
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        last = parts == 1
        if parts > 1:
            ws_tile = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
            MN = M * N
            tl.store(ws_tile + s * MN, acc, mask=mask)
            # one fence per thread (a scalar), after its stores; its result is the counter's address
            tid = _fenced(tile_id, FENCE)
            tl.debug_barrier()
            prev = tl.atomic_add(cnt_ptr + tid, 1, sem="acq_rel", scope="gpu")
            last = prev == parts - 1
            if last:
                if FENCE:  # & true, for this thread's loads to follow one fence
                    mask = mask & (_fenced(tile_id, FENCE) == tile_id)
                tot = tl.zeros_like(acc)  # summed in the loads' layout, moved to acc's once
                if UNROLL == 1:
                    for j in range(0, parts):
                        if j != s:
                            tot += tl.load(ws_tile + j * MN, mask=mask, other=0.0, cache_modifier=".cg")
                else:  # four partials per iteration: four independent loads, then their sum
                    z = tl.zeros_like(offs_m)[:, None]  # scalar conditions as [BM, 1] tensors (the interpreter)
                    for j in range(0, parts, 4):
                        p0 = tl.load(ws_tile + j * MN, mask=mask & (z + j != s), other=0.0, cache_modifier=".cg")
                        p1 = tl.load(ws_tile + (j + 1) * MN, mask=mask & (z + j + 1 < parts) & (z + j + 1 != s),
                                     other=0.0, cache_modifier=".cg")
                        p2 = tl.load(ws_tile + (j + 2) * MN, mask=mask & (z + j + 2 < parts) & (z + j + 2 != s),
                                     other=0.0, cache_modifier=".cg")
                        p3 = tl.load(ws_tile + (j + 3) * MN, mask=mask & (z + j + 3 < parts) & (z + j + 3 != s),
                                     other=0.0, cache_modifier=".cg")
                        tot += (p0 + p1) + (p2 + p3)
                acc += tot
                tl.atomic_xchg(cnt_ptr + tile_id, 0)
        if last:
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _row_tile(order_ptr, ORDER: tl.constexpr):
        """The row tile this program owns: program_id(0), or (ORDER) its entry of the longest-first order."""
        if ORDER:
            r = tl.load(order_ptr + tl.program_id(0))
        else:
            r = tl.program_id(0)
        return r

    @triton.jit
    def _lop_f32(codes, mask: tl.constexpr, magic, zero: tl.constexpr):
        """(codes & mask) | magic read as float32 is 2^23 + the masked field (at its bit position); minus
        (2^23 + zero) it is exact: field - zero. No shift and no int->float conversion (a quarter-rate op)."""
        return ((codes & mask) | magic).to(tl.float32, bitcast=True) - (8388608.0 + zero)

    @triton.jit
    def _split_range(start, end, s, chunk, n_split):
        """Split s of a block row's stored blocks [start, end) -> (lo, hi, parts).

        Splits take `chunk` blocks each and the last split that holds work takes everything left, so every n_split
        is correct (a small one only costs balance); parts (>= 1, so that an empty block row is still written) is
        how many splits hold work; splits s >= parts get an empty range and write nothing."""
        parts = tl.minimum(n_split, tl.maximum(1, tl.cdiv(end - start, chunk)))
        lo = start + s * chunk
        hi = tl.where(s == parts - 1, end, tl.minimum(end, lo + chunk))
        hi = tl.where(s < parts, hi, lo)
        return lo, hi, parts

    @triton.jit
    def _gemv_values(v_ptr, blk, valid, sub, offs_r, offs_c, R: tl.constexpr, CW: tl.constexpr,
                     JMAJOR: tl.constexpr):
        """Values/codes [NBLK, BR, CW] of blocks blk (JMAJOR: threads walk each block's contiguous BR x CW values,
        else one row of NBLK blocks at a time)."""
        if JMAJOR:
            v = tl.load(v_ptr + blk[:, None, None] * (R * CW) + (sub + offs_r)[None, :, None] * CW
                        + offs_c[None, None, :], mask=valid[:, None, None], other=0)
        else:
            v = tl.permute(tl.load(v_ptr + blk[None, :, None] * (R * CW) + (sub + offs_r)[:, None, None] * CW
                                   + offs_c[None, None, :], mask=valid[None, :, None], other=0), (1, 0, 2))
        return v

    @triton.jit(do_not_specialize=["chunk", "n_split"])
    def _bsr_gemv_kernel(x_ptr, crow_ptr, col_ptr, v_ptr, s_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, N, group_size,
                         chunk, n_split, magic,
                         R: tl.constexpr, C: tl.constexpr, CW: tl.constexpr, BLOCK_R: tl.constexpr,
                         NBLK: tl.constexpr, BITS: tl.constexpr, GB: tl.constexpr, HAS_BIAS: tl.constexpr,
                         JMAJOR: tl.constexpr, FENCE: tl.constexpr, PREFETCH: tl.constexpr = False,
                         order_ptr=None, ORDER: tl.constexpr = False):
        # M == 1. x: [K]; values [B, R, CW]; out: [N]. Program (pid, s) owns BLOCK_R rows of one block row and
        # split s of its stored blocks; it reads NBLK blocks per step as one [NBLK, BLOCK_R, CW] tile (bytes in
        # flight; JMAJOR: loaded block index outermost, so that threads walk each block's BLOCK_R * CW contiguous
        # values, else row outermost) and accumulates in fp32 without reducing over blocks inside the loop; splits
        # of one row meet in the fp32 workspace (`_split_epilogue`). PREFETCH (model-dtype values): the next
        # step's loads are issued before this step's products. scales: GB == 0 -> [ceil(K / group_size), N];
        # GB >= 1 -> [B, R, GB]
        pid = _row_tile(order_ptr, ORDER)
        row0 = pid * BLOCK_R
        brow = row0 // R
        sub = row0 - brow * R
        lo, hi, parts = _split_range(tl.load(crow_ptr + brow), tl.load(crow_ptr + brow + 1), tl.program_id(1),
                                     chunk, n_split)
        offs_r = tl.arange(0, BLOCK_R)
        offs_j = tl.arange(0, NBLK)
        offs_c = tl.arange(0, CW)
        if BITS == 0:
            acc = tl.zeros((NBLK, BLOCK_R, CW), dtype=tl.float32)
        else:
            acc = tl.zeros((NBLK, BLOCK_R), dtype=tl.float32)
        if PREFETCH:  # values in the model dtype only: next step's loads issued before this step's products
            blk = lo + offs_j
            valid = blk < hi
            cb = tl.load(col_ptr + blk, mask=valid, other=0)
            v = _gemv_values(v_ptr, blk, valid, sub, offs_r, offs_c, R, CW, JMAJOR)
            xk = tl.load(x_ptr + (cb * C)[:, None] + offs_c[None, :], mask=valid[:, None], other=0.0)
            cb1 = tl.load(col_ptr + blk + NBLK, mask=blk + NBLK < hi, other=0)
            for i in range(lo, hi, NBLK):
                blk1 = blk + NBLK
                valid1 = blk1 < hi
                v1 = _gemv_values(v_ptr, blk1, valid1, sub, offs_r, offs_c, R, CW, JMAJOR)
                xk1 = tl.load(x_ptr + (cb1 * C)[:, None] + offs_c[None, :], mask=valid1[:, None], other=0.0)
                cb2 = tl.load(col_ptr + blk1 + NBLK, mask=blk1 + NBLK < hi, other=0)
                acc += v.to(tl.float32) * xk.to(tl.float32)[:, None, :]  # converted here, not at the load
                v, xk, blk, cb1 = v1, xk1, blk1, cb2
        else:
            for i in range(lo, hi, NBLK):
                blk = i + offs_j  # [NBLK]
                valid = blk < hi
                cb = tl.load(col_ptr + blk, mask=valid, other=0)
                v = _gemv_values(v_ptr, blk, valid, sub, offs_r, offs_c, R, CW, JMAJOR)  # [NBLK, BR, CW]
                xk = tl.load(x_ptr + (cb * C)[:, None] + offs_c[None, :], mask=valid[:, None],
                             other=0.0).to(tl.float32)  # [NBLK, CW]
                if BITS == 0:
                    acc += v.to(tl.float32) * xk[:, None, :]
                else:
                    ZERO: tl.constexpr = 1 << (BITS - 1)
                    vi = v.to(tl.int32)
                    if BITS == 8:
                        ql = _lop_f32(vi, 0xFF, magic, ZERO)
                    else:
                        # low nibble: column c; high nibble: column c + CW, read in place as 16 * (code - ZERO) (no
                        # shift); its x is divided by 16 instead (exact in fp32)
                        ql = _lop_f32(vi, 0xF, magic, ZERO)
                        qh = _lop_f32(vi, 0xF0, magic, 16 * ZERO)
                        xh = tl.load(x_ptr + (cb * C + CW)[:, None] + offs_c[None, :], mask=valid[:, None],
                                     other=0.0).to(tl.float32) * 0.0625
                    if GB <= 1:  # one scale per (block, row): reduce the exact codes over the block's columns first
                        prod = ql * xk[:, None, :]
                        if BITS == 4:
                            prod += qh * xh[:, None, :]
                        part = tl.sum(prod, axis=2)  # [NBLK, BR]
                        if GB == 0:
                            sc = tl.load(s_ptr + ((cb * C) // group_size)[:, None] * N + (row0 + offs_r)[None, :],
                                         mask=valid[:, None], other=0.0)
                        else:
                            sc = tl.load(s_ptr + blk[:, None] * R + (sub + offs_r)[None, :], mask=valid[:, None],
                                         other=0.0)
                        acc += part * sc.to(tl.float32)
                    else:
                        GS: tl.constexpr = C // GB
                        srow = (blk[:, None, None] * R + (sub + offs_r)[None, :, None]) * GB
                        sc = tl.load(s_ptr + srow + (offs_c // GS)[None, None, :], mask=valid[:, None, None], other=0.0)
                        prod = ql * sc.to(tl.float32) * xk[:, None, :]
                        if BITS == 4:
                            sh = tl.load(s_ptr + srow + ((CW + offs_c) // GS)[None, None, :], mask=valid[:, None, None],
                                         other=0.0)
                            prod += qh * sh.to(tl.float32) * xh[:, None, :]
                        acc += tl.sum(prod, axis=2)
        if BITS == 0:
            res = tl.sum(tl.sum(acc, axis=2), axis=0)
        else:
            res = tl.sum(acc, axis=0)
        if tl.program_id(1) < parts:
            _split_epilogue(res[None, :], tl.arange(0, 1), row0 + offs_r, 1, N, out_ptr, N, b_ptr, ws_ptr, cnt_ptr,
                            pid, tl.program_id(1), parts, HAS_BIAS, FENCE)

    @triton.jit
    def _dequant_tile(v, magic, s_ptr, N, group_size, cb, blk, valid, cc, row0, sub, offs_r, HIGH: tl.constexpr,
                      R: tl.constexpr, C: tl.constexpr, CW: tl.constexpr, BITS: tl.constexpr, GB: tl.constexpr):
        """Codes [BR, KK] of the (low or high half) columns cc of blocks blk -> float32 weights [BR, KK]."""
        ZERO: tl.constexpr = 1 << (BITS - 1)
        vi = v.to(tl.int32)
        if BITS == 8:
            q = _lop_f32(vi, 0xFF, magic, ZERO)
        elif HIGH:
            q = _lop_f32(vi >> 4, 0xF, magic, ZERO)
        else:
            q = _lop_f32(vi, 0xF, magic, ZERO)
        if GB == 0:
            sc = tl.load(s_ptr + ((cb * C) // group_size)[None, :] * N + (row0 + offs_r)[:, None],
                         mask=valid[None, :], other=0.0)
        else:
            GS: tl.constexpr = C // GB
            col = cc + CW if HIGH else cc
            sc = tl.load(s_ptr + (blk[None, :] * R + (sub + offs_r)[:, None]) * GB + (col // GS)[None, :],
                         mask=valid[None, :], other=0.0)
        return q * sc.to(tl.float32)

    @triton.jit
    def _mac(acc, xk, w, USE_DOT: tl.constexpr, DOT_F32: tl.constexpr):
        """acc [BM, BR] += xk [BM, KK] @ w [BR, KK]^T (fp32 accumulate)."""
        if USE_DOT:
            if DOT_F32:
                acc += tl.dot(xk.to(tl.float32), tl.trans(w.to(tl.float32)))
            else:
                acc += tl.dot(xk, tl.trans(w.to(xk.dtype)))
        else:
            acc += tl.sum(xk.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        return acc

    @triton.jit
    def _mm_loads(v_ptr, x_rows, m_mask, blk, valid, cb, cc, sub, offs_r, R: tl.constexpr, C: tl.constexpr,
                  CW: tl.constexpr, BITS: tl.constexpr):
        """One step's operands: w codes/values [BR, KK] of blocks blk, x [BM, KK] at their columns (and, int4,
        x [BM, KK] of the high-nibble columns; else x again)."""
        v = tl.load(v_ptr + blk[None, :] * (R * CW) + (sub + offs_r)[:, None] * CW + cc[None, :],
                    mask=valid[None, :], other=0)  # [BR, KK]
        xk = tl.load(x_rows + (cb * C + cc)[None, :], mask=m_mask[:, None] & valid[None, :], other=0.0)
        xh = xk
        if BITS == 4:
            xh = tl.load(x_rows + (cb * C + CW + cc)[None, :], mask=m_mask[:, None] & valid[None, :], other=0.0)
        return v, xk, xh

    @triton.jit
    def _mm_step(acc, v, xk, xh, magic, s_ptr, N, group_size, cb, blk, valid, cc, row0, sub, offs_r,
                 R: tl.constexpr, C: tl.constexpr, CW: tl.constexpr, BITS: tl.constexpr, GB: tl.constexpr,
                 USE_DOT: tl.constexpr, DOT_F32: tl.constexpr):
        """acc [BM, BR] += one step's x [BM, KK] @ w [BR, KK]^T (quantized w dequantized first)."""
        if BITS == 0:
            acc = _mac(acc, xk, v, USE_DOT, DOT_F32)
        else:
            w = _dequant_tile(v, magic, s_ptr, N, group_size, cb, blk, valid, cc, row0, sub, offs_r, False,
                              R, C, CW, BITS, GB)
            acc = _mac(acc, xk, w, USE_DOT, DOT_F32)
            if BITS == 4:
                wh = _dequant_tile(v, magic, s_ptr, N, group_size, cb, blk, valid, cc, row0, sub, offs_r, True,
                                   R, C, CW, BITS, GB)
                acc = _mac(acc, xh, wh, USE_DOT, DOT_F32)
        return acc

    @triton.jit(do_not_specialize=["chunk", "n_split"])
    def _bsr_mm_kernel(x_ptr, crow_ptr, col_ptr, v_ptr, s_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
                       M, N, group_size, stride_xm, stride_om, chunk, n_split, magic,
                       R: tl.constexpr, C: tl.constexpr, CW: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_M: tl.constexpr, NBLK: tl.constexpr, BITS: tl.constexpr, GB: tl.constexpr,
                       USE_DOT: tl.constexpr, DOT_F32: tl.constexpr, HAS_BIAS: tl.constexpr,
                       FENCE: tl.constexpr, PREFETCH: tl.constexpr = False, order_ptr=None,
                       ORDER: tl.constexpr = False):
        # x: [M, K], values [B, R, CW], out: [M, N]. Program (r, m, s) owns BLOCK_R rows of one block row,
        # BLOCK_M rows of x and split s of the block row's stored blocks; each step gathers NBLK stored blocks into
        # one K-tile of KK = NBLK * CW columns: w [BLOCK_R, KK] (contiguous rows of consecutive blocks) and
        # x [BLOCK_M, KK] (the blocks' x segments). Splits meet in the fp32 workspace (`_split_epilogue`).
        pid_r = _row_tile(order_ptr, ORDER)
        pid_m = tl.program_id(1)
        row0 = pid_r * BLOCK_R
        brow = row0 // R
        sub = row0 - brow * R
        lo, hi, parts = _split_range(tl.load(crow_ptr + brow), tl.load(crow_ptr + brow + 1), tl.program_id(2),
                                     chunk, n_split)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        offs_r = tl.arange(0, BLOCK_R)
        KK: tl.constexpr = NBLK * CW
        kk = tl.arange(0, KK)
        jj = kk // CW
        cc = kk % CW
        x_rows = x_ptr + offs_m[:, None] * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        if PREFETCH:
            # software pipelining by hand (Triton 3.6's pipeliner gives this loop one buffer, so each step waited
            # a full memory latency): step i+1's blocks and x segments and step i+2's column indexes are issued
            # before step i is multiplied; all in registers (launch with num_stages=1)
            blk = lo + jj
            valid = blk < hi
            cb = tl.load(col_ptr + blk, mask=valid, other=0)
            v, xk, xh = _mm_loads(v_ptr, x_rows, m_mask, blk, valid, cb, cc, sub, offs_r, R, C, CW, BITS)
            cb1 = tl.load(col_ptr + blk + NBLK, mask=blk + NBLK < hi, other=0)
            for i in range(lo, hi, NBLK):
                blk1 = blk + NBLK
                valid1 = blk1 < hi
                v1, xk1, xh1 = _mm_loads(v_ptr, x_rows, m_mask, blk1, valid1, cb1, cc, sub, offs_r, R, C, CW, BITS)
                cb2 = tl.load(col_ptr + blk1 + NBLK, mask=blk1 + NBLK < hi, other=0)
                acc = _mm_step(acc, v, xk, xh, magic, s_ptr, N, group_size, cb, blk, valid, cc, row0, sub, offs_r,
                               R, C, CW, BITS, GB, USE_DOT, DOT_F32)
                v, xk, xh, cb, blk, valid, cb1 = v1, xk1, xh1, cb1, blk1, valid1, cb2
        else:
            for i in range(lo, hi, NBLK):
                blk = i + jj  # [KK]
                valid = blk < hi
                cb = tl.load(col_ptr + blk, mask=valid, other=0)
                v, xk, xh = _mm_loads(v_ptr, x_rows, m_mask, blk, valid, cb, cc, sub, offs_r, R, C, CW, BITS)
                acc = _mm_step(acc, v, xk, xh, magic, s_ptr, N, group_size, cb, blk, valid, cc, row0, sub, offs_r,
                               R, C, CW, BITS, GB, USE_DOT, DOT_F32)
        if tl.program_id(2) < parts:
            _split_epilogue(acc, offs_m, row0 + offs_r, M, N, out_ptr, stride_om, b_ptr, ws_ptr, cnt_ptr,
                            pid_r * tl.num_programs(1) + pid_m, tl.program_id(2), parts, HAS_BIAS, FENCE)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cw(params: dict) -> int:
    C = params["block_cols"]
    return C // 2 if params.get("bits") == 4 else C


def _can_dot(params: dict, block_m: int, block_r: int, nblk: int) -> bool:
    return block_m >= 16 and block_r >= 16 and nblk * _cw(params) >= 16


def _chunks(params: dict, row_programs: int, nblk: int, sms: int, block_m: int) -> list[int]:
    """Split sizes (stored blocks per program, multiples of nblk) to try: 0 (whole block rows), about the mean block
    row (only the long rows are split: balance; rows no longer than a chunk skip the workspace), and for the GEMV
    and 16-row tiles the sizes that make about 4, 8 (GEMV: 16) programs per SM; for 64/128-row tiles, whose
    partials cost BLOCK_M x BLOCK_R fp32 each, only half the mean row (about two splits per row) besides."""
    R, C = params["block_rows"], params["block_cols"]
    NB, KB = params["out_features"] // R, params["in_features"] // C
    mean = max(1.0, params["nnz_blocks"] / NB)
    pers = [mean]
    if block_m <= 16:
        pers += [mean * row_programs / (w * sms) for w in ((4, 8, 16) if block_m == 1 else (4, 8))]
    else:
        pers.append(mean / 2)
    out = [0]
    top = KB  # no chunk over the mean row's
    for k, per in enumerate(pers):
        chunk = nblk * max(1, math.ceil(per / nblk) if k == 0 else round(per / nblk))
        if chunk < top and chunk not in out:
            out.append(chunk)
        if k == 0:
            top = min(top, chunk + 1)
    return out


def configs(M: int, params: dict, sms: int = 132, split: bool | None = None,
            dtype: torch.dtype = torch.float16, clamp: bool | None = None, ell: bool | None = None) -> list[dict]:
    """Launch candidates for an [M, K] input of `dtype`, the heuristic default first.

    nblk stored blocks are read per step, so that a step moves enough bytes (GEMV) or makes a K-tile big enough
    for the tensor cores (M >= 2) whatever the block width. `chunk` (0: whole block rows) splits each block row's
    stored blocks over several programs of `chunk` blocks (split-K), for the grid to fill the GPU and for long block
    rows not to set the time; split variants of the first tiles are offered with split=True or
    BITSMITH_BSR_SPLIT=1 only: correct on the H100 (stored partials) but never faster than whole rows by more than
    the cold-L2 tuner's noise, which once made it pick a split that ran 1.6 us slower (docs/results/blocksparse.md).
    """
    from . import bsr_pk, bsr_thin  # (import this module)

    N, R, bits = params["out_features"], params["block_rows"], params.get("bits")
    cw = _cw(params)
    elt = 1 if bits else 2  # bytes per stored code/value (int4: two codes per byte, counted per byte)
    out = []

    if split is None:
        split = os.environ.get("BITSMITH_BSR_SPLIT", "0") == "1"
    if clamp is None:  # the packed GEMV's `clamp` tiles (BITSMITH_BSR_CLAMP=0: without them)
        clamp = os.environ.get("BITSMITH_BSR_CLAMP", "1") == "1"
    if ell is None:  # the packed GEMV's tiles for equal block rows (BITSMITH_BSR_ELL=0: without them)
        ell = os.environ.get("BITSMITH_BSR_ELL", "1") == "1"

    def add(cfg, split_tile):
        split_tile = split_tile and split
        chunks = _chunks(params, (N // cfg["block_r"]) * -(-M // cfg["block_m"]), cfg["nblk"], sms,
                         cfg["block_m"]) if split_tile else [0]
        for ch in chunks:
            c = dict(cfg, chunk=ch)
            if c not in out:
                out.append(c)

    if M == 1 and bsr_pk.ok(params, dtype):
        # int4 codes, fp16 x: the packed fp16x2 kernel (`bsr_pk`), one or two (block, row) slots per thread,
        # the next step's loads in flight (prefetch) or not
        # (call 1 of the third pass: r8 n32 without prefetch best at 8192x8192, r16 n16 with it at 28672x8192);
        # n64: most block rows in one step; `order`: longest block rows first
        for k, (br, nblk, warps, pf, od) in enumerate((
                (8, 32, 4, False, False), (16, 16, 4, True, False), (8, 32, 4, True, False),
                (8, 16, 4, True, False), (16, 32, 8, True, False), (8, 64, 8, False, False),
                (4, 64, 4, False, False), (16, 32, 8, False, False), (8, 32, 4, False, True),
                (16, 16, 4, True, True), (8, 64, 8, False, True), (16, 16, 4, "vol", False),
                (8, 32, 4, "vol", False), (8, 16, 4, "vol", False), (16, 32, 8, "vol", False))):
            br = min(br, R)
            c = dict(block_m=1, block_r=br, nblk=nblk, num_warps=warps, num_stages=1, packed=True, prefetch=bool(pf))
            c = dict(c, volatile=True) if pf == "vol" else c
            add(dict(c, order=True) if od else c, k < 2)
        # `clamp` (bsr_pk): no masked loads, 32-48 registers (SASS read offline with Triton 3.6), so that
        # one-step rows (n64) and 2-warp programs also run in one wave. H100 (sixth pass): slower than the
        # masked tiles at 8192x8192, r16 n16 the fastest tile at 28672x8192 (13.8 us against 15.0)
        for br, nblk, warps in ((8, 32, 4), (16, 32, 8), (4, 64, 4), (8, 64, 4), (16, 64, 8), (16, 16, 4),
                                (8, 16, 4), (4, 32, 2)) if clamp else ():
            add(dict(block_m=1, block_r=min(br, R), nblk=nblk, num_warps=warps, num_stages=1, packed=True,
                     prefetch=False, clamp=True), False)
        # `ell` (bsr_pk.launch): where every block row holds the same number of blocks (row-balanced masks),
        # "loop" runs the tile without its crow load, "unrolled" the crow-free kernel with every step unrolled
        # (`_bsr_gemv_pk_ell_kernel`); on other weights both run the tile as before (unrolled: its clamp form)
        # (H100, sixth pass, s80-b32-w4-row: r16 n32 w8 unrolled the pick at 8192x8192, 5.6-5.7 us with r16 n64
        # w16 / r8 n64 w8 unrolled and r16 n32 w8 loop, against 6.0-6.1 for the crow tiles; r16 n16 w4 unrolled
        # at 28672x8192; seventh pass: r16 n32 w8 loop the pick, 5.47-5.52 us. Measured and dropped: the other
        # 32-row and 8-block-step tiles, n64 / 16-warp / clamp loop tiles, `pfcol` (column indexes only a step
        # ahead), `pfscale` (an L2 prefetch of the scales in the unrolled kernel), and in the seventh pass `bar`
        # (a barrier after each step's loads) and `pair` (two rows of a block per thread): docs/results/
        # blocksparse.md). maxnreg 32: the 512-thread tiles and r8 n64 w8 fit one wave at 8192 rows only with at
        # most 32 registers; ptxas gave them 36-37 after a neutral edit once (6.8-7.0 us instead of 5.7)
        for br, nblk, warps, kind in (((8, 32, 4, None), (16, 32, 8, None), (16, 16, 4, True),
                                       (16, 32, 8, "unrolled"), (16, 64, 16, "unrolled"), (8, 64, 8, "unrolled"),
                                       (16, 32, 16, "unrolled"), (8, 32, 4, "unrolled"), (16, 16, 4, "unrolled"),
                                       (32, 16, 8, "unrolled")) if ell else ()):
            if kind == "unrolled" and not clamp:
                continue
            c = dict(block_m=1, block_r=min(br, R), nblk=nblk, num_warps=warps, num_stages=1, packed=True,
                     prefetch=kind is True, ell="unrolled" if kind == "unrolled" else "loop")
            if kind == "unrolled" and (warps == 16 or (nblk, warps) == (64, 8)):
                c["maxnreg"] = 32
            add(dict(c, clamp=True) if kind == "unrolled" else c, False)
    if M == 1:
        # jmajor=False: the row-major tile order; the block-major one (jmajor=True, a kernel option) measured the
        # same or slower on the H100 for fp16 and int4 (docs/results/blocksparse.md), so it is not a candidate.
        # The last two: fewer rows and more blocks per program (a block row in about one step: a shorter chain of
        # dependent loads per program, more programs)
        for k, (br, kk_bytes, warps, stages) in enumerate(((16, 512, 4, 3), (8, 512, 4, 3), (16, 256, 4, 4),
                                                            (32, 256, 8, 3), (16, 1024, 8, 3), (8, 1024, 4, 2),
                                                            (32, 512, 8, 3), (4, 2048, 4, 2), (8, 2048, 8, 2))):
            br = min(br, R)
            nblk = _next_pow2(max(1, kk_bytes // (cw * elt)))
            while br * nblk * cw > 16384 and nblk > 1:
                nblk //= 2
            add(dict(block_m=1, block_r=br, nblk=nblk, num_warps=warps, num_stages=stages, jmajor=False), k < 2)
        if bits is None:  # the hand-pipelined GEMV loop (Triton does not pipeline this loop at all)
            for k, (br, kk_bytes, warps) in enumerate(((16, 512, 4), (8, 512, 4), (8, 1024, 4), (16, 256, 4),
                                                       (32, 256, 8))):
                br = min(br, R)
                nblk = _next_pow2(max(1, kk_bytes // (cw * elt)))
                while br * nblk * cw > 8192 and nblk > 1:
                    nblk //= 2
                add(dict(block_m=1, block_r=br, nblk=nblk, num_warps=warps, num_stages=1, jmajor=False,
                         prefetch=True), k < 2)
            for c in [c for c in out if c.get("prefetch") and not c["chunk"]][:2]:  # longest block rows first
                add(dict(c, order=True), False)
        return out
    bm = min(128, max(16, _next_pow2(M)))
    if R >= 16:
        for k, (br, kk, warps, stages) in enumerate(((32, 128, 4, 3), (64, 64, 8, 3), (16, 128, 4, 4),
                                                     (64, 128, 8, 3), (32, 64, 4, 4), (32, 128, 4, 4),
                                                     (64, 64, 4, 4))):
            br = min(br, R)
            nblk = _next_pow2(max(1, kk // cw))
            if bm * br > 128 * 64 or not _can_dot(params, bm, br, nblk):
                continue
            add(dict(block_m=bm, block_r=br, nblk=nblk, num_warps=warps, num_stages=stages), k < 3)
        if bm == 128:  # two 64-row tiles of x: twice the programs
            for k, (br, kk, warps, stages) in enumerate(((64, 64, 4, 3), (32, 128, 4, 3), (64, 128, 8, 3))):
                br = min(br, R)
                nblk = _next_pow2(max(1, kk // cw))
                if _can_dot(params, 64, br, nblk):
                    add(dict(block_m=64, block_r=br, nblk=nblk, num_warps=warps, num_stages=stages), k < 2)
        # Triton 3.6 pipelines this loop with one buffer (a step's loads are in flight alone, see the kernel): wider
        # K-tiles put more bytes in flight per step; `prefetch` (num_stages 1) issues the next step's loads by hand
        # before the current step's multiply (two steps in flight)
        # (no wide K-tile for 64/128-row x tiles: 128 x 256 int4 tiles need more shared memory than the H100 has)
        wide = ((32, 256, 4, False), (16, 512, 4, False), (32, 128, 4, True), (64, 64, 8, True),
                (16, 128, 4, True), (32, 256, 4, True), (16, 256, 4, True), (16, 512, 4, True),
                (64, 256, 8, True)) if bm <= 16 else \
            ((32, 64, 4, True), (64, 64, 8, True), (32, 128, 8, True))
        for k, (br, kk, warps, pf) in enumerate(wide):
            if pf and bits:  # see `launch`
                continue
            br = min(br, R)
            nblk = _next_pow2(max(1, kk // cw))
            bmw = 64 if bm == 128 and pf else bm  # 128-row x tiles twice over in registers: too many
            if bmw * br > 128 * 64 or not _can_dot(params, bmw, br, nblk):
                continue
            add(dict(block_m=bmw, block_r=br, nblk=nblk, num_warps=warps, num_stages=1 if pf else 2, prefetch=pf),
                pf and k < 4)
        # longest block rows first: the best prefetch tiles of the second pass (M = 16), the first tiles (M = 128)
        firsts = [c for c in out if not c["chunk"] and (c.get("prefetch") if bm <= 16 else True)]
        for c in (firsts[2:4] + firsts[:1]) if bm <= 16 else firsts[:3]:
            add(dict(c, order=True), False)
        if out:
            return out
    if R < 16 and bsr_thin.ok(params, dtype):
        # thin blocks in values of the model dtype: dense weight tiles of several block rows on the tensor cores
        # (`bsr_thin`; the multiply-reduce below, one output row per program at R = 1, ran 0.06x of cuBLAS at M = 16)
        out += [c for c in bsr_thin.configs(M, params, sms) if c not in out]
    # thin blocks (or a K-tile under 16): multiply-reduce on CUDA cores; keep the [BM, BR, KK] product small
    bm = min(_next_pow2(M), 16)
    br = min(R, 16)
    nblk = _next_pow2(max(1, 64 // cw))
    while bm * br * nblk * cw > 8192 and nblk > 1:
        nblk //= 2
    while bm * br * nblk * cw > 8192 and br > 1:
        br //= 2
    add(dict(block_m=bm, block_r=br, nblk=nblk, num_warps=4, num_stages=2), True)
    return out


_ROW_MAX: dict[int, tuple] = {}


def _row_extent(crow: torch.Tensor) -> tuple[int, int] | None:
    """(fewest, most) stored blocks in one block row: read once per crow tensor (a host sync, like the first
    call's tuning) and cached per tensor and version; None under CUDA-graph capture without a cached value."""
    try:
        version = crow._version
    except RuntimeError:  # inference tensors have no version counter
        version = None
    hit = _ROW_MAX.get(id(crow))
    if hit is not None and hit[0]() is crow and hit[1] == version and version is not None:
        return hit[2]
    if crow.numel() <= 1:
        return (0, 0)
    if crow.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    lengths = crow[1:] - crow[:-1]
    extent = (int(lengths.min()), int(lengths.max()))
    if version is not None:
        key = id(crow)

        def drop(ref, key=key):
            if _ROW_MAX.get(key, (None,))[0] is ref:
                del _ROW_MAX[key]

        _ROW_MAX[key] = (weakref.ref(crow, drop), version, extent)
    return extent


def max_row_blocks(crow: torch.Tensor, params: dict) -> int:
    """Most stored blocks in one block row (`_row_extent`). Under CUDA-graph capture without a cached value: an
    estimate from nnz_blocks (twice the mean); every value gives correct results, since the last split of a block
    row takes whatever is left."""
    extent = _row_extent(crow)
    if extent is None:
        NB = crow.numel() - 1
        return min(params["in_features"] // params["block_cols"], 2 * -(-params["nnz_blocks"] // NB) + 1)
    return extent[1]


def uniform_row_blocks(crow: torch.Tensor) -> int | None:
    """The stored blocks per block row where every block row holds the same number (row-balanced masks, `scope:
    row`), so that crow[r] = r * count; None where they differ or are not known (CUDA-graph capture without a
    cached value)."""
    extent = _row_extent(crow)
    return extent[0] if extent is not None and extent[0] == extent[1] else None


_ROW_ORDER: dict[tuple, tuple] = {}


def row_order(crow: torch.Tensor, params: dict, block_r: int) -> torch.Tensor:
    """int32 [N / block_r]: the row tiles, longest block row first (stable), for launches with `order`: the
    longest block rows start first and the short ones fill in behind them. Computed on the device (no host sync)
    and cached per crow tensor, version and block_r; under CUDA-graph capture it is computed into the graph's
    memory and not cached."""
    R = params["block_rows"]
    try:
        version = crow._version
    except RuntimeError:  # inference tensors have no version counter
        version = None
    key = (id(crow), block_r)
    hit = _ROW_ORDER.get(key)
    if hit is not None and hit[0]() is crow and hit[1] == version and version is not None:
        return hit[2]
    lengths = (crow[1:] - crow[:-1]).to(torch.int64)
    rows = torch.sort(-lengths, stable=True).indices  # [NB] block rows, longest first
    per = R // block_r
    tiles = (rows[:, None] * per + torch.arange(per, device=crow.device)[None, :]).reshape(-1).to(torch.int32)
    capturing = crow.is_cuda and torch.cuda.is_current_stream_capturing()
    if version is not None and not capturing:
        def drop(ref, key=key):
            if _ROW_ORDER.get(key, (None,))[0] is ref:
                del _ROW_ORDER[key]

        _ROW_ORDER[key] = (weakref.ref(crow, drop), version, tiles)
    return tiles


MAX_SPLITS = 64
_SPLIT_WS: dict[tuple, tuple] = {}


def _split_workspace(device: torch.device, n_part: int, n_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 partial tiles (never read before written: left uninitialized) and int32 tile counters (zeroed once;
    kernels put them back to zero) for split-K, one pair per (device, stream) so that concurrent streams never
    share counters. Grown on demand (the old pair is kept alive: a captured CUDA graph may still point at it). A
    first use inside CUDA-graph capture allocates from the graph's pool; the counters' zero-fill replays with it."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    ws, cnt = _SPLIT_WS.get(key, (None, None))
    if ws is None or ws.numel() < n_part or cnt.numel() < n_tiles:
        if ws is not None:
            _SPLIT_RETIRED.append((ws, cnt))
        n_part = max(n_part, 0 if ws is None else ws.numel(), 1 << 12)
        n_tiles = max(n_tiles, 0 if cnt is None else cnt.numel(), 1 << 12)
        ws = torch.empty(n_part, dtype=torch.float32, device=device)
        cnt = torch.zeros(n_tiles, dtype=torch.int32, device=device)
        _SPLIT_WS[key] = (ws, cnt)
    return ws, cnt


_SPLIT_RETIRED: list[tuple] = []


def launch(x2: torch.Tensor, tensors: dict, params: dict, bias: torch.Tensor | None, out: torch.Tensor,
           cfg: dict):
    """x2 [M, K] (contiguous rows) -> out [M, N] with the given launch config (block_m, block_r, nblk, chunk,
    num_warps, num_stages; `n_split` forces the number of splits per block row, for tests)."""
    if cfg.get("thin"):  # thin blocks, several block rows per program (`bsr_thin`)
        from . import bsr_thin

        return bsr_thin.launch(x2, tensors, params, bias, out, cfg)
    M = x2.shape[0]
    N, K, R, C = params["out_features"], params["in_features"], params["block_rows"], params["block_cols"]
    KB = K // C
    bits = params.get("bits")
    br, bm, nblk = cfg["block_r"], cfg["block_m"], cfg.get("nblk", 1)
    if R % br:
        raise ValueError(f"block_r {br} must divide the block height {R}")
    if bits is None:
        v, s, gb = tensors["values"], tensors["values"], 1
    else:
        v, s = tensors["qvalues"], tensors["scales"]
        gb = C // params["group_size"] if block_scales(params) else 0
    b = bias if bias is not None else s
    from . import bsr_pk  # (imports this module)

    packed = bool(cfg.get("packed"))
    if packed and not (bsr_pk.ok(params, x2.dtype) and bm == 1 and M == 1):
        raise ValueError("bsr packed launches are for M = 1, fp16 x and int4 values with one scale per block row"
                         " (group_size a multiple of block_cols) and block_cols a multiple of 16")
    if cfg.get("prefetch") and bits and not packed:
        # the mm prefetch loop gave wrong sums and an illegal address with int4 codes and 64-row x tiles on the
        # H100 (2026-11-24; correct under TRITON_INTERPRET=1); the GEMV one is written for model-dtype values only
        raise ValueError("bsr prefetch launches take values in the model dtype only (bits null)")
    crow = tensors["crow_indices"]
    chunk = cfg.get("chunk") or KB
    gemv = bm == 1 and M == 1
    n_split = cfg.get("n_split") or (1 if chunk >= KB else -(-max_row_blocks(crow, params) // chunk))
    # any count is correct (the last split of a row takes what is left); the cap bounds the workspace
    n_split = 1 if chunk >= KB else max(1, min(n_split, MAX_SPLITS))
    num_m = 1 if gemv else triton.cdiv(M, bm)
    ws, cnt = _split_workspace(x2.device, n_split * M * N if n_split > 1 else 0,
                               (N // br) * num_m if n_split > 1 else 0)
    if cfg.get("order"):
        order = dict(order_ptr=row_order(crow, params, br), ORDER=True)
    else:
        order = {}
    common = dict(R=R, C=C, CW=_cw(params), BLOCK_R=br, NBLK=nblk, BITS=bits or 0, GB=gb, HAS_BIAS=bias is not None,
                  FENCE=not _interpreting(), num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2))
    if packed and bsr_pk.launch(x2, tensors, params, bias, out, cfg, ws, cnt, chunk, n_split, not _interpreting(),
                                order):
        return None
    if packed:  # x or the codes not word-aligned: the fp32 path of the same tile (it has no prefetch for codes)
        cfg = dict(cfg, prefetch=False)
    if gemv:
        return _bsr_gemv_kernel[(N // br, n_split)](
            x2, crow, tensors["col_indices"], v, s, b, out, ws, cnt, N, params.get("group_size") or 1,
            chunk, n_split, MAGIC_F32, JMAJOR=cfg.get("jmajor", True), PREFETCH=bool(cfg.get("prefetch")),
            **order, **common)
    return _bsr_mm_kernel[(N // br, num_m, n_split)](
        x2, crow, tensors["col_indices"], v, s, b, out, ws, cnt,
        M, N, params.get("group_size") or 1, x2.stride(0), out.stride(0), chunk, n_split, MAGIC_F32, BLOCK_M=bm,
        USE_DOT=_can_dot(params, bm, br, nblk), DOT_F32=_interpreting() and x2.dtype == torch.bfloat16,
        PREFETCH=bool(cfg.get("prefetch")), **order, **common)


_TUNED: dict[tuple, dict] = {}
TUNE_LOG: list[dict] = []  # every timing the tuner took: key, config, cold-L2 us (read by the benchmark)


def _tune(key: tuple, candidates: list[dict], run, device: torch.device, tensors: dict | None = None) -> dict:
    """First call of a key on CUDA: time every candidate, keep the fastest. `run(cfg, tensors)` launches on the
    given weight tensors. With `tensors`, the timing is the benchmark table's (`bench.graph_time_us`): one CUDA
    graph of calls on rotated copies of the weight that together exceed the L2 three times, so each call reads
    its weight from HBM after other calls' reads, as in a model's forward (the copies live during tuning only);
    without, or if the copies do not fit, gwint's `time_cold_us` (graphs of (L2 memset, call)), which ranked
    configs 0.2-0.9 us apart differently from the table on the H100 (docs/results/blocksparse.md, third pass).
    The first candidate is used under CUDA-graph capture, TRITON_INTERPRET=1 or BITSMITH_TUNE=0."""
    cfg = _TUNED.get(key)
    if cfg is not None:
        return cfg
    if (len(candidates) == 1 or _interpreting() or device.type != "cuda" or os.environ.get("BITSMITH_TUNE") == "0"
            or torch.cuda.is_current_stream_capturing()):
        cfg = candidates[0]
    else:
        sets = _rotated_copies(tensors) if tensors is not None else None
        best = None
        for c in candidates:
            try:
                run(c, tensors)  # compile, workspace and the row-length read outside the timed region
                if sets:
                    from .bench import graph_time_us

                    t = graph_time_us([lambda c=c, ts=ts: run(c, ts) for ts in sets], min_calls=32, replays=7)
                else:
                    t = time_cold_us(lambda c=c: run(c, tensors))
            except Exception as e:  # a candidate that does not compile/launch here is skipped
                TUNE_LOG.append({"key": key, "config": c, "error": f"{type(e).__name__}: {e}"[:200]})
                continue
            TUNE_LOG.append({"key": key, "config": c, "us": t, "timing": "rotated" if sets else "cold"})
            if best is None or t < best[0]:
                best = (t, c)
        del sets
        cfg = best[1] if best else candidates[0]
    _TUNED[key] = cfg
    return cfg


def _rotated_copies(tensors: dict) -> list[dict] | None:
    """The weight tensors and enough copies that together they exceed the L2 three times (at most 64 sets), or
    None where the copies do not fit in free memory (then the tuner times with a flushed L2 instead)."""
    from .bench import rotations

    nbytes = sum(v.numel() * v.element_size() for v in tensors.values())
    n = rotations(nbytes)
    try:
        free, _ = torch.cuda.mem_get_info()
        if (n - 1) * nbytes > free // 4:
            return None
        return [tensors] + [{k: v.clone() for k, v in tensors.items()} for _ in range(n - 1)]
    except torch.cuda.OutOfMemoryError:
        return None


def _m_bucket(M: int) -> int:
    return 1 if M == 1 else min(128, max(16, _next_pow2(M)))


def tune_key(M: int, params: dict, dtype: torch.dtype, has_bias: bool, device, equal_rows: bool = False) -> tuple:
    """equal_rows: every block row holds the same number of blocks (`uniform_row_blocks`), which the `ell` tiles
    need: a pick tuned on equal rows is not reused for unequal ones (H100, sixth pass: 7.0 us against 6.5)."""
    N, K = params["out_features"], params["in_features"]
    return (_m_bucket(M), N, K, params["block_rows"], params["block_cols"], params.get("bits"),
            params.get("group_size"), round(density(params), 1), dtype, has_bias, str(device), equal_rows)


def triton_linear(x: torch.Tensor, tensors: dict, params: dict, bias: torch.Tensor | None = None,
                  config: dict | None = None) -> torch.Tensor:
    """x [..., K] (fp16/bf16) @ W^T (+ bias) -> [..., N] by the Triton kernels; `config` forces a launch config."""
    from .launch import flat_rows

    rows = flat_rows(x, params["in_features"], params["out_features"])
    x2, out, M = rows.x2, rows.out, rows.M
    if M == 0:
        return rows.result()
    if config is None:
        cands = configs(M, params, _num_sms(x.device), dtype=x.dtype)
        equal = uniform_row_blocks(tensors["crow_indices"]) is not None
        config = _tune(tune_key(M, params, x.dtype, bias is not None, x.device, equal), cands,
                       lambda c, t: launch(x2, t, params, bias, out, c), x.device, tensors)
    launch(x2, tensors, params, bias, out, config)
    return rows.result()


# --------------------------------------------------------------------------------------------------------------
# the format


@register_format
class BsrFormat(PackedFormat):
    """Block-sparse rows: stored blocks in the model dtype or int8/int4 with per-segment scales (layout above)."""

    name = FORMAT_NAME
    version = FORMAT_VERSION
    loadable_versions = (1,)

    def check_params(self, params):
        return check_params(params)

    def tensor_specs(self, params, dtype):
        return tensor_specs(params, dtype)

    def dequantize(self, tensors, params):
        return dequantize(tensors, params)

    def linear(self, x, tensors, params, bias):
        return linear(x, tensors, params, bias)

    def sparsity(self, params):
        return 1.0 - density(params)


def density(params: dict) -> float:
    """Stored blocks over all blocks."""
    total = (params["out_features"] // params["block_rows"]) * (params["in_features"] // params["block_cols"])
    return params["nnz_blocks"] / total if total else 0.0


def nbytes(params: dict, dtype: torch.dtype = torch.float16) -> int:
    """Stored bytes of one module in this format (indexes and scales counted)."""
    total = 0
    for shape, dt in tensor_specs(params, dtype).values():
        total += math.prod(shape) * torch.empty((), dtype=dt).element_size()
    return total
