"""Bit-plane weights (format `bitplane`, version 1): bipolar-INT and BCQ share one layout, one set of kernels.

Layout, for a Linear with weight W [N, K] (N = out_features, K = in_features), `bits` b in 1..8, group size g along
K (g = K means one group per output channel), G = ceil(K / g) groups (the last one may be partial), KW = ceil(K / 32):

    planes   int32 [b, KW, N]      sign planes, 32 per word along K: bit j (LSB = 0) of planes[i, w, n] is the bit
                                   b_i of weight W[n, 32 w + j]. Padding bits past K are 0. K-major, so one K-block
                                   of a plane is contiguous along N (coalesced loads).
    scales   fp16|bf16 [G, N]      kind "bipolar": one scale s per (group, output channel)
    alphas   fp16|bf16 [b, G, N]   kind "bcq": one alpha per (plane, group, output channel)
    offset   fp16|bf16 [G, N]      optional (params offset=true), both kinds: added to every weight of the group

Each stored bit is a digit d_i = 2 b_i - 1 in {-1, +1}. Dequantization is exact:

    bipolar:  W[n, k] = s[g, n] * sum_i 2^i d_i            = s * (2u - (2^b - 1)),  u = sum_i 2^i b_i in 0..2^b-1
    bcq:      W[n, k] = sum_i alphas[i, g, n] * d_i
    (+ offset[g, n] when present),  g = k // group_size

so bipolar-INT is BCQ with alpha_i = 2^i s: storing one scale instead of b alphas saves (b - 1) * 16 / g bits per
weight. The odd levels +-1, +-3, ..., +-(2^b - 1) have no zero. Params in config.json: in_features, out_features,
bits, group_size, kind ("bipolar" | "bcq"), offset (bool).

Kernels (Triton, fp16/bf16 activations; CUDA only, the torch reference elsewhere; TRITON_INTERPRET=1 runs them on
the CPU for tests):

    M == 1     `_gemv_kernel`: CUDA cores, split-K, the 32 slots of a word unrolled as 2D tiles. Each plane word is
               pre-shifted once; a slot's bit is then masked in place, and the bits of all planes OR into the
               mantissa of float32 2^23 (one LOP3 per plane and weight), one FADD makes u * 2^p exact, one FFMA
               with x_j 2^-p accumulates. STRATEGY 0 ("rebuild", bipolar) assembles u = sum_i 2^i b_i that way;
               STRATEGY 1 ("planes", and always for BCQ) accumulates each plane separately and weights it by 2^i
               or alpha_i per tile. Rebuild measured 1.4x faster than plane-wise for bipolar at 3 bits.
    M >= 2     `_gemm_kernel`: a [BLOCK_K, BLOCK_N] operand for `tl.dot`, split-K for small M. Bipolar: the slot
               tiles of u (exact small integers) are joined into the operand; 2s and the -(2^b-1) s rowsum(x)
               term are applied per group after the dot. BCQ: w = sum_i +-alpha_i rebuilt in fp32, one dot
               (STRATEGY 0, measured faster), or one dot per +-1 plane (STRATEGY 1).
    large M    `_dequant_kernel` writes W^T once, then cuBLAS (from DEQUANT_MIN_M rows on).
    M == 1     `_gemv_h2_kernel` (fp16 x, both kinds): two weights per instruction. Slots j and j + 16 of a word
               sit 16 bits apart, so one LOP3 per plane puts both codes under an fp16 exponent (an f16x2 of
               2^(10-q) + u), one exact HSUB2 leaves u - L/2, one HFMA2 with the x pair accumulates in fp16 for
               `chunk` pairs before fp32 takes over (chunk 0: two exact-product FFMAs in fp32 instead, 5..8
               bits). BCQ runs each plane as a 1-bit tile scaled by alpha_i. Inline PTX on the GPU, a plain-Triton
               twin with the same fp16 rounding under the interpreter; unrolled splits let ptxas prefetch.
    any M      `_gemm_t_kernel` ("swapped"): out^T = W x^T with the weights as the wgmma's A operand from
               registers, built per slot pair as above (+ HMUL2 by 2s); x re-ordered once per call (`xperm`).
               On the H100 the plain-Triton arithmetic (mode 1) beats the PTX (mode 2) at M = 16: Triton cannot
               move the A layout conversion through inline asm, so mode 2 stages every A tile in shared memory.
    M == 1     `bitplane_mma` (bipolar fp16, no offset, N % 4 == 0, 128-k groups): mma.sync m16n8k16 with A built
               per thread (bits LOP3, or one on merged plane words) and one constant mma for the level offset.
    M <= 16    `bitplane_mma_gemm`: the same with x rows as the mma columns; opt-in (BITSMITH_MMA_GEMM=1): on the
               H100 it ran 12-26 % slower than the swapped kernel at M = 16.
    M == 1     `_gemv_deep_h2_kernel` ("deep", fp16 x, both kinds): the f16x2 arithmetic with threads and warps
               along K as well as N, so a program owns a narrow column block (16-32 columns) and the whole K: no
               split-K epilogue. Run-time loop over tiles of word rows, the next tile's words loaded before the
               current one is consumed; per-row scales (a tile may span groups); at 2..4 bits the planes of each
               window are merged into BITS class words (bit selects), so every slot pair costs one LOP3 whatever
               the width; x read as int32 pairs + one PRMT per slot pair. The fastest M = 1 kernel at 1..4 bits on
               the H100 (fifth session).
    Unrolled f16x2 splits and both mma kernels can issue an L2 bulk prefetch of each program's working set
    (`prefetch=1` in a pinned config; no longer a tuning candidate: slower on the H100 at every M = 1 row).
The tuner (`triton_linear`) picks among all of these per shape; the H100 results are in docs/results/bitplane.md.

K-tiles never straddle a group: the kernels need group_size % 32 == 0 (or one group per row); other group sizes
fall back to the torch reference. Split-K partial sums, the workspace, the tuner and the epilogue are shared with
the `gwint` kernels (`bitsmith.kernels.gwint_triton`). What was measured: docs/results/bitplane.md.
"""

from __future__ import annotations

import math
import os

import torch

from ..compress.formats import PackedFormat, register_format
from .launch import flat_rows

FORMAT_NAME = "bitplane"
FORMAT_VERSION = 1
KINDS = ("bipolar", "bcq")
DEQUANT_MIN_M = 256  # fused kernel below (faster at M=128, measured); 256 = the gwint crossover, not re-measured

try:  # Triton is optional at import time (the torch reference works without it)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


# --------------------------------------------------------------------------------------------------------------
# packing (exact) and the torch reference


def num_words(in_features: int) -> int:
    return math.ceil(in_features / 32)


def num_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size)


def tensor_specs(out_features: int, in_features: int, bits: int, group_size: int, kind: str, offset: bool,
                 dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of one module's packed tensors (used to build modules on the meta device)."""
    if kind not in KINDS:
        raise ValueError(f"bitplane kind must be one of {KINDS}, got {kind!r}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    G = num_groups(in_features, group_size)
    specs = {"planes": ((bits, num_words(in_features), out_features), torch.int32)}
    if kind == "bipolar":
        specs["scales"] = ((G, out_features), dtype)
    else:
        specs["alphas"] = ((bits, G, out_features), dtype)
    if offset:
        specs["offset"] = ((G, out_features), dtype)
    return specs


def pack_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: integer [N, K] in [0, 2^b), bit i of a code = plane i -> planes int32 [b, ceil(K/32), N]."""
    N, K = codes.shape
    KW = num_words(K)
    c = torch.zeros((N, KW * 32), dtype=torch.int64, device=codes.device)
    c[:, :K] = codes.to(torch.int64)
    c = c.view(N, KW, 32)
    shifts = torch.arange(32, dtype=torch.int64, device=codes.device)
    planes = []
    for i in range(bits):
        words = (((c >> i) & 1) << shifts).sum(dim=-1)  # [N, KW] < 2^32
        words = torch.where(words >= 2**31, words - 2**32, words)  # as signed int32
        planes.append(words.to(torch.int32).t())
    return torch.stack(planes).contiguous()


def unpack_planes(planes: torch.Tensor, in_features: int) -> torch.Tensor:
    """planes int32 [b, KW, N] -> codes uint8 [N, K] (u = sum_i 2^i b_i)."""
    bits, KW, N = planes.shape
    shifts = torch.arange(32, dtype=torch.int64, device=planes.device)
    w = planes.to(torch.int64) & 0xFFFFFFFF  # [b, KW, N]
    b = (w.unsqueeze(-1) >> shifts) & 1  # [b, KW, N, 32]
    b = b.permute(0, 2, 1, 3).reshape(bits, N, KW * 32)[:, :, :in_features]  # [b, N, K]
    weights = (1 << torch.arange(bits, dtype=torch.int64, device=planes.device)).view(bits, 1, 1)
    return (b * weights).sum(0).to(torch.uint8)


def _expand(t: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """[..., G, N] -> [..., N, K] float32 (each group's value repeated over its columns)."""
    group_of_k = torch.arange(in_features, device=t.device) // group_size
    return t.to(torch.float32).transpose(-1, -2)[..., group_of_k]


def dequantize(planes: torch.Tensor, coef: torch.Tensor, offset: torch.Tensor | None, kind: str, group_size: int,
               in_features: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Exact weight [N, K] (computed in float32, returned in `dtype`, default the coefficients' dtype).

    coef: scales [G, N] (bipolar) or alphas [b, G, N] (bcq).
    """
    bits = planes.shape[0]
    if kind == "bipolar":
        u = unpack_planes(planes, in_features).to(torch.float32)
        w = (2.0 * u - float((1 << bits) - 1)) * _expand(coef, group_size, in_features)
    elif kind == "bcq":
        codes = unpack_planes(planes, in_features).to(torch.int64)
        w = torch.zeros(codes.shape, dtype=torch.float32, device=planes.device)
        alphas = _expand(coef, group_size, in_features)  # [b, N, K]
        for i in range(bits):
            w += alphas[i] * (2.0 * ((codes >> i) & 1).to(torch.float32) - 1.0)
    else:
        raise ValueError(f"bitplane kind must be one of {KINDS}, got {kind!r}")
    if offset is not None:
        w += _expand(offset, group_size, in_features)
    return w.to(dtype or coef.dtype)


def linear_reference(x: torch.Tensor, planes: torch.Tensor, coef: torch.Tensor, offset: torch.Tensor | None,
                     kind: str, group_size: int, in_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) -> [..., N] through the exact dequantized weight."""
    w = dequantize(planes, coef, offset, kind, group_size, in_features, dtype=x.dtype)
    return torch.nn.functional.linear(x, w, bias)


def use_triton(x: torch.Tensor, group_size: int, in_features: int) -> bool:
    """Triton on CUDA (or forced by BITSMITH_TRITON=1, e.g. under TRITON_INTERPRET=1), for fp16/bf16 x and group
    sizes the kernels take; BITSMITH_TRITON=0 turns the kernels off."""
    flag = os.environ.get("BITSMITH_TRITON", "")
    if triton is None or flag == "0" or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    if group_size % 32 != 0 and group_size < in_features:
        return False
    return x.is_cuda or flag == "1"


def linear(x: torch.Tensor, planes: torch.Tensor, coef: torch.Tensor, offset: torch.Tensor | None, kind: str,
           group_size: int, in_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The op packed modules call: the Triton kernels below on CUDA, the torch reference elsewhere."""
    if use_triton(x, group_size, in_features):
        return triton_linear(x, planes, coef, offset, kind, group_size, in_features, bias)
    return linear_reference(x, planes, coef, offset, kind, group_size, in_features, bias)


@register_format
class BitplaneFormat(PackedFormat):
    """Sign bit-planes with per-group scales (bipolar-INT) or per-plane alphas (BCQ); layout in this module."""

    name = FORMAT_NAME
    version = FORMAT_VERSION
    loadable_versions = (1,)

    def tensor_specs(self, params, dtype):
        return tensor_specs(params["out_features"], params["in_features"], params["bits"], params["group_size"],
                            params.get("kind", "bipolar"), bool(params.get("offset", False)), dtype)

    @staticmethod
    def _coef(tensors, params):
        return tensors["scales"] if params.get("kind", "bipolar") == "bipolar" else tensors["alphas"]

    def dequantize(self, tensors, params):
        return dequantize(tensors["planes"], self._coef(tensors, params), tensors.get("offset"),
                          params.get("kind", "bipolar"), params["group_size"], params["in_features"])

    def linear(self, x, tensors, params, bias):
        return linear(x, tensors["planes"], self._coef(tensors, params), tensors.get("offset"),
                      params.get("kind", "bipolar"), params["group_size"], params["in_features"], bias)


# --------------------------------------------------------------------------------------------------------------
# Triton kernels

if triton is not None:
    from .gwint_triton import _epilogue, _interpreting, _num_sms, _split, _tune, _workspace
    from .launch import grouped_pid

    MAGIC_F32 = 0x4B000000  # float32 2^23, passed at run time so that AND + OR fuse into one LOP3

    @triton.jit
    def _slot_pos(j, NB: tl.constexpr):
        """Bit position p_j [1, 32, 1] at which slot j's NB-bit value is assembled: j itself while the value fits
        below bit 23 (the float32 mantissa), else j - 16 (read from the word shifted right by 16)."""
        return tl.where(j <= 23 - NB, j, j - 16)

    @triton.jit
    def _plane_f(w, i: tl.constexpr, f, p, hi_sel):
        """OR bit j of plane word w (shifted to position p_j + i) into f. w [BKW, BN] -> f [BKW, 32, BN].

        No per-weight shift: the word is pre-shifted once (by i, or by i - 16 for the high slots) and each slot
        only masks its bit in place. With j per register constant, ptxas emits one LOP3 (AND + OR) per weight.
        """
        lo = (w << i)[:, None, :]
        hi = ((w >> 16) << i)[:, None, :]
        return f | (tl.where(hi_sel, hi, lo) & (1 << (p + i)))

    @triton.jit
    def _plane_words(wp, i: tl.constexpr, plane_stride, wmask, magic, SHIFT: tl.constexpr, MERGE: tl.constexpr,
                     EVEN: tl.constexpr):
        """Load plane i's words [BKW, BN] and pre-shift them once per word: lo = w << SHIFT (slots read in place)
        and hi = (w >> 16) << SHIFT (slots 16.. read from the high half). With MERGE the float32 exponent of 2^23
        is put into bits 23..30, so that one AND per weight leaves 2^23 + bit * 2^p."""
        if EVEN:
            w = tl.load(wp + i * plane_stride)
        else:
            w = tl.load(wp + i * plane_stride, mask=wmask, other=0)
        lo = w << SHIFT
        hi = (w >> 16) << SHIFT
        if MERGE:
            lo = (lo & 0x007FFFFF) | magic
            hi = (hi & 0x007FFFFF) | magic
        return lo, hi

    @triton.jit
    def _or_slot(f, v1, v2, v3, v4, v5, v6, v7, p: tl.constexpr, BITS: tl.constexpr):
        """f = (plane-0 word, exponent merged) & (2^p | exponent) | sum_i (plane-i word & 2^(p+i)): one LOP3 per
        plane and weight; bit i of u lands at bit p + i of the float32 mantissa."""
        f = f & ((1 << p) | 0x4B000000)
        if BITS > 1:
            f = f | (v1 & (1 << (p + 1)))
        if BITS > 2:
            f = f | (v2 & (1 << (p + 2)))
        if BITS > 3:
            f = f | (v3 & (1 << (p + 3)))
        if BITS > 4:
            f = f | (v4 & (1 << (p + 4)))
        if BITS > 5:
            f = f | (v5 & (1 << (p + 5)))
        if BITS > 6:
            f = f | (v6 & (1 << (p + 6)))
        if BITS > 7:
            f = f | (v7 & (1 << (p + 7)))
        return f

    @triton.jit
    def _all_planes(wp, plane_stride, wmask, magic, BITS: tl.constexpr, EVEN: tl.constexpr):
        """Every plane's pre-shifted words (lo_i = w_i << i, hi_i = (w_i >> 16) << i; plane 0 carries the
        exponent); planes >= BITS repeat plane 0 and are never read."""
        l0, h0 = _plane_words(wp, 0, plane_stride, wmask, magic, 0, True, EVEN)
        l1, h1, l2, h2, l3, h3, l4, h4, l5, h5, l6, h6, l7, h7 = l0, h0, l0, h0, l0, h0, l0, h0, l0, h0, l0, h0, \
            l0, h0
        if BITS > 1:
            l1, h1 = _plane_words(wp, 1, plane_stride, wmask, magic, 1, False, EVEN)
        if BITS > 2:
            l2, h2 = _plane_words(wp, 2, plane_stride, wmask, magic, 2, False, EVEN)
        if BITS > 3:
            l3, h3 = _plane_words(wp, 3, plane_stride, wmask, magic, 3, False, EVEN)
        if BITS > 4:
            l4, h4 = _plane_words(wp, 4, plane_stride, wmask, magic, 4, False, EVEN)
        if BITS > 5:
            l5, h5 = _plane_words(wp, 5, plane_stride, wmask, magic, 5, False, EVEN)
        if BITS > 6:
            l6, h6 = _plane_words(wp, 6, plane_stride, wmask, magic, 6, False, EVEN)
        if BITS > 7:
            l7, h7 = _plane_words(wp, 7, plane_stride, wmask, magic, 7, False, EVEN)
        return l0, h0, l1, h1, l2, h2, l3, h3, l4, h4, l5, h5, l6, h6, l7, h7

    @triton.jit
    def _u_slot(l0, h0, l1, h1, l2, h2, l3, h3, l4, h4, l5, h5, l6, h6, l7, h7, j: tl.constexpr,
                BITS: tl.constexpr):
        """u_j = sum_i 2^i b_ij exactly, float32 [BKW, BN]: BITS LOP3 and one FFMA per weight."""
        if j <= 23 - BITS:
            f = _or_slot(l0, l1, l2, l3, l4, l5, l6, l7, j, BITS)
            u = f.to(tl.float32, bitcast=True) * (1.0 / (1 << j)) - 8388608.0 / (1 << j)
        else:
            f = _or_slot(h0, h1, h2, h3, h4, h5, h6, h7, j - 16, BITS)
            u = f.to(tl.float32, bitcast=True) * (1.0 / (1 << (j - 16))) - 8388608.0 / (1 << (j - 16))
        return u

    @triton.jit
    def _u_tree(l0, h0, l1, h1, l2, h2, l3, h3, l4, h4, l5, h5, l6, h6, l7, h7, j0: tl.constexpr,
                step: tl.constexpr, LEVEL: tl.constexpr, BITS: tl.constexpr):
        """Slots j0, j0 + step, ... (2^LEVEL of them) joined into trailing axes of size 2, the last one j & 1:
        [BKW, BN, 2, ..., 2] that reshapes to [BKW, BN, 2^LEVEL] in slot order."""
        if LEVEL == 0:
            return _u_slot(l0, h0, l1, h1, l2, h2, l3, h3, l4, h4, l5, h5, l6, h6, l7, h7, j0, BITS)
        else:
            a = _u_tree(l0, h0, l1, h1, l2, h2, l3, h3, l4, h4, l5, h5, l6, h6, l7, h7, j0, step * 2, LEVEL - 1,
                        BITS)
            b = _u_tree(l0, h0, l1, h1, l2, h2, l3, h3, l4, h4, l5, h5, l6, h6, l7, h7, j0 + step, step * 2,
                        LEVEL - 1, BITS)
            return tl.join(a, b)

    @triton.jit
    def _gemv_kernel(x_ptr, pl_ptr, c_ptr, o_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
                     N, K, KW, G, group_size, k_iters, split_k, magic,
                     BITS: tl.constexpr, BCQ: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                     STRATEGY: tl.constexpr, EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
        # x: [K]; planes: [BITS, KW, N] int32; c: scales [G, N] or alphas [BITS, G, N]; out: [N]
        # 2D tiles [BKW words, BN]; the 32 slots of a word (k = 32 kw + j) are unrolled, so every reduction over K
        # is a chain of FMAs inside a thread until the final sum over word rows.
        # STRATEGY 0 (rebuild, bipolar): one LOP3 per plane assembles 2^23 + u * 2^p_j (u = sum_i 2^i b_i), then
        #   one FADD (exact) and one FFMA with x_j 2^-p_j per weight.
        # STRATEGY 1 (plane-wise): the same per plane (u = b_i), each plane accumulated separately and combined
        #   per tile with 2^i (bipolar) or alpha_i (BCQ): BITS x (LOP3 + FADD + FFMA) per weight.
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        rw = tl.arange(0, BLOCK_KW)
        plane_stride = KW * N
        coef_stride = G * N
        L: tl.constexpr = (1 << BITS) - 1
        NB: tl.constexpr = BITS if STRATEGY == 0 else 1  # bits assembled per slot
        acc = tl.zeros([BLOCK_KW, BLOCK_N], dtype=tl.float32)
        kw_begin = pid_k * k_iters * BLOCK_KW
        for it in range(k_iters):
            kw0 = kw_begin + it * BLOCK_KW
            kw = kw0 + rw
            kb = kw * 32
            wmask = (kw[:, None] < KW) & n_mask[None, :]
            wp = pl_ptr + kw[:, None] * N + offs_n[None, :]
            if EVEN:
                xsum = tl.sum(tl.load(x_ptr + kb[:, None] + tl.arange(0, 32)[None, :]).to(tl.float32), axis=1)
            else:
                kk = kb[:, None] + tl.arange(0, 32)[None, :]
                xsum = tl.sum(tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32), axis=1)
            g = tl.minimum((kw0 * 32) // group_size, G - 1)  # the whole tile lies in group g
            for i in tl.static_range(BITS if STRATEGY == 1 else 1):
                if STRATEGY == 0:
                    l0, h0, l1, h1, l2, h2, l3, h3, l4, h4, l5, h5, l6, h6, l7, h7 = _all_planes(
                        wp, plane_stride, wmask, magic, BITS, EVEN)
                else:
                    l0, h0 = _plane_words(wp, i, plane_stride, wmask, magic, 0, True, EVEN)
                    l1, h1, l2, h2, l3, h3, l4, h4, l5, h5, l6, h6, l7, h7 = l0, h0, l0, h0, l0, h0, l0, h0, \
                        l0, h0, l0, h0, l0, h0
                t = tl.zeros([BLOCK_KW, BLOCK_N], dtype=tl.float32)
                for j in tl.static_range(32):
                    if j <= 23 - NB:
                        f = _or_slot(l0, l1, l2, l3, l4, l5, l6, l7, j, NB)
                        xscale = 1.0 / (1 << j)
                    else:
                        f = _or_slot(h0, h1, h2, h3, h4, h5, h6, h7, j - 16, NB)
                        xscale = 1.0 / (1 << (j - 16))
                    if EVEN:
                        xj = tl.load(x_ptr + kb + j).to(tl.float32) * xscale
                    else:
                        xj = tl.load(x_ptr + kb + j, mask=kb + j < K, other=0.0).to(tl.float32) * xscale
                    t += (f.to(tl.float32, bitcast=True) - 8388608.0) * xj[:, None]  # u_j x_j
                if STRATEGY == 0:
                    s = tl.load(c_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                    acc += (2.0 * t - L * xsum[:, None]) * s[None, :]
                elif BCQ:
                    a = tl.load(c_ptr + i * coef_stride + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                    acc += (2.0 * t - xsum[:, None]) * a[None, :]
                else:
                    s = tl.load(c_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                    acc += (2.0 * t - xsum[:, None]) * (s * (1 << i))[None, :]
            if HAS_OFFSET:
                o = tl.load(o_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                acc += xsum[:, None] * o[None, :]
        res = tl.sum(acc, axis=0)  # [BN]
        _epilogue(res[None, :], tl.arange(0, 1), offs_n, 1, N, out_ptr, N, b_ptr, ws_ptr, cnt_ptr, pid_n, split_k,
                  HAS_BIAS)

    @triton.jit
    def _weight_tile(wp, plane_stride, wmask, c_ptr, coef_stride, g, N, offs_n, n_mask, magic,
                     BITS: tl.constexpr, BCQ: tl.constexpr, STRATEGY: tl.constexpr, BLOCK_KW: tl.constexpr,
                     BLOCK_N: tl.constexpr):
        """Bipolar: u = sum_i 2^i b_i (exact small integers), float32 [BKW, 32, BN].
        BCQ (STRATEGY 0): w = sum_i alpha_i (2 b_i - 1), float32 [BKW, 32, BN]."""
        j = tl.arange(0, 32)[None, :, None]
        if BCQ:
            p = _slot_pos(j, 1)
            hi_sel = j > 22
            inv = 1.0 / (1 << p).to(tl.float32)
            wv = tl.zeros([BLOCK_KW, 32, BLOCK_N], dtype=tl.float32)
            for i in tl.static_range(BITS):
                w = tl.load(wp + i * plane_stride, mask=wmask, other=0)
                f = _plane_f(w, 0, tl.zeros([BLOCK_KW, 32, BLOCK_N], dtype=tl.int32) + magic, p, hi_sel)
                d = (f.to(tl.float32, bitcast=True) - 8388608.0) * (2.0 * inv) - 1.0  # 2 b - 1, exact
                a = tl.load(c_ptr + i * coef_stride + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                wv += d * a[None, None, :]
            return wv
        else:  # slots unrolled as 2D tiles (constant masks, one LOP3 per plane), joined into [BKW, 32, BN]
            l0, h0, l1, h1, l2, h2, l3, h3, l4, h4, l5, h5, l6, h6, l7, h7 = _all_planes(
                wp, plane_stride, wmask, magic, BITS, False)
            t = _u_tree(l0, h0, l1, h1, l2, h2, l3, h3, l4, h4, l5, h5, l6, h6, l7, h7, 0, 1, 5, BITS)
            t = tl.reshape(t, [BLOCK_KW, BLOCK_N, 32])
            return tl.permute(t, (0, 2, 1))  # u, exact

    @triton.jit
    def _gemm_kernel(x_ptr, pl_ptr, c_ptr, o_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
                     M, N, K, KW, G, group_size, stride_xm, stride_om, k_iters, split_k, magic,
                     BITS: tl.constexpr, BCQ: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                     STRATEGY: tl.constexpr, DOT_F32: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, GROUP_M: tl.constexpr):
        # x: [M, K]; planes: [BITS, KW, N] int32; c: scales [G, N] or alphas [BITS, G, N]; out: [M, N]
        # Bipolar: dot with u (exact in fp16/bf16), then 2 s and the -(2^b - 1) s rowsum(x) term per group.
        # BCQ STRATEGY 0: rebuild w = sum_i alpha_i d_i, one dot; STRATEGY 1: one dot per +-1 plane, times alpha_i.
        BLOCK_K: tl.constexpr = BLOCK_KW * 32
        DT = x_ptr.dtype.element_ty
        pid_k = tl.program_id(1)
        pid_m, pid_n = grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        num_n = tl.cdiv(N, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        rw = tl.arange(0, BLOCK_KW)
        rk = tl.arange(0, BLOCK_K)
        plane_stride = KW * N
        coef_stride = G * N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        kw_begin = pid_k * k_iters * BLOCK_KW
        for it in range(k_iters):
            kw0 = kw_begin + it * BLOCK_KW
            kw = kw0 + rw
            wmask = (kw[:, None] < KW) & n_mask[None, :]
            wp = pl_ptr + kw[:, None] * N + offs_n[None, :]
            k = kw0 * 32 + rk
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_mask[:, None] & (k < K)[None, :],
                        other=0.0)
            if DOT_F32:  # the CPU interpreter cannot multiply bf16: fp32 dot of the (exact) bf16 operands
                a = a.to(tl.float32)
            g = tl.minimum((kw0 * 32) // group_size, G - 1)
            if BCQ and STRATEGY == 1:  # one dot per +-1 plane, alpha_i applied to the [BM, BN] partial
                j = tl.arange(0, 32)[None, :, None]
                p = _slot_pos(j, 1)
                inv = 1.0 / (1 << p).to(tl.float32)
                for i in tl.static_range(BITS):
                    w = tl.load(wp + i * plane_stride, mask=wmask, other=0)
                    f = _plane_f(w, 0, tl.zeros([BLOCK_KW, 32, BLOCK_N], dtype=tl.int32) + magic, p, j > 22)
                    d = (f.to(tl.float32, bitcast=True) - 8388608.0) * (2.0 * inv) - 1.0  # +-1
                    d = tl.reshape(d, [BLOCK_K, BLOCK_N])
                    if not DOT_F32:
                        d = d.to(DT)
                    ai = tl.load(c_ptr + i * coef_stride + g * N + offs_n, mask=n_mask, other=0.0)
                    acc += tl.dot(a, d) * ai.to(tl.float32)[None, :]
            else:
                wt = _weight_tile(wp, plane_stride, wmask, c_ptr, coef_stride, g, N, offs_n, n_mask, magic,
                                  BITS, BCQ, STRATEGY, BLOCK_KW, BLOCK_N)
                b = tl.reshape(wt, [BLOCK_K, BLOCK_N])
                if not DOT_F32:
                    b = b.to(DT)
                if BCQ:
                    acc = tl.dot(a, b, acc)
                else:  # sum_k x q = 2 sum_k x u - (2^b - 1) sum_k x; scale after the dot
                    s = tl.load(c_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                    rs = tl.sum(a.to(tl.float32), axis=1)  # [BM]
                    acc += (2.0 * tl.dot(a, b) - ((1 << BITS) - 1) * rs[:, None]) * s[None, :]
            if HAS_OFFSET:
                o = tl.load(o_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                acc += tl.sum(a.to(tl.float32), axis=1)[:, None] * o[None, :]
        _epilogue(acc, offs_m, offs_n, M, N, out_ptr, stride_om, b_ptr, ws_ptr, cnt_ptr, pid_m * num_n + pid_n,
                  split_k, HAS_BIAS)

    @triton.jit
    def _dequant_kernel(pl_ptr, c_ptr, o_ptr, out_ptr, N, K, KW, G, group_size, magic,
                        BITS: tl.constexpr, BCQ: tl.constexpr, HAS_OFFSET: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
        # -> out: W^T [K, N] in the output dtype; BLOCK_KW * 32 divides group_size (or G == 1)
        kw0 = tl.program_id(0) * BLOCK_KW
        kw = kw0 + tl.arange(0, BLOCK_KW)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        wmask = (kw[:, None] < KW) & n_mask[None, :]
        wp = pl_ptr + kw[:, None] * N + offs_n[None, :]
        g = tl.minimum((kw0 * 32) // group_size, G - 1)
        v = _weight_tile(wp, KW * N, wmask, c_ptr, G * N, g, N, offs_n, n_mask, magic, BITS, BCQ, 0, BLOCK_KW,
                         BLOCK_N)
        if not BCQ:
            s = tl.load(c_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            v = (2.0 * v - ((1 << BITS) - 1)) * s[None, None, :]
        if HAS_OFFSET:
            v += tl.load(o_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, None, :]
        k = kw[:, None] * 32 + tl.arange(0, 32)[None, :]
        mask = (k < K)[:, :, None] & n_mask[None, None, :]
        tl.store(out_ptr + k[:, :, None] * N + offs_n[None, None, :], v.to(out_ptr.dtype.element_ty), mask=mask)

    # ----------------------------------------------------------------------------------------------------------
    # swapped GEMM (any M >= 1): out^T [N, M] = W [N, K] @ x^T [K, M], weights as the mma's A operand

    @triton.constexpr_function
    def _bipolar_pair_asm(bits, q, has_offset):
        """PTX for one slot pair (j, j + 16) of a plane word, two fp16 weights in one f16x2 register.

        Inputs $2..$9: plane words pre-shifted so that bit j of plane i sits at bit q + i (and bit j + 16 at
        q + i + 16); $10: 2s as f16x2; $11: offset as f16x2. One LOP3 per plane ORs the bit under the fp16
        exponent of 2^(10 - q), so each half reads 2^(10 - q) + u exactly; HADD2 subtracts 2^(10 - q) + L/2
        (exact: u - L/2), HMUL2 times 2s rounds once: (2u - L) s, the correctly rounded fp16 weight.
        """
        bits, q, has_offset = int(bits), int(q), bool(has_offset)
        L = (1 << bits) - 1
        mask = (1 << q) | (1 << (q + 16))
        magic = ((25 - q) << 10) * 0x10001
        v = float(1 << (10 - q)) + L / 2  # in [2, 640): a normal fp16 with spacing <= 0.5, written out by hand
        e = 1  # (Triton's dependency check rejects calls to module-level helpers from here)
        while v >= 2.0 ** (e + 1):
            e += 1
        c = (((e + 15) << 10) | int((v / 2.0 ** e - 1.0) * 1024)) * 0x10001
        lines = ["{", ".reg .b32 t, c;", f"lop3.b32 t, $2, {mask:#x}, {magic:#x}, 0xEA;"]
        for i in range(1, bits):
            lines.append(f"lop3.b32 t, ${2 + i}, {mask << i:#x}, t, 0xEA;")
        lines += [f"mov.b32 c, {c:#x};", "sub.rn.f16x2 t, t, c;", "mul.rn.f16x2 t, t, $10;"]
        if has_offset:
            lines.append("add.rn.f16x2 t, t, $11;")
        lines += ["mov.b32 {$0, $1}, t;", "}"]
        return "\n".join(lines)

    @triton.constexpr_function
    def _bcq_pair_asm(bits, j, has_offset):
        """PTX for one slot pair (j, j + 16) of BCQ: per plane, the bits are shifted to the fp16 sign positions
        (15, 31) and flip the sign of alpha_i (one SHF, one LOP3), then HADD2 sums the planes in order, in fp16.
        Inputs $2..$9: plane words; $10..$17: alpha_i as f16x2; $18: offset as f16x2."""
        bits, j, has_offset = int(bits), int(j), bool(has_offset)
        lines = ["{", ".reg .b32 t, a;"]
        for i in range(bits):
            src = f"${2 + i}"
            if j < 15:
                lines.append(f"shl.b32 t, {src}, {15 - j};")
                src = "t"
            # (~t & 0x80008000) ^ alpha: bit 0 -> -alpha, bit 1 -> +alpha
            dst = "a" if i == 0 else "t"
            lines.append(f"lop3.b32 {dst}, {src}, 0x80008000, ${10 + i}, 0xA6;")
            if i > 0:
                lines.append("add.rn.f16x2 a, a, t;")
        if has_offset:
            lines.append("add.rn.f16x2 a, a, $18;")
        lines += ["mov.b32 {$0, $1}, a;", "}"]
        return "\n".join(lines)

    @triton.jit
    def _pair16(v):
        """fp16 tensor -> int32 holding its bits in both halves (an f16x2 of (v, v))."""
        b = v.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return b | (b << 16)

    @triton.jit
    def _halves(t):
        """int32 -> (low half, high half) read as fp16."""
        lo = (t & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        hi = ((t >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        return lo, hi

    @triton.jit
    def _shift_to(w, r: tl.constexpr, i: tl.constexpr):
        """w >> (r - i) (or << (i - r)): bit j of w moves to j - r + i."""
        if r >= i:
            return w >> (r - i)
        else:
            return w << (i - r)

    @triton.jit
    def _a_pair(c0, c1, c2, c3, c4, c5, c6, c7, w0, w1, w2, w3, w4, w5, w6, w7, s2, o2,
                a0, a1, a2, a3, a4, a5, a6, a7, o, jj: tl.constexpr, q: tl.constexpr,
                BITS: tl.constexpr, BCQ: tl.constexpr, HAS_OFFSET: tl.constexpr, MODE: tl.constexpr):
        """Weights of slots jj and jj + 16 of a [BN, BKW] word tile, as two fp16 (MODE 1, 2) or fp32 (MODE 0)
        tensors [BN, BKW]. c*: plane words pre-shifted for this slot's window (bipolar, bit jj of plane i at bit
        q + i); w*: raw plane words; s2 / o2 / a*: f16x2 pairs (MODE 2) or fp16 (MODE 1) or fp32 (MODE 0).
        MODE 2 is the PTX of `_bipolar_pair_asm` / `_bcq_pair_asm`; MODE 1 computes exactly the same fp16
        arithmetic in plain Triton (the CPU interpreter's path); MODE 0 rebuilds in fp32 (bf16 activations)."""
        L: tl.constexpr = (1 << BITS) - 1
        if MODE == 2:
            if BCQ:
                lo, hi = tl.inline_asm_elementwise(
                    _bcq_pair_asm(BITS, jj, HAS_OFFSET), "=h,=h" + ",r" * 17,
                    [w0, w1, w2, w3, w4, w5, w6, w7, a0, a1, a2, a3, a4, a5, a6, a7, o2],
                    dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
            else:
                lo, hi = tl.inline_asm_elementwise(
                    _bipolar_pair_asm(BITS, q, HAS_OFFSET), "=h,=h" + ",r" * 10,
                    [c0, c1, c2, c3, c4, c5, c6, c7, s2, o2],
                    dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
        elif MODE == 1:
            if BCQ:
                lo, hi = _bcq_pair(w0, w1, w2, w3, w4, w5, w6, w7, a0, a1, a2, a3, a4, a5, a6, a7, jj, BITS)
            else:
                lo, hi = _h2_pair_twin(c0, c1, c2, c3, c4, c5, c6, c7, q, BITS)  # u - L/2, exact in fp16
                lo = lo * s2
                hi = hi * s2
            if HAS_OFFSET:
                lo += o2
                hi += o2
        else:
            if BCQ:
                lo, hi = _bcq_pair(w0, w1, w2, w3, w4, w5, w6, w7, a0, a1, a2, a3, a4, a5, a6, a7, jj, BITS)
            else:  # u from the float32 exponent trick (one slot at a time: 23 mantissa bits hold any u)
                l0, h0, l1, h1, l2, h2, l3, h3, l4, h4, l5, h5, l6, h6, l7, h7 = _pair_words(
                    w0, w1, w2, w3, w4, w5, w6, w7, BITS)
                lo = _u_slot(l0, h0, l1, h1, l2, h2, l3, h3, l4, h4, l5, h5, l6, h6, l7, h7, jj, BITS)
                hi = _u_slot(l0, h0, l1, h1, l2, h2, l3, h3, l4, h4, l5, h5, l6, h6, l7, h7, jj + 16, BITS)
                lo = (2.0 * lo - L) * s2
                hi = (2.0 * hi - L) * s2
            if HAS_OFFSET:
                lo += o
                hi += o
        return lo, hi

    @triton.jit
    def _bcq_pair(w0, w1, w2, w3, w4, w5, w6, w7, a0, a1, a2, a3, a4, a5, a6, a7, jj: tl.constexpr,
                  BITS: tl.constexpr):
        """BCQ levels of slots jj (lo) and jj + 16 (hi): sum over planes b < BITS of +-alpha_b by the plane's bit."""
        lo = tl.where(((w0 >> jj) & 1) != 0, a0, -a0)
        hi = tl.where(((w0 >> (jj + 16)) & 1) != 0, a0, -a0)
        if BITS > 1:
            lo += tl.where(((w1 >> jj) & 1) != 0, a1, -a1)
            hi += tl.where(((w1 >> (jj + 16)) & 1) != 0, a1, -a1)
        if BITS > 2:
            lo += tl.where(((w2 >> jj) & 1) != 0, a2, -a2)
            hi += tl.where(((w2 >> (jj + 16)) & 1) != 0, a2, -a2)
        if BITS > 3:
            lo += tl.where(((w3 >> jj) & 1) != 0, a3, -a3)
            hi += tl.where(((w3 >> (jj + 16)) & 1) != 0, a3, -a3)
        if BITS > 4:
            lo += tl.where(((w4 >> jj) & 1) != 0, a4, -a4)
            hi += tl.where(((w4 >> (jj + 16)) & 1) != 0, a4, -a4)
        if BITS > 5:
            lo += tl.where(((w5 >> jj) & 1) != 0, a5, -a5)
            hi += tl.where(((w5 >> (jj + 16)) & 1) != 0, a5, -a5)
        if BITS > 6:
            lo += tl.where(((w6 >> jj) & 1) != 0, a6, -a6)
            hi += tl.where(((w6 >> (jj + 16)) & 1) != 0, a6, -a6)
        if BITS > 7:
            lo += tl.where(((w7 >> jj) & 1) != 0, a7, -a7)
            hi += tl.where(((w7 >> (jj + 16)) & 1) != 0, a7, -a7)
        return lo, hi

    @triton.jit
    def _pair_words(w0, w1, w2, w3, w4, w5, w6, w7, BITS: tl.constexpr):
        """The pre-shifted words `_u_slot` reads (as `_all_planes` makes them, from words already loaded)."""
        l0 = ((w0 << 0) & 0x007FFFFF) | 0x4B000000
        h0 = (((w0 >> 16) << 0) & 0x007FFFFF) | 0x4B000000
        l1, h1 = w1 << 1, (w1 >> 16) << 1
        l2, h2 = w2 << 2, (w2 >> 16) << 2
        l3, h3 = w3 << 3, (w3 >> 16) << 3
        l4, h4 = w4 << 4, (w4 >> 16) << 4
        l5, h5 = w5 << 5, (w5 >> 16) << 5
        l6, h6 = w6 << 6, (w6 >> 16) << 6
        l7, h7 = w7 << 7, (w7 >> 16) << 7
        return l0, h0, l1, h1, l2, h2, l3, h3, l4, h4, l5, h5, l6, h6, l7, h7

    @triton.jit
    def _xperm_kernel(x_ptr, xp_ptr, M, K, stride_xm, stride_pm, JOIN: tl.constexpr, BLOCK_KW: tl.constexpr,
                      BLOCK_R: tl.constexpr):
        """Activations in the order `_gemm_t_kernel` (XP) reads them: inside K tile t (BK = 32 BLOCK_KW), slot
        pair jj takes one contiguous run. JOIN: xp[m, t BK + jj 2 BKW + 2 i + h] = x[m, (t BKW + i) 32 + jj + 16 h];
        else xp[m, t BK + j BKW + i] = x[m, (t BKW + i) 32 + j]. Zero past K."""
        t = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        i = tl.arange(0, BLOCK_KW)[:, None]  # [BKW, 1]
        j = tl.arange(0, 32)[None, :]  # [1, 32]
        src = (t * BLOCK_KW + i) * 32 + j  # [BKW, 32], contiguous
        if JOIN:
            dst = t * (BLOCK_KW * 32) + (j % 16) * (2 * BLOCK_KW) + 2 * i + j // 16
        else:
            dst = t * (BLOCK_KW * 32) + j * BLOCK_KW + i
        rm = (rows < M)[:, None, None]
        v = tl.load(x_ptr + rows[:, None, None] * stride_xm + src[None, :, :], mask=rm & (src < K)[None, :, :],
                    other=0.0)
        tl.store(xp_ptr + rows[:, None, None] * stride_pm + dst[None, :, :], v, mask=rm)

    @triton.jit
    def _gemm_t_kernel(x_ptr, pl_ptr, c_ptr, o_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
                       M, N, K, KW, G, group_size, stride_xm, stride_om, k_iters, split_k,
                       BITS: tl.constexpr, BCQ: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                       MODE: tl.constexpr, JOIN: tl.constexpr, XP: tl.constexpr, DOT_F32: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                       GROUP_M: tl.constexpr):
        # x: [M, K]; planes: [BITS, KW, N] int32; c: scales [G, N] or alphas [BITS, G, N]; out: [M, N].
        # Word tile [BN, BKW] per plane; slot pair (jj, jj + 16) of every word -> two fp16 A tiles [BN, BKW]
        # (k = 32 kw + jj and 32 kw + jj + 16), dotted with x^T rows of those k: [BKW, BM] each (JOIN 0), or
        # joined into one [BN, 2 BKW] operand (k' = 2 kw + h) against one [2 BKW, BM] tile (JOIN 1).
        # Scales / alphas / offsets go into A per word (a word never straddles a group), so K tiles may span
        # groups. acc [BN, BM] fp32; M is the mma's N (>= 16). XP: x_ptr is `_xperm_kernel`'s output (stride_xm
        # its row stride), so each pair's B tile is one contiguous run per row (async copies, no gathers).
        DT = x_ptr.dtype.element_ty
        pid_m, pid_n = grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        pid_k = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        rw = tl.arange(0, BLOCK_KW)
        r2 = tl.arange(0, 2 * BLOCK_KW)
        plane_stride = KW * N
        coef_stride = G * N
        # slot positions one pre-shifted copy serves: u sits at bits q..q+BITS-1 of the fp16 mantissa with
        # 1 <= q <= 10 - BITS (q >= 1 keeps 2^(10 - q) + L/2 exact in fp16)
        WIN: tl.constexpr = 10 - BITS
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        kw_begin = pid_k * k_iters * BLOCK_KW
        for it in range(k_iters):
            kw0 = kw_begin + it * BLOCK_KW
            kw = kw0 + rw
            wmask = n_mask[:, None] & (kw < KW)[None, :]
            wp = pl_ptr + kw[None, :] * N + offs_n[:, None]  # [BN, BKW]
            cp = tl.minimum((kw * 32) // group_size, G - 1)[None, :] * N + offs_n[:, None]
            w0 = tl.load(wp, mask=wmask, other=0)
            w1, w2, w3, w4, w5, w6, w7 = w0, w0, w0, w0, w0, w0, w0
            if BITS > 1:
                w1 = tl.load(wp + plane_stride, mask=wmask, other=0)
            if BITS > 2:
                w2 = tl.load(wp + 2 * plane_stride, mask=wmask, other=0)
            if BITS > 3:
                w3 = tl.load(wp + 3 * plane_stride, mask=wmask, other=0)
            if BITS > 4:
                w4 = tl.load(wp + 4 * plane_stride, mask=wmask, other=0)
            if BITS > 5:
                w5 = tl.load(wp + 5 * plane_stride, mask=wmask, other=0)
            if BITS > 6:
                w6 = tl.load(wp + 6 * plane_stride, mask=wmask, other=0)
            if BITS > 7:
                w7 = tl.load(wp + 7 * plane_stride, mask=wmask, other=0)
            # per-word coefficients, in the form `_a_pair` takes for this MODE
            o = tl.zeros([BLOCK_N, BLOCK_KW], dtype=DT)
            if HAS_OFFSET:
                o = tl.load(o_ptr + cp, mask=wmask, other=0.0)
            s2 = o
            a0, a1, a2, a3, a4, a5, a6, a7 = o, o, o, o, o, o, o, o
            if BCQ:
                a0 = tl.load(c_ptr + cp, mask=wmask, other=0.0)
                a1, a2, a3, a4, a5, a6, a7 = a0, a0, a0, a0, a0, a0, a0
                if BITS > 1:
                    a1 = tl.load(c_ptr + coef_stride + cp, mask=wmask, other=0.0)
                if BITS > 2:
                    a2 = tl.load(c_ptr + 2 * coef_stride + cp, mask=wmask, other=0.0)
                if BITS > 3:
                    a3 = tl.load(c_ptr + 3 * coef_stride + cp, mask=wmask, other=0.0)
                if BITS > 4:
                    a4 = tl.load(c_ptr + 4 * coef_stride + cp, mask=wmask, other=0.0)
                if BITS > 5:
                    a5 = tl.load(c_ptr + 5 * coef_stride + cp, mask=wmask, other=0.0)
                if BITS > 6:
                    a6 = tl.load(c_ptr + 6 * coef_stride + cp, mask=wmask, other=0.0)
                if BITS > 7:
                    a7 = tl.load(c_ptr + 7 * coef_stride + cp, mask=wmask, other=0.0)
            else:
                s2 = tl.load(c_ptr + cp, mask=wmask, other=0.0)
            if MODE == 0:
                s2 = s2.to(tl.float32)
                o = o.to(tl.float32)
                if BCQ:
                    a0, a1, a2, a3 = a0.to(tl.float32), a1.to(tl.float32), a2.to(tl.float32), a3.to(tl.float32)
                    a4, a5, a6, a7 = a4.to(tl.float32), a5.to(tl.float32), a6.to(tl.float32), a7.to(tl.float32)
            else:
                s2 = (s2 * 2.0).to(tl.float16)  # 2 s, exact
                o = o.to(tl.float16)
            o2 = o
            if MODE == 2:  # f16x2 pairs (v, v) for the PTX
                s2 = _pair16(s2)
                o2 = _pair16(o)
                if BCQ:
                    a0, a1, a2, a3 = _pair16(a0), _pair16(a1), _pair16(a2), _pair16(a3)
                    a4, a5, a6, a7 = _pair16(a4), _pair16(a5), _pair16(a6), _pair16(a7)
            c0, c1, c2, c3, c4, c5, c6, c7 = w0, w1, w2, w3, w4, w5, w6, w7
            for jj in tl.static_range(16):
                if not BCQ and MODE != 0 and jj % WIN == 0:  # a new window: pre-shift every plane once
                    c0 = _shift_to(w0, (jj // WIN) * WIN - 1, 0)  # bit jj of plane i -> bit 1 + jj % WIN + i
                    c1 = _shift_to(w1, (jj // WIN) * WIN - 1, 1)
                    c2 = _shift_to(w2, (jj // WIN) * WIN - 1, 2)
                    c3 = _shift_to(w3, (jj // WIN) * WIN - 1, 3)
                    c4 = _shift_to(w4, (jj // WIN) * WIN - 1, 4)
                    c5 = _shift_to(w5, (jj // WIN) * WIN - 1, 5)
                    c6 = _shift_to(w6, (jj // WIN) * WIN - 1, 6)
                    c7 = _shift_to(w7, (jj // WIN) * WIN - 1, 7)
                lo, hi = _a_pair(c0, c1, c2, c3, c4, c5, c6, c7, w0, w1, w2, w3, w4, w5, w6, w7, s2, o2,
                                 a0, a1, a2, a3, a4, a5, a6, a7, o, jj, 1 + jj % WIN, BITS, BCQ, HAS_OFFSET, MODE)
                lo = lo.to(DT)
                hi = hi.to(DT)
                if JOIN:
                    a = tl.reshape(tl.join(lo, hi), [BLOCK_N, 2 * BLOCK_KW])  # k' = 2 kw + h
                    if XP:
                        kx = kw0 * 32 + jj * (2 * BLOCK_KW) + r2
                        xb = tl.load(x_ptr + offs_m[None, :] * stride_xm + kx[:, None],
                                     mask=m_mask[None, :], other=0.0)
                    else:
                        kx = (kw0 + r2 // 2) * 32 + jj + 16 * (r2 % 2)  # [2 BKW]
                        xb = tl.load(x_ptr + offs_m[None, :] * stride_xm + kx[:, None],
                                     mask=m_mask[None, :] & (kx < K)[:, None], other=0.0)
                    if DOT_F32:
                        acc = tl.dot(a.to(tl.float32), xb.to(tl.float32), acc)
                    else:
                        acc = tl.dot(a, xb, acc)
                else:
                    if XP:
                        k_lo = kw0 * 32 + jj * BLOCK_KW + rw
                        xl = tl.load(x_ptr + offs_m[None, :] * stride_xm + k_lo[:, None],
                                     mask=m_mask[None, :], other=0.0)
                        xh = tl.load(x_ptr + offs_m[None, :] * stride_xm + (k_lo + 16 * BLOCK_KW)[:, None],
                                     mask=m_mask[None, :], other=0.0)
                    else:
                        k_lo = kw * 32 + jj
                        xl = tl.load(x_ptr + offs_m[None, :] * stride_xm + k_lo[:, None],
                                     mask=m_mask[None, :] & (k_lo < K)[:, None], other=0.0)
                        xh = tl.load(x_ptr + offs_m[None, :] * stride_xm + (k_lo + 16)[:, None],
                                     mask=m_mask[None, :] & (k_lo + 16 < K)[:, None], other=0.0)
                    if DOT_F32:
                        acc = tl.dot(lo.to(tl.float32), xl.to(tl.float32), acc)
                        acc = tl.dot(hi.to(tl.float32), xh.to(tl.float32), acc)
                    else:
                        acc = tl.dot(lo, xl, acc)
                        acc = tl.dot(hi, xh, acc)
        _epilogue(tl.trans(acc), offs_m, offs_n, M, N, out_ptr, stride_om, b_ptr, ws_ptr, cnt_ptr,
                  pid_m * tl.cdiv(N, BLOCK_N) + pid_n, split_k, HAS_BIAS)

    # ----------------------------------------------------------------------------------------------------------
    # M == 1, two weights per instruction (bipolar, fp16 x): the slot pair (j, j + 16) of a word as one f16x2

    @triton.constexpr_function
    def _h2_sub_const(bits, q):
        """f16x2 bits of (2^(10 - q) + L/2, same): what the exact HSUB2 takes away (a normal fp16 in [2, 640) with
        spacing <= 0.5, written out by hand: Triton's dependency check rejects module-level helpers here)."""
        bits, q = int(bits), int(q)
        v = float(1 << (10 - q)) + ((1 << bits) - 1) / 2
        e = 1
        while v >= 2.0 ** (e + 1):
            e += 1
        return (((e + 15) << 10) | int((v / 2.0 ** e - 1.0) * 1024)) * 0x10001

    @triton.constexpr_function
    def _gemv_pair_asm(bits, q, s=0):
        """PTX: h += (w_j - L/2, w_(j+16) - L/2) * (x_j, x_(j+16)) as one HFMA2, after the LOP3s and the exact HSUB2
        of `_bipolar_pair_asm` (same inputs $1..$8 as its $2..$9; $9: x pair, $10: the f16x2 partial sum). s > 0
        (the deep GEMV's wide chunks): the fp16 exponent and the subtracted constant are 2^-s smaller, so the
        exact HSUB2 leaves (w - L/2) 2^-s and each product is 2^-s smaller (s = 0: the string as before)."""
        bits, q, s = int(bits), int(q), int(s)
        mask = (1 << q) | (1 << (q + 16))
        magic = ((25 - q - s) << 10) * 0x10001
        c = _h2_sub_const(bits, q) - (s << 10) * 0x10001
        lines = ["{", ".reg .b32 t, c;", f"lop3.b32 t, $1, {mask:#x}, {magic:#x}, 0xEA;"]
        for i in range(1, bits):
            lines.append(f"lop3.b32 t, ${1 + i}, {mask << i:#x}, t, 0xEA;")
        lines += [f"mov.b32 c, {c:#x};", "sub.rn.f16x2 t, t, c;", "fma.rn.f16x2 $0, t, $9, $10;", "}"]
        return "\n".join(lines)

    @triton.constexpr_function
    def _gemv_pair_f32_asm(bits, q):
        """PTX: (w_j - L/2, w_(j+16) - L/2) as two exact fp32 ($0, $1): the LOP3s, the exact HSUB2, two cvt (inputs
        $2..$9 as `_bipolar_pair_asm`'s). The caller multiplies by fp32 x: a product of an fp16 half-integer
        (<= 9 significant bits) and an fp16 x (11) is exact in fp32, so FFMA and mul + add round alike."""
        bits, q = int(bits), int(q)
        mask = (1 << q) | (1 << (q + 16))
        magic = ((25 - q) << 10) * 0x10001
        c = _h2_sub_const(bits, q)
        lines = ["{", ".reg .b32 t, c;", ".reg .b16 l, h;", f"lop3.b32 t, $2, {mask:#x}, {magic:#x}, 0xEA;"]
        for i in range(1, bits):
            lines.append(f"lop3.b32 t, ${2 + i}, {mask << i:#x}, t, 0xEA;")
        lines += [f"mov.b32 c, {c:#x};", "sub.rn.f16x2 t, t, c;", "mov.b32 {l, h}, t;", "cvt.f32.f16 $0, l;",
                  "cvt.f32.f16 $1, h;", "}"]
        return "\n".join(lines)

    @triton.jit
    def _fma16(a, b, c):
        """fp16 a * b + c rounded once (HFMA2's rule), for the interpreter: exact in fp64, then one rounding."""
        return (a.to(tl.float64) * b.to(tl.float64) + c.to(tl.float64)).to(tl.float16)

    @triton.jit
    def _ld(p, mask, EVEN: tl.constexpr):
        """Load, masked (zero fill) unless every tile is full."""
        if EVEN:
            return tl.load(p)
        else:
            return tl.load(p, mask=mask, other=0)

    @triton.jit
    def _h2_pair_twin(c0, c1, c2, c3, c4, c5, c6, c7, q: tl.constexpr, BITS: tl.constexpr, S: tl.constexpr = 0):
        """Plain-Triton twin of the pair PTX's first steps: the same LOP3 bits, then the exact subtraction ->
        (u_j - L/2, u_(j+16) - L/2) 2^-S as two fp16 tensors."""
        L: tl.constexpr = (1 << BITS) - 1
        M0: tl.constexpr = (1 << q) | (1 << (q + 16))
        f = (c0 & M0) | (((25 - q - S) << 10) * 0x10001)
        if BITS > 1:
            f = f | (c1 & (M0 << 1))
        if BITS > 2:
            f = f | (c2 & (M0 << 2))
        if BITS > 3:
            f = f | (c3 & (M0 << 3))
        if BITS > 4:
            f = f | (c4 & (M0 << 4))
        if BITS > 5:
            f = f | (c5 & (M0 << 5))
        if BITS > 6:
            f = f | (c6 & (M0 << 6))
        if BITS > 7:
            f = f | (c7 & (M0 << 7))
        lo, hi = _halves(f)  # (2^(10 - q) + u) 2^-S, exact
        cst = tl.full([1, 1], ((1 << (10 - q)) + L * 0.5) / (1 << S), tl.float16)
        return lo - cst, hi - cst

    @triton.jit
    def _h2_words(pl_ptr, kw0, rw, offs_n, n_mask, KW, N, BITS: tl.constexpr, EVEN: tl.constexpr):
        """Plane words of one tile: 8 tensors [BKW, BN] int32 (planes >= BITS repeat plane 0, never read)."""
        kw = kw0 + rw
        wmask = (kw[:, None] < KW) & n_mask[None, :]
        wp = pl_ptr + kw[:, None] * N + offs_n[None, :]
        plane_stride = KW * N
        w0 = _ld(wp, wmask, EVEN)
        w1, w2, w3, w4, w5, w6, w7 = w0, w0, w0, w0, w0, w0, w0
        if BITS > 1:
            w1 = _ld(wp + plane_stride, wmask, EVEN)
        if BITS > 2:
            w2 = _ld(wp + 2 * plane_stride, wmask, EVEN)
        if BITS > 3:
            w3 = _ld(wp + 3 * plane_stride, wmask, EVEN)
        if BITS > 4:
            w4 = _ld(wp + 4 * plane_stride, wmask, EVEN)
        if BITS > 5:
            w5 = _ld(wp + 5 * plane_stride, wmask, EVEN)
        if BITS > 6:
            w6 = _ld(wp + 6 * plane_stride, wmask, EVEN)
        if BITS > 7:
            w7 = _ld(wp + 7 * plane_stride, wmask, EVEN)
        return w0, w1, w2, w3, w4, w5, w6, w7

    @triton.jit
    def _h2_tile(acc, w0, w1, w2, w3, w4, w5, w6, w7, x_ptr, c_ptr, o_ptr, kw0, rw, offs_n, n_mask, K, N, G,
                 group_size, BITS: tl.constexpr, HAS_OFFSET: tl.constexpr, MODE: tl.constexpr, CHUNK: tl.constexpr,
                 EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
        """acc [BKW, BN] fp32 += this tile's products (the tile lies inside one group)."""
        kb = (kw0 + rw) * 32
        WIN: tl.constexpr = 10 - BITS
        g = tl.minimum((kw0 * 32) // group_size, G - 1)
        t = tl.zeros([BLOCK_KW, BLOCK_N], dtype=tl.float32)
        h = tl.zeros([BLOCK_KW, BLOCK_N], dtype=tl.int32)  # MODE 2: f16x2 (0, 0)
        hl = tl.zeros([BLOCK_KW, BLOCK_N], dtype=tl.float16)  # MODE 1: its two halves
        hh = tl.zeros([BLOCK_KW, BLOCK_N], dtype=tl.float16)
        c0, c1, c2, c3, c4, c5, c6, c7 = w0, w1, w2, w3, w4, w5, w6, w7
        for jj in tl.static_range(16):
            if jj % WIN == 0:  # a new window: pre-shift every plane once (bit jj of plane i -> 1 + jj % WIN + i)
                c0 = _shift_to(w0, (jj // WIN) * WIN - 1, 0)
                c1 = _shift_to(w1, (jj // WIN) * WIN - 1, 1)
                c2 = _shift_to(w2, (jj // WIN) * WIN - 1, 2)
                c3 = _shift_to(w3, (jj // WIN) * WIN - 1, 3)
                c4 = _shift_to(w4, (jj // WIN) * WIN - 1, 4)
                c5 = _shift_to(w5, (jj // WIN) * WIN - 1, 5)
                c6 = _shift_to(w6, (jj // WIN) * WIN - 1, 6)
                c7 = _shift_to(w7, (jj // WIN) * WIN - 1, 7)
            xl = _ld(x_ptr + kb + jj, kb + jj < K, EVEN)[:, None]  # [BKW, 1] fp16
            xh = _ld(x_ptr + kb + jj + 16, kb + jj + 16 < K, EVEN)[:, None]
            if CHUNK == 0:  # exact fp32 products, fp32 sums (any bits; no bound on x)
                if MODE == 2:
                    dl, dh = tl.inline_asm_elementwise(
                        _gemv_pair_f32_asm(BITS, 1 + jj % WIN), "=r,=r" + ",r" * 8, [c0, c1, c2, c3, c4, c5, c6, c7],
                        dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
                else:
                    dl, dh = _h2_pair_twin(c0, c1, c2, c3, c4, c5, c6, c7, 1 + jj % WIN, BITS)
                    dl, dh = dl.to(tl.float32), dh.to(tl.float32)
                t = t + dl * xl.to(tl.float32)
                t = t + dh * xh.to(tl.float32)
            else:
                if MODE == 2:
                    x2 = tl.inline_asm_elementwise("mov.b32 $0, {$1, $2};", "=r,h,h", [xl, xh], dtype=tl.int32,
                                                   is_pure=True, pack=1)
                    h = tl.inline_asm_elementwise(_gemv_pair_asm(BITS, 1 + jj % WIN), "=r" + ",r" * 10,
                                                  [c0, c1, c2, c3, c4, c5, c6, c7, x2, h], dtype=tl.int32,
                                                  is_pure=True, pack=1)
                else:
                    dl, dh = _h2_pair_twin(c0, c1, c2, c3, c4, c5, c6, c7, 1 + jj % WIN, BITS)
                    hl = _fma16(dl, xl, hl)
                    hh = _fma16(dh, xh, hh)
                if jj % CHUNK == CHUNK - 1:  # the f16x2 partial into fp32: t += (low + high)
                    if MODE == 2:
                        fl, fh = tl.inline_asm_elementwise(
                            "{.reg .b16 l, h; mov.b32 {l, h}, $2; cvt.f32.f16 $0, l; cvt.f32.f16 $1, h;}",
                            "=r,=r,r", [h], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
                        t += fl + fh
                        h = tl.zeros([BLOCK_KW, BLOCK_N], dtype=tl.int32)
                    else:
                        t += hl.to(tl.float32) + hh.to(tl.float32)
                        hl = tl.zeros([BLOCK_KW, BLOCK_N], dtype=tl.float16)
                        hh = tl.zeros([BLOCK_KW, BLOCK_N], dtype=tl.float16)
        s = tl.load(c_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += 2.0 * t * s[None, :]  # (2u - L) s = 2 s (u - L/2)
        if HAS_OFFSET:
            kk = kb[:, None] + tl.arange(0, 32)[None, :]
            xsum = tl.sum(tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32), axis=1)
            o = tl.load(o_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            acc += xsum[:, None] * o[None, :]
        return acc

    @triton.jit
    def _h2_planes(acc, w0, w1, w2, w3, w4, w5, w6, w7, x_ptr, c_ptr, o_ptr, kw0, rw, offs_n, n_mask, K, N, G,
                   group_size, BITS: tl.constexpr, HAS_OFFSET: tl.constexpr, MODE: tl.constexpr,
                   CHUNK: tl.constexpr, EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                   BCQ: tl.constexpr):
        """One tile: bipolar as one BITS-bit tile; BCQ as BITS 1-bit tiles, plane i scaled by alphas[i]."""
        if BCQ:
            cs = G * N
            acc = _h2_tile(acc, w0, w0, w0, w0, w0, w0, w0, w0, x_ptr, c_ptr, o_ptr, kw0, rw, offs_n, n_mask, K, N,
                           G, group_size, 1, HAS_OFFSET, MODE, CHUNK, EVEN, BLOCK_N, BLOCK_KW)
            if BITS > 1:
                acc = _h2_tile(acc, w1, w1, w1, w1, w1, w1, w1, w1, x_ptr, c_ptr + cs, o_ptr, kw0, rw, offs_n,
                               n_mask, K, N, G, group_size, 1, False, MODE, CHUNK, EVEN, BLOCK_N, BLOCK_KW)
            if BITS > 2:
                acc = _h2_tile(acc, w2, w2, w2, w2, w2, w2, w2, w2, x_ptr, c_ptr + 2 * cs, o_ptr, kw0, rw, offs_n,
                               n_mask, K, N, G, group_size, 1, False, MODE, CHUNK, EVEN, BLOCK_N, BLOCK_KW)
            if BITS > 3:
                acc = _h2_tile(acc, w3, w3, w3, w3, w3, w3, w3, w3, x_ptr, c_ptr + 3 * cs, o_ptr, kw0, rw, offs_n,
                               n_mask, K, N, G, group_size, 1, False, MODE, CHUNK, EVEN, BLOCK_N, BLOCK_KW)
            if BITS > 4:
                acc = _h2_tile(acc, w4, w4, w4, w4, w4, w4, w4, w4, x_ptr, c_ptr + 4 * cs, o_ptr, kw0, rw, offs_n,
                               n_mask, K, N, G, group_size, 1, False, MODE, CHUNK, EVEN, BLOCK_N, BLOCK_KW)
            if BITS > 5:
                acc = _h2_tile(acc, w5, w5, w5, w5, w5, w5, w5, w5, x_ptr, c_ptr + 5 * cs, o_ptr, kw0, rw, offs_n,
                               n_mask, K, N, G, group_size, 1, False, MODE, CHUNK, EVEN, BLOCK_N, BLOCK_KW)
            if BITS > 6:
                acc = _h2_tile(acc, w6, w6, w6, w6, w6, w6, w6, w6, x_ptr, c_ptr + 6 * cs, o_ptr, kw0, rw, offs_n,
                               n_mask, K, N, G, group_size, 1, False, MODE, CHUNK, EVEN, BLOCK_N, BLOCK_KW)
            if BITS > 7:
                acc = _h2_tile(acc, w7, w7, w7, w7, w7, w7, w7, w7, x_ptr, c_ptr + 7 * cs, o_ptr, kw0, rw, offs_n,
                               n_mask, K, N, G, group_size, 1, False, MODE, CHUNK, EVEN, BLOCK_N, BLOCK_KW)
        else:
            acc = _h2_tile(acc, w0, w1, w2, w3, w4, w5, w6, w7, x_ptr, c_ptr, o_ptr, kw0, rw, offs_n, n_mask, K, N,
                           G, group_size, BITS, HAS_OFFSET, MODE, CHUNK, EVEN, BLOCK_N, BLOCK_KW)
        return acc

    @triton.constexpr_function
    def _pow2_at_least(n):
        return 1 << max(0, (int(n) - 1).bit_length())

    _PF = tl.constexpr("{\n.reg .pred p;\nsetp.gt.s32 p, $2, 0;\n@p cp.async.bulk.prefetch.L2.global [$1], $2;\n"
                       "mov.b32 $0, 0;\n}")

    @triton.jit
    def _l2_prefetch(addr, size):
        """cp.async.bulk.prefetch into L2 of `size` bytes (> 0; a multiple of 16) at byte address `addr` (16-byte
        aligned), elementwise; size <= 0 skips. Issued at a program's start for its whole working set, so that the
        HBM reads are in flight at once and the loads that follow hit L2 (sm_90)."""
        tl.inline_asm_elementwise(_PF, "=r,l,r", [addr, size], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _h2_prefetch(pl_ptr, c_ptr, kw_begin, pid_n, N, KW, G, group_size, BITS: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BCQ: tl.constexpr):
        """L2 prefetch of one program's plane words (ROWS word rows x BLOCK_N columns per plane, one chunk per row)
        and its first and last groups' scales (bipolar; N % 8 == 0)."""
        RP: tl.constexpr = _pow2_at_least(ROWS)
        c = tl.arange(0, 8 * RP)
        plane = tl.where(c % RP < ROWS, c // RP, BITS)  # padding rows: no prefetch
        row = kw_begin + c % RP
        n0 = pid_n * BLOCK_N
        cols = tl.minimum(N - n0, BLOCK_N)
        addr = pl_ptr.to(tl.int64) + ((plane * KW + row).to(tl.int64) * N + n0) * 4
        _l2_prefetch(addr, tl.where((plane < BITS) & (row < KW), cols * 4, 0))
        if not BCQ:
            j = tl.arange(0, 2)
            g = tl.minimum((tl.minimum(kw_begin + j * (ROWS - 1), KW - 1) * 32) // group_size, G - 1)
            _l2_prefetch(c_ptr.to(tl.int64) + (g.to(tl.int64) * N + n0) * 2, tl.where(N % 8 == 0, cols * 2, 0))

    @triton.jit
    def _gemv_h2_kernel(x_ptr, pl_ptr, c_ptr, o_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
                        N, K, KW, G, group_size, k_iters, split_k,
                        BITS: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, MODE: tl.constexpr,
                        CHUNK: tl.constexpr, EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                        UNROLL: tl.constexpr = 0, BCQ: tl.constexpr = False, PREFETCH: tl.constexpr = False):
        # x: [K] fp16; planes: [BITS, KW, N] int32; scales [G, N] (or BCQ alphas [BITS, G, N]); out: [N].
        # BCQ: plane-wise, each plane a 1-bit bipolar tile: d = 2 b - 1 = 2 (b - 1/2), alpha_i in place of s.
        # Tile [BKW words, BN]; slot pair (jj, jj + 16) of each word: BITS LOP3 (pre-shifted windows, as in
        # `_gemm_t_kernel`), one exact HSUB2 -> (u - L/2) for both slots, then either (CHUNK > 0) one HFMA2 with
        # the x pair into an f16x2 partial sum h, moved to fp32 (t) every CHUNK pairs, so each half sums at most
        # CHUNK products; or (CHUNK == 0) two cvt to fp32 and two exact-product FFMAs.
        # Per tile (inside one group): acc += 2 s t. MODE 2: PTX; MODE 1: the same fp16 rule in plain Triton.
        # UNROLL > 0: every split is exactly UNROLL tiles in straight-line code, the next tile's words loaded
        # before the current one is consumed (ptxas then issues them a tile ahead; a run-time loop it does not).
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        rw = tl.arange(0, BLOCK_KW)
        acc = tl.zeros([BLOCK_KW, BLOCK_N], dtype=tl.float32)
        kw_begin = pid_k * k_iters * BLOCK_KW
        if PREFETCH:  # the whole split's words (and scales) into L2 at once (needs N % 4 == 0, UNROLL > 0)
            _h2_prefetch(pl_ptr, c_ptr, kw_begin, pid_n, N, KW, G, group_size, BITS, UNROLL * BLOCK_KW, BLOCK_N, BCQ)
        if UNROLL > 0:
            w0, w1, w2, w3, w4, w5, w6, w7 = _h2_words(pl_ptr, kw_begin, rw, offs_n, n_mask, KW, N, BITS, EVEN)
            for i in tl.static_range(UNROLL):
                if i + 1 < UNROLL:
                    v0, v1, v2, v3, v4, v5, v6, v7 = _h2_words(pl_ptr, kw_begin + (i + 1) * BLOCK_KW, rw, offs_n,
                                                               n_mask, KW, N, BITS, EVEN)
                acc = _h2_planes(acc, w0, w1, w2, w3, w4, w5, w6, w7, x_ptr, c_ptr, o_ptr, kw_begin + i * BLOCK_KW,
                                 rw, offs_n, n_mask, K, N, G, group_size, BITS, HAS_OFFSET, MODE, CHUNK, EVEN,
                                 BLOCK_N, BLOCK_KW, BCQ)
                if i + 1 < UNROLL:
                    w0, w1, w2, w3, w4, w5, w6, w7 = v0, v1, v2, v3, v4, v5, v6, v7
        else:
            for it in range(k_iters):
                kw0 = kw_begin + it * BLOCK_KW
                w0, w1, w2, w3, w4, w5, w6, w7 = _h2_words(pl_ptr, kw0, rw, offs_n, n_mask, KW, N, BITS, EVEN)
                acc = _h2_planes(acc, w0, w1, w2, w3, w4, w5, w6, w7, x_ptr, c_ptr, o_ptr, kw0, rw, offs_n, n_mask,
                                 K, N, G, group_size, BITS, HAS_OFFSET, MODE, CHUNK, EVEN, BLOCK_N, BLOCK_KW, BCQ)
        res = tl.sum(acc, axis=0)  # [BN]
        _epilogue(res[None, :], tl.arange(0, 1), offs_n, 1, N, out_ptr, N, b_ptr, ws_ptr, cnt_ptr, pid_n, split_k,
                  HAS_BIAS)

    # ----------------------------------------------------------------------------------------------------------
    # M == 1, "deep" f16x2 GEMV: threads and warps along K as well as N, a program owns BLOCK_N columns and (with
    # split 1) the whole K, so no split-K epilogue; a run-time loop over tiles of ROWS word rows whose next DEPTH
    # tiles' words are loaded before the current one is consumed (register double buffering)

    @triton.constexpr_function
    def _h2_class_mask(bits, k):
        """Bit positions p with (p % 16) % bits == k (the same in both fp16 halves), as a signed int32 value."""
        bits, k = int(bits), int(k)
        v = sum(1 << p for p in range(32) if (p % 16) % bits == k)
        return v - (1 << 32) if v >= 1 << 31 else v

    @triton.constexpr_function
    def _h2_bsel_asm(k):
        return f"lop3.b32 $0, $1, $2, {int(k) & 0xFFFFFFFF:#x}, 0xE4;"

    @triton.jit
    def _h2_bsel(k: tl.constexpr, a, b, MODE: tl.constexpr):
        """Bits of a where k is set, of b elsewhere (one LOP3)."""
        if MODE == 2:
            return tl.inline_asm_elementwise(_h2_bsel_asm(k), "=r,r,r", [a, b], dtype=tl.int32, is_pure=True, pack=1)
        else:
            return b ^ ((a ^ b) & k)

    @triton.jit
    def _h2_merged(c0, c1, c2, c3, cls: tl.constexpr, BITS: tl.constexpr, MODE: tl.constexpr):
        """One word with the codes of every slot pair jj of class cls ((jj - start) % BITS == cls) of a window: the
        window's shifted plane words put plane i's bit of slot jj at q + i (q = jj - start + 1), i.e. at positions
        = cls + 1 + i (mod BITS), so the planes interleave without overlap (BITS - 1 bit selects; 2..4 bits)."""
        m = c0
        if BITS > 1:
            m = _h2_bsel(_h2_class_mask(BITS, (cls + 2) % BITS), c1, m, MODE)
        if BITS > 2:
            m = _h2_bsel(_h2_class_mask(BITS, (cls + 3) % BITS), c2, m, MODE)
        if BITS > 3:
            m = _h2_bsel(_h2_class_mask(BITS, (cls + 4) % BITS), c3, m, MODE)
        return m

    @triton.constexpr_function
    def _gemv_merged_pair_asm(bits, q, s=0):
        """PTX: h += (u_j - L/2, u_(j+16) - L/2) * (x_j, x_(j+16)) from a merged word ($1: the slot pair's codes at
        bits q.. and q + 16..): one LOP3 (mask, fp16 exponent of 2^(10 - q)), the exact HSUB2, one HFMA2 ($2: x pair,
        $3: the f16x2 partial sum). Same arithmetic as `_gemv_pair_asm` after its LOP3s (s: its 2^-s scaling)."""
        bits, q, s = int(bits), int(q), int(s)
        mask = (((1 << bits) - 1) << q) * 0x10001
        magic = ((25 - q - s) << 10) * 0x10001
        c = _h2_sub_const(bits, q) - (s << 10) * 0x10001
        return "\n".join(["{", ".reg .b32 t, c;", f"lop3.b32 t, $1, {mask:#x}, {magic:#x}, 0xEA;",
                          f"mov.b32 c, {c:#x};", "sub.rn.f16x2 t, t, c;", "fma.rn.f16x2 $0, t, $2, $3;", "}"])

    @triton.jit
    def _merged_twin(m, q: tl.constexpr, BITS: tl.constexpr, S: tl.constexpr = 0):
        """Plain-Triton twin of the merged pair's LOP3 and HSUB2 -> (u_j - L/2, u_(j+16) - L/2) 2^-S as two fp16."""
        L: tl.constexpr = (1 << BITS) - 1
        MASK: tl.constexpr = (((1 << BITS) - 1) << q) * 0x10001
        lo, hi = _halves((m & MASK) | (((25 - q - S) << 10) * 0x10001))
        cst = tl.full([1, 1], ((1 << (10 - q)) + L * 0.5) / (1 << S), tl.float16)
        return lo - cst, hi - cst

    @triton.jit
    def _x_pair_of(xl, xh, MODE: tl.constexpr):
        """Two fp16 tensors -> int32 holding the f16x2 (xl, xh)."""
        if MODE == 2:
            return tl.inline_asm_elementwise("mov.b32 $0, {$1, $2};", "=r,h,h", [xl, xh], dtype=tl.int32,
                                             is_pure=True, pack=1)
        else:
            return (xl.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | \
                (xh.to(tl.int16, bitcast=True).to(tl.int32) << 16)

    @triton.jit
    def _x_prmt(a, b, ODD: tl.constexpr, MODE: tl.constexpr):
        """f16x2 (a.lo, b.lo) (ODD 0) or (a.hi, b.hi) (ODD 1) of two int32 words holding x pairs: one PRMT."""
        if MODE == 2:
            sel: tl.constexpr = 0x7632 if ODD else 0x5410
            return tl.inline_asm_elementwise(f"prmt.b32 $0, $1, $2, {sel:#x};", "=r,r,r", [a, b], dtype=tl.int32,
                                             is_pure=True, pack=1)
        elif ODD:
            return ((a >> 16) & 0xFFFF) | (b & -65536)
        else:
            return (a & 0xFFFF) | (b << 16)

    @triton.jit
    def _deep_x(x_ptr, xw_ptr, kb, K, jj: tl.constexpr, XPAIR: tl.constexpr, EVEN: tl.constexpr,
                MODE: tl.constexpr):
        """The x pair (x_(kb+jj), x_(kb+jj+16)) of each row as an f16x2 in an int32 [ROWS, 1]. XPAIR: from two int32
        loads of x viewed as pairs (x_2a, x_2a+1) and one PRMT (K even); else two fp16 loads and one pack."""
        if XPAIR:
            ia = kb // 2 + jj // 2
            a = _ld(xw_ptr + ia, ia < K // 2, EVEN)
            b = _ld(xw_ptr + ia + 8, ia + 8 < K // 2, EVEN)
            v = _x_prmt(a, b, jj % 2, MODE)
        else:
            xl = _ld(x_ptr + kb + jj, kb + jj < K, EVEN)
            xh = _ld(x_ptr + kb + jj + 16, kb + jj + 16 < K, EVEN)
            v = _x_pair_of(xl, xh, MODE)
        return v[:, None]

    @triton.jit
    def _deep_tile(acc, w0, w1, w2, w3, w4, w5, w6, w7, x_ptr, xw_ptr, c_ptr, o_ptr, kw0, rw, offs_n, n_mask, K,
                   N, G, group_size, BITS: tl.constexpr, HAS_OFFSET: tl.constexpr, MODE: tl.constexpr,
                   CHUNK: tl.constexpr, EVEN: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
                   MERGE: tl.constexpr, XPAIR: tl.constexpr, XS: tl.constexpr = 0):
        """acc [ROWS, BN] fp32 += this tile's products; every word row has its own group (per-row scales), so a
        tile may span groups. The pair arithmetic is `_h2_tile`'s; MERGE (2..4 bits, CHUNK > 0): per window the
        planes are interleaved into BITS merged words (`_h2_merged`), then one LOP3 per slot pair whatever BITS.
        XS > 0 (CHUNK > 0): the fp16 weights are (u - L/2) 2^-XS (a smaller fp16 exponent, free), so CHUNK can be
        2^XS times longer for the same bound on |x|; the 2^XS comes back in fp32 with the scale."""
        kw = kw0 + rw
        kb = kw * 32
        WIN: tl.constexpr = 10 - BITS
        t = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        h = tl.zeros([ROWS, BLOCK_N], dtype=tl.int32)  # MODE 2: f16x2 (0, 0)
        hl = tl.zeros([ROWS, BLOCK_N], dtype=tl.float16)  # MODE 1: its two halves
        hh = tl.zeros([ROWS, BLOCK_N], dtype=tl.float16)
        c0, c1, c2, c3, c4, c5, c6, c7 = w0, w1, w2, w3, w4, w5, w6, w7
        m0, m1, m2, m3 = w0, w0, w0, w0
        for jj in tl.static_range(16):
            # window start (jj // WIN) * WIN, slot position q = 1 + jj % WIN (no constexpr assignments inside a
            # static loop: Triton 3.6 rejects redefining them)
            if jj % WIN == 0:  # a new window: pre-shift every plane once (bit jj of plane i -> q + i)
                c0 = _shift_to(w0, (jj // WIN) * WIN - 1, 0)
                c1 = _shift_to(w1, (jj // WIN) * WIN - 1, 1)
                c2 = _shift_to(w2, (jj // WIN) * WIN - 1, 2)
                c3 = _shift_to(w3, (jj // WIN) * WIN - 1, 3)
                c4 = _shift_to(w4, (jj // WIN) * WIN - 1, 4)
                c5 = _shift_to(w5, (jj // WIN) * WIN - 1, 5)
                c6 = _shift_to(w6, (jj // WIN) * WIN - 1, 6)
                c7 = _shift_to(w7, (jj // WIN) * WIN - 1, 7)
                if MERGE:
                    m0 = _h2_merged(c0, c1, c2, c3, 0, BITS, MODE)
                    if BITS > 1:
                        m1 = _h2_merged(c0, c1, c2, c3, 1, BITS, MODE)
                    if BITS > 2:
                        m2 = _h2_merged(c0, c1, c2, c3, 2, BITS, MODE)
                    if BITS > 3:
                        m3 = _h2_merged(c0, c1, c2, c3, 3, BITS, MODE)
            x2 = _deep_x(x_ptr, xw_ptr, kb, K, jj, XPAIR, EVEN, MODE)
            if CHUNK == 0:  # exact fp32 products, fp32 sums (any bits; no bound on x)
                xl, xh = _halves(x2)
                if MODE == 2:
                    dl, dh = tl.inline_asm_elementwise(
                        _gemv_pair_f32_asm(BITS, 1 + jj % WIN), "=r,=r" + ",r" * 8, [c0, c1, c2, c3, c4, c5, c6, c7],
                        dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
                else:
                    dl, dh = _h2_pair_twin(c0, c1, c2, c3, c4, c5, c6, c7, 1 + jj % WIN, BITS)
                    dl, dh = dl.to(tl.float32), dh.to(tl.float32)
                t = t + dl * xl.to(tl.float32)
                t = t + dh * xh.to(tl.float32)
            else:
                if MERGE:
                    m = m0  # the slot pair's class (jj - start) % BITS
                    if (jj % WIN) % BITS == 1:
                        m = m1
                    if (jj % WIN) % BITS == 2:
                        m = m2
                    if (jj % WIN) % BITS == 3:
                        m = m3
                    if MODE == 2:
                        h = tl.inline_asm_elementwise(_gemv_merged_pair_asm(BITS, 1 + jj % WIN, XS), "=r,r,r,r",
                                                      [m, x2, h], dtype=tl.int32, is_pure=True, pack=1)
                    else:
                        dl, dh = _merged_twin(m, 1 + jj % WIN, BITS, XS)
                        xl, xh = _halves(x2)
                        hl = _fma16(dl, xl, hl)
                        hh = _fma16(dh, xh, hh)
                else:
                    if MODE == 2:
                        h = tl.inline_asm_elementwise(_gemv_pair_asm(BITS, 1 + jj % WIN, XS), "=r" + ",r" * 10,
                                                      [c0, c1, c2, c3, c4, c5, c6, c7, x2, h], dtype=tl.int32,
                                                      is_pure=True, pack=1)
                    else:
                        dl, dh = _h2_pair_twin(c0, c1, c2, c3, c4, c5, c6, c7, 1 + jj % WIN, BITS, XS)
                        xl, xh = _halves(x2)
                        hl = _fma16(dl, xl, hl)
                        hh = _fma16(dh, xh, hh)
                if jj % CHUNK == CHUNK - 1:  # the f16x2 partial into fp32: t += (low + high)
                    if MODE == 2:
                        fl, fh = tl.inline_asm_elementwise(
                            "{.reg .b16 l, h; mov.b32 {l, h}, $2; cvt.f32.f16 $0, l; cvt.f32.f16 $1, h;}",
                            "=r,=r,r", [h], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
                        t += fl + fh
                        h = tl.zeros([ROWS, BLOCK_N], dtype=tl.int32)
                    else:
                        t += hl.to(tl.float32) + hh.to(tl.float32)
                        hl = tl.zeros([ROWS, BLOCK_N], dtype=tl.float16)
                        hh = tl.zeros([ROWS, BLOCK_N], dtype=tl.float16)
        g = tl.minimum(kb // group_size, G - 1)  # [ROWS]: each word lies inside one group
        cmask = (kw < (K + 31) // 32)[:, None] & n_mask[None, :]
        s = tl.load(c_ptr + g[:, None] * N + offs_n[None, :], mask=cmask, other=0.0).to(tl.float32)
        acc += (2.0 * (1 << XS)) * t * s  # (2u - L) s = 2 s (u - L/2), t carried 2^-XS
        if HAS_OFFSET:
            kk = kb[:, None] + tl.arange(0, 32)[None, :]
            xsum = tl.sum(tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32), axis=1)
            o = tl.load(o_ptr + g[:, None] * N + offs_n[None, :], mask=cmask, other=0.0).to(tl.float32)
            acc += xsum[:, None] * o
        return acc

    @triton.jit
    def _deep_words(pl_ptr, kw0, kw_end, rw, offs_n, n_mask, KW, N, BITS: tl.constexpr):
        """Plane words of the tile at kw0: 8 tensors [ROWS, BN] int32, rows at or past kw_end read as 0 (not loaded);
        planes >= BITS repeat plane 0, never read."""
        kw = kw0 + rw
        wmask = (kw < kw_end)[:, None] & n_mask[None, :]
        wp = pl_ptr + kw[:, None] * N + offs_n[None, :]
        plane_stride = KW * N
        w0 = tl.load(wp, mask=wmask, other=0)
        w1, w2, w3, w4, w5, w6, w7 = w0, w0, w0, w0, w0, w0, w0
        if BITS > 1:
            w1 = tl.load(wp + plane_stride, mask=wmask, other=0)
        if BITS > 2:
            w2 = tl.load(wp + 2 * plane_stride, mask=wmask, other=0)
        if BITS > 3:
            w3 = tl.load(wp + 3 * plane_stride, mask=wmask, other=0)
        if BITS > 4:
            w4 = tl.load(wp + 4 * plane_stride, mask=wmask, other=0)
        if BITS > 5:
            w5 = tl.load(wp + 5 * plane_stride, mask=wmask, other=0)
        if BITS > 6:
            w6 = tl.load(wp + 6 * plane_stride, mask=wmask, other=0)
        if BITS > 7:
            w7 = tl.load(wp + 7 * plane_stride, mask=wmask, other=0)
        return w0, w1, w2, w3, w4, w5, w6, w7

    @triton.jit
    def _deep_planes(acc, w0, w1, w2, w3, w4, w5, w6, w7, x_ptr, xw_ptr, c_ptr, o_ptr, kw0, rw, offs_n, n_mask, K,
                     N, G, group_size, BITS: tl.constexpr, HAS_OFFSET: tl.constexpr, MODE: tl.constexpr,
                     CHUNK: tl.constexpr, EVEN: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
                     MERGE: tl.constexpr, XPAIR: tl.constexpr, BCQ: tl.constexpr, XS: tl.constexpr = 0):
        """One tile: bipolar as one BITS-bit tile; BCQ as BITS 1-bit tiles, plane i scaled by alphas[i]."""
        if BCQ:
            cs = G * N
            acc = _deep_tile(acc, w0, w0, w0, w0, w0, w0, w0, w0, x_ptr, xw_ptr, c_ptr, o_ptr, kw0, rw, offs_n,
                             n_mask, K, N, G, group_size, 1, HAS_OFFSET, MODE, CHUNK, EVEN, BLOCK_N, ROWS, False,
                             XPAIR)
            if BITS > 1:
                acc = _deep_tile(acc, w1, w1, w1, w1, w1, w1, w1, w1, x_ptr, xw_ptr, c_ptr + cs, o_ptr, kw0, rw,
                                 offs_n, n_mask, K, N, G, group_size, 1, False, MODE, CHUNK, EVEN, BLOCK_N, ROWS,
                                 False, XPAIR)
            if BITS > 2:
                acc = _deep_tile(acc, w2, w2, w2, w2, w2, w2, w2, w2, x_ptr, xw_ptr, c_ptr + 2 * cs, o_ptr, kw0, rw,
                                 offs_n, n_mask, K, N, G, group_size, 1, False, MODE, CHUNK, EVEN, BLOCK_N, ROWS,
                                 False, XPAIR)
            if BITS > 3:
                acc = _deep_tile(acc, w3, w3, w3, w3, w3, w3, w3, w3, x_ptr, xw_ptr, c_ptr + 3 * cs, o_ptr, kw0, rw,
                                 offs_n, n_mask, K, N, G, group_size, 1, False, MODE, CHUNK, EVEN, BLOCK_N, ROWS,
                                 False, XPAIR)
            if BITS > 4:
                acc = _deep_tile(acc, w4, w4, w4, w4, w4, w4, w4, w4, x_ptr, xw_ptr, c_ptr + 4 * cs, o_ptr, kw0, rw,
                                 offs_n, n_mask, K, N, G, group_size, 1, False, MODE, CHUNK, EVEN, BLOCK_N, ROWS,
                                 False, XPAIR)
            if BITS > 5:
                acc = _deep_tile(acc, w5, w5, w5, w5, w5, w5, w5, w5, x_ptr, xw_ptr, c_ptr + 5 * cs, o_ptr, kw0, rw,
                                 offs_n, n_mask, K, N, G, group_size, 1, False, MODE, CHUNK, EVEN, BLOCK_N, ROWS,
                                 False, XPAIR)
            if BITS > 6:
                acc = _deep_tile(acc, w6, w6, w6, w6, w6, w6, w6, w6, x_ptr, xw_ptr, c_ptr + 6 * cs, o_ptr, kw0, rw,
                                 offs_n, n_mask, K, N, G, group_size, 1, False, MODE, CHUNK, EVEN, BLOCK_N, ROWS,
                                 False, XPAIR)
            if BITS > 7:
                acc = _deep_tile(acc, w7, w7, w7, w7, w7, w7, w7, w7, x_ptr, xw_ptr, c_ptr + 7 * cs, o_ptr, kw0, rw,
                                 offs_n, n_mask, K, N, G, group_size, 1, False, MODE, CHUNK, EVEN, BLOCK_N, ROWS,
                                 False, XPAIR)
        else:
            acc = _deep_tile(acc, w0, w1, w2, w3, w4, w5, w6, w7, x_ptr, xw_ptr, c_ptr, o_ptr, kw0, rw, offs_n,
                             n_mask, K, N, G, group_size, BITS, HAS_OFFSET, MODE, CHUNK, EVEN, BLOCK_N, ROWS, MERGE,
                             XPAIR, XS)
        return acc

    @triton.jit
    def _gemv_deep_h2_kernel(x_ptr, xw_ptr, pl_ptr, c_ptr, o_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
                             N, K, KW, G, group_size, k_iters, split_k,
                             BITS: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                             MODE: tl.constexpr, CHUNK: tl.constexpr, EVEN: tl.constexpr, BLOCK_N: tl.constexpr,
                             ROWS: tl.constexpr, DEPTH: tl.constexpr, MERGE: tl.constexpr, XPAIR: tl.constexpr,
                             BCQ: tl.constexpr, PAIR: tl.constexpr = False, XS: tl.constexpr = 0):
        # x: [K] fp16 (xw: the same bytes as int32 pairs when XPAIR); planes [BITS, KW, N] int32; scales [G, N]
        # (BCQ: alphas [BITS, G, N]); out [N]. Program (pid_n, pid_k): BLOCK_N columns x k_iters tiles of ROWS word
        # rows (split 1: the whole K, no workspace, no atomics). Tile [ROWS, BN]: Triton gives each thread 4
        # columns (one 16-byte load per plane and row), the other threads and the warps other rows, so a narrow
        # column block still has every thread busy; one reduction over rows at the end. A run-time loop: the
        # words of the next DEPTH (1 or 2) tiles are loaded before the current tile is consumed, carried in
        # registers, so each thread keeps DEPTH tiles of loads in flight. PAIR (DEPTH 1, k_iters even): two tiles per
        # iteration, so the loop's own instructions and the register rotation come once per two tiles.
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        rw = tl.arange(0, ROWS)
        kw_begin = pid_k * k_iters * ROWS
        kw_end = tl.minimum(kw_begin + k_iters * ROWS, KW)
        acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        w0, w1, w2, w3, w4, w5, w6, w7 = _deep_words(pl_ptr, kw_begin, kw_end, rw, offs_n, n_mask, KW, N, BITS)
        v0, v1, v2, v3, v4, v5, v6, v7 = w0, w1, w2, w3, w4, w5, w6, w7
        if DEPTH > 1:
            v0, v1, v2, v3, v4, v5, v6, v7 = _deep_words(pl_ptr, kw_begin + ROWS, kw_end, rw, offs_n, n_mask, KW, N,
                                                         BITS)
        if PAIR:
            for it in range(0, k_iters, 2):
                kw0 = kw_begin + it * ROWS
                v0, v1, v2, v3, v4, v5, v6, v7 = _deep_words(pl_ptr, kw0 + ROWS, kw_end, rw, offs_n, n_mask, KW, N,
                                                             BITS)
                acc = _deep_planes(acc, w0, w1, w2, w3, w4, w5, w6, w7, x_ptr, xw_ptr, c_ptr, o_ptr, kw0, rw, offs_n,
                                   n_mask, K, N, G, group_size, BITS, HAS_OFFSET, MODE, CHUNK, EVEN, BLOCK_N, ROWS,
                                   MERGE, XPAIR, BCQ, XS)
                w0, w1, w2, w3, w4, w5, w6, w7 = _deep_words(pl_ptr, kw0 + 2 * ROWS, kw_end, rw, offs_n, n_mask, KW,
                                                             N, BITS)
                acc = _deep_planes(acc, v0, v1, v2, v3, v4, v5, v6, v7, x_ptr, xw_ptr, c_ptr, o_ptr, kw0 + ROWS, rw,
                                   offs_n, n_mask, K, N, G, group_size, BITS, HAS_OFFSET, MODE, CHUNK, EVEN, BLOCK_N,
                                   ROWS, MERGE, XPAIR, BCQ, XS)
            k_iters = 0  # the loop below is skipped
        for it in range(k_iters):
            kw0 = kw_begin + it * ROWS
            u0, u1, u2, u3, u4, u5, u6, u7 = _deep_words(pl_ptr, kw0 + DEPTH * ROWS, kw_end, rw, offs_n, n_mask, KW,
                                                         N, BITS)
            acc = _deep_planes(acc, w0, w1, w2, w3, w4, w5, w6, w7, x_ptr, xw_ptr, c_ptr, o_ptr, kw0, rw, offs_n,
                               n_mask, K, N, G, group_size, BITS, HAS_OFFSET, MODE, CHUNK, EVEN, BLOCK_N, ROWS, MERGE,
                               XPAIR, BCQ, XS)
            if DEPTH > 1:
                w0, w1, w2, w3, w4, w5, w6, w7 = v0, v1, v2, v3, v4, v5, v6, v7
                v0, v1, v2, v3, v4, v5, v6, v7 = u0, u1, u2, u3, u4, u5, u6, u7
            else:
                w0, w1, w2, w3, w4, w5, w6, w7 = u0, u1, u2, u3, u4, u5, u6, u7
        res = tl.sum(acc, axis=0)  # [BN]: in-thread, across the warp's rows (shuffles), across warps (shared memory)
        _epilogue(res[None, :], tl.arange(0, 1), offs_n, 1, N, out_ptr, N, b_ptr, ws_ptr, cnt_ptr, pid_n, split_k,
                  HAS_BIAS)


# --------------------------------------------------------------------------------------------------------------
# launchers


def _fit_kw(block_kw: int, group_size: int, K: int) -> int:
    """Largest power-of-two BLOCK_KW <= block_kw whose K-tile (32 * BLOCK_KW) lies inside one group."""
    if group_size >= K:
        return block_kw
    while block_kw > 1 and group_size % (32 * block_kw) != 0:
        block_kw //= 2
    return block_kw


def _common(planes, coef, offset, bias, kind):
    bits, KW, N = planes.shape
    G = coef.shape[-2]
    dummy = coef
    return bits, KW, N, G, (offset if offset is not None else dummy), (bias if bias is not None else dummy), \
        kind == "bcq"


def launch_gemv(x2, planes, coef, offset, bias, out, kind, group_size, K, cfg):
    """x2 [1, K] -> out [1, N]. cfg: block_n, block_kw, split_k, strategy, num_warps."""
    bits, KW, N, G, o, b, bcq = _common(planes, coef, offset, bias, kind)
    bkw = _fit_kw(cfg["block_kw"], group_size, K)
    k_iters, split = _split(-(-KW // bkw), cfg["split_k"])
    n_blocks = -(-N // cfg["block_n"])
    ws, cnt = _workspace(x2.device, N if split > 1 else 0, n_blocks if split > 1 else 0)
    strategy = cfg.get("strategy", 0) if not bcq else 1  # BCQ has no rebuild variant at M == 1
    even = K % (32 * bkw) == 0 and N % cfg["block_n"] == 0 and KW % (bkw * k_iters) == 0
    return _gemv_kernel[(n_blocks, split)](
        x2, planes, coef, o, b, out, ws, cnt, N, K, KW, G, group_size, k_iters, split, MAGIC_F32,
        BITS=bits, BCQ=bcq, HAS_OFFSET=offset is not None, HAS_BIAS=bias is not None,
        STRATEGY=strategy, EVEN=even, BLOCK_N=cfg["block_n"], BLOCK_KW=bkw,
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2))


def launch_gemm(x2, planes, coef, offset, bias, out, kind, group_size, K, cfg):
    """x2 [M, K] -> out [M, N]. cfg: block_m, block_n, block_kw, split_k, strategy, num_warps, num_stages."""
    M = x2.shape[0]
    bits, KW, N, G, o, b, bcq = _common(planes, coef, offset, bias, kind)
    bm, bn = cfg["block_m"], cfg["block_n"]
    bkw = _fit_kw(cfg["block_kw"], group_size, K)
    k_iters, split = _split(-(-KW // bkw), cfg["split_k"])
    num_m, num_n = -(-M // bm), -(-N // bn)
    ws, cnt = _workspace(x2.device, M * N if split > 1 else 0, num_m * num_n if split > 1 else 0)
    return _gemm_kernel[(num_m * num_n, split)](
        x2, planes, coef, o, b, out, ws, cnt, M, N, K, KW, G, group_size, x2.stride(0), out.stride(0),
        k_iters, split, MAGIC_F32,
        BITS=bits, BCQ=bcq, HAS_OFFSET=offset is not None, HAS_BIAS=bias is not None,
        STRATEGY=cfg.get("strategy", 0), DOT_F32=_interpreting() and x2.dtype == torch.bfloat16,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_KW=bkw, GROUP_M=cfg.get("group_m", 8),
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3))


def gemm_t_mode(dtype: torch.dtype, cfg: dict | None = None) -> int:
    """A-operand arithmetic of `_gemm_t_kernel`: 2 = f16x2 PTX (fp16 on a GPU), 1 = the same fp16 arithmetic in
    plain Triton (fp16 under TRITON_INTERPRET=1, where inline PTX cannot run), 0 = fp32 rebuild (bf16)."""
    if cfg is not None and "mode" in cfg:
        return cfg["mode"]
    if dtype != torch.float16:
        return 0
    return 1 if _interpreting() else 2


def launch_gemm_t(x2, planes, coef, offset, bias, out, kind, group_size, K, cfg):
    """x2 [M, K] -> out [M, N] by the swapped kernel. cfg: block_m (16..128), block_n, block_kw (>= 8; the dot's
    K is block_kw, or 2 block_kw with join), split_k, join, xperm, group_m, num_warps, num_stages, optional mode."""
    M = x2.shape[0]
    bits, KW, N, G, o, b, bcq = _common(planes, coef, offset, bias, kind)
    bm, bn, bkw = cfg["block_m"], cfg["block_n"], cfg["block_kw"]
    mode = gemm_t_mode(x2.dtype, cfg)
    if mode > 0 and x2.dtype != torch.float16:
        raise ValueError("modes 1 and 2 of the swapped kernel build fp16 weights: fp16 activations only")
    k_tiles = -(-KW // bkw)
    k_iters, split = _split(k_tiles, cfg["split_k"])
    join, xp = bool(cfg.get("join", False)), bool(cfg.get("xperm", False))
    xs = x2
    if xp:  # activations re-ordered per K tile, a second small launch; zero past K, also in the tiles that the
        # last split runs past KW (so the GEMM's B loads need no K mask)
        xs = torch.empty((M, k_iters * split * bkw * 32), dtype=x2.dtype, device=x2.device)
        br = min(1 << max(0, (M - 1).bit_length()), 4)
        _xperm_kernel[(k_iters * split, -(-M // br))](x2, xs, M, K, x2.stride(0), xs.stride(0), JOIN=join, BLOCK_KW=bkw,
                                              BLOCK_R=br, num_warps=4)
    num_m, num_n = -(-M // bm), -(-N // bn)
    ws, cnt = _workspace(x2.device, M * N if split > 1 else 0, num_m * num_n if split > 1 else 0)
    return _gemm_t_kernel[(num_m * num_n, split)](
        xs, planes, coef, o, b, out, ws, cnt, M, N, K, KW, G, group_size, xs.stride(0), out.stride(0),
        k_iters, split,
        BITS=bits, BCQ=bcq, HAS_OFFSET=offset is not None, HAS_BIAS=bias is not None, MODE=mode,
        JOIN=join, XP=xp, DOT_F32=_interpreting() and x2.dtype == torch.bfloat16,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_KW=bkw, GROUP_M=cfg.get("group_m", 8),
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3))

H2_MAX_BITS = 8  # the f16x2 GEMV takes every width. With chunk c > 0 each fp16 lane sums c products (u - L/2) x
# before fp32 takes over, so it overflows for |x| > 65504 / (c (2^b - 1) / 2); `h2_chunk` keeps that bound at
# >= 4367 (1 bit: 8188, 2: 5458, 3: 4679, 4: 4367). Chunk 0 (5..8 bits) converts each (u - L/2) to fp32 and
# accumulates exact products in fp32: no bound on x.
H2_CHUNKS = {1: 16, 2: 8, 3: 4, 4: 2}
# The deep GEMV's wide chunks (bipolar 2..4 bits): weights (u - L/2) 2^-xs in fp16 (a smaller exponent in the LOP3
# magic and the HSUB2 constant: free and exact), so 16 products per fp16 lane keep the same |x| bound as H2_CHUNKS
# (16 (L/2) 2^-xs = 12 / 14 / 15 = 8 x 1.5 / 4 x 3.5 / 2 x 7.5) with fewer fp32 flushes per word (1 instead of
# 2 / 4 / 8); products of |x| < 2^(xs - 14) become fp16 subnormals (less precise, and negligible in the sum).
H2_WIDE = {2: (16, 1), 3: (16, 2), 4: (16, 3)}  # bits: (chunk, xs)


def h2_chunk(bits: int) -> int:
    return H2_CHUNKS.get(bits, 0)


def launch_gemv_h2(x2, planes, coef, offset, bias, out, kind, group_size, K, cfg):
    """x2 [1, K] fp16 -> out [1, N] by `_gemv_h2_kernel` (bipolar). cfg: block_n, block_kw, split_k (or unroll:
    splits of exactly that many tiles, straight-line code), chunk, num_warps, optional mode (2 PTX, 1 its
    plain-Triton twin; default by `gemm_t_mode`)."""
    bits, KW, N, G, o, b, bcq = _common(planes, coef, offset, bias, kind)
    if x2.dtype != torch.float16:
        raise ValueError("the f16x2 GEMV takes fp16 activations")
    bkw = _fit_kw(cfg["block_kw"], group_size, K)
    k_tiles = -(-KW // bkw)
    unroll = cfg.get("unroll", 0)
    if unroll:  # splits of exactly `unroll` tiles (the last split's missing tiles are masked)
        k_iters, split = unroll, -(-k_tiles // unroll)
    else:
        k_iters, split = _split(k_tiles, cfg["split_k"])
    n_blocks = -(-N // cfg["block_n"])
    ws, cnt = _workspace(x2.device, N if split > 1 else 0, n_blocks if split > 1 else 0)
    return _gemv_h2_kernel[(n_blocks, split)](
        x2, planes, coef, o, b, out, ws, cnt, N, K, KW, G, group_size, k_iters, split,
        BITS=bits, HAS_OFFSET=offset is not None, HAS_BIAS=bias is not None, MODE=gemm_t_mode(x2.dtype, cfg),
        CHUNK=cfg.get("chunk", h2_chunk(1 if bcq else bits)), BLOCK_N=cfg["block_n"], BLOCK_KW=bkw,
        EVEN=K % (32 * bkw) == 0 and N % cfg["block_n"] == 0 and KW % (bkw * k_iters) == 0,
        UNROLL=unroll, BCQ=bcq, PREFETCH=bool(cfg.get("prefetch")) and unroll > 0 and N % 4 == 0 and not _interpreting(),
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2))


def gemv_h2_configs(N: int, K: int, bits: int, group_size: int, kind: str, dtype: torch.dtype, sms: int) -> list[dict]:
    """Candidates for `launch_gemv_h2` ([] for bf16). BCQ runs its planes as 1-bit tiles (chunk 16)."""
    if dtype != torch.float16 or bits > H2_MAX_BITS:
        return []
    KW = num_words(K)
    out = []
    # wide N per thread: the x pair of a word row is loaded and packed once per thread, for all its columns.
    # (block_n, block_kw, warps, waves of programs for a run-time loop | 0, unroll | 0). The first H100 run
    # (docs/results/bitplane.md) chose (1024, 1, 4 or 8 warps, 4 waves) at every width; the unrolled ones are new.
    # fewer columns per thread and shorter unrolls at more bits (u4 at 5+ bits spilled in the offline sm_90 build)
    if bits <= 2:
        shapes = ((1024, 1, 4, 4.0, 0), (1024, 1, 8, 4.0, 0), (1024, 1, 4, 0, 4), (1024, 1, 4, 0, 8),
                  (1024, 1, 8, 0, 4), (512, 1, 4, 0, 4))
    elif bits <= 4:
        shapes = ((1024, 1, 4, 4.0, 0), (1024, 1, 8, 4.0, 0), (1024, 1, 4, 0, 2), (1024, 1, 4, 0, 4),
                  (1024, 1, 8, 0, 4), (512, 1, 4, 0, 4))
    else:
        shapes = ((1024, 1, 4, 4.0, 0), (512, 1, 4, 4.0, 0), (1024, 1, 8, 4.0, 0), (1024, 1, 4, 0, 2),
                  (512, 1, 4, 0, 2), (512, 1, 4, 0, 4))
    # no L2-prefetch variants (`prefetch=1`, pinned configs only): on the H100 every one ran 28-42 % slower than
    # the same split without (docs/results/bitplane.md, fourth session)
    for bn, bkw, warps, waves, unroll, *pf in shapes:
        bkw = _fit_kw(bkw, group_size, K)
        k_tiles = -(-KW // bkw)
        cfg = dict(kernel="h2", block_n=bn, block_kw=bkw, num_warps=warps,
                   chunk=h2_chunk(1 if kind == "bcq" else bits))
        if unroll:
            cfg["unroll"] = min(unroll, k_tiles)
        else:
            cfg["split_k"] = _split_for(-(-N // bn), k_tiles, sms, waves)
        if pf:
            cfg["prefetch"] = 1
        if cfg not in out:
            out.append(cfg)
    return out


def launch_gemv_deep(x2, planes, coef, offset, bias, out, kind, group_size, K, cfg):
    """x2 [1, K] fp16 -> out [1, N] by `_gemv_deep_h2_kernel` (both kinds). cfg: block_n, rows (word rows per
    tile), split_k (default 1: the whole K per program, no split-K epilogue), depth (tiles loaded ahead, 1 or 2),
    merge (merged plane words, bipolar 2..4 bits), xpair (x read as int32 pairs, K even; default on), pair (two
    tiles per loop iteration), chunk, num_warps, maxnreg (ptxas register cap), optional mode (2 PTX, 1 its
    plain-Triton twin)."""
    bits, KW, N, G, o, b, bcq = _common(planes, coef, offset, bias, kind)
    if x2.dtype != torch.float16:
        raise ValueError("the f16x2 GEMV takes fp16 activations")
    rows, bn = cfg["rows"], cfg["block_n"]
    k_iters, split = _split(-(-KW // rows), cfg.get("split_k", 1))
    chunk = cfg.get("chunk", h2_chunk(1 if bcq else bits))
    merge = bool(cfg.get("merge", False)) and not bcq and 2 <= bits <= 4 and chunk > 0
    xs = cfg.get("xs", 0) if not bcq and chunk > 0 else 0  # 2^-xs weights (wide chunks, `H2_WIDE`)
    xw = x2
    xpair = bool(cfg.get("xpair", True)) and chunk > 0 and K % 2 == 0 and x2.is_contiguous()
    if xpair:
        try:
            xw = x2.view(torch.int32)
        except RuntimeError:  # storage offset not 4-byte aligned: fp16 loads
            xpair = False
    n_blocks = -(-N // bn)
    ws, cnt = _workspace(x2.device, N if split > 1 else 0, n_blocks if split > 1 else 0)
    # pair: two tiles per loop iteration; with an odd number of tiles per split only at split 1 (the extra tile
    # lies past KW: zero words, x masked, zero scales), else it would add a tile of the next split's rows
    pair = bool(cfg.get("pair", False)) and (k_iters % 2 == 0 or split == 1) and cfg.get("depth", 1) == 1
    extra = {"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") and not _interpreting() else {}
    return _gemv_deep_h2_kernel[(n_blocks, split)](
        x2, xw, planes, coef, o, b, out, ws, cnt, N, K, KW, G, group_size, k_iters, split,
        BITS=bits, HAS_OFFSET=offset is not None, HAS_BIAS=bias is not None, MODE=gemm_t_mode(x2.dtype, cfg),
        CHUNK=chunk, EVEN=K % 32 == 0 and N % bn == 0 and KW % (rows * k_iters) == 0 and not (pair and k_iters % 2),
        BLOCK_N=bn, ROWS=rows,
        DEPTH=cfg.get("depth", 1), MERGE=merge, XPAIR=xpair, BCQ=bcq, PAIR=pair, XS=xs,
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 1), **extra)


def gemv_deep_configs(N: int, K: int, bits: int, group_size: int, kind: str, dtype: torch.dtype,
                      sms: int) -> list[dict]:
    """Candidates for `launch_gemv_deep` ([] for bf16): (columns, word rows per tile, warps, two tiles per
    iteration, wide chunks), merged words for bipolar 2..4 bits. Split 1 (whole K per program) where the column blocks alone
    give two programs per SM, else the fewest splits that do (their partial sums go through the split-K epilogue,
    few per column)."""
    if dtype != torch.float16 or bits > H2_MAX_BITS:
        return []
    KW = num_words(K)
    merge = int(kind == "bipolar" and 2 <= bits <= 4)
    # Triton's layout of a [rows, columns] tile at 4 warps: 4 columns per thread, columns / 4 threads per row,
    # so rows / (512 / columns) word rows per thread (R): 16x64, 32x32 and 64x16 give R = 2, 16x32 and 32x16 R = 1.
    # H100 (docs/results/bitplane.md, fifth session): 16x64 best at 8192x8192 (1..3 bits), 32x32 (4 or 8 warps,
    # two tiles per iteration at 8 warps) or 32x16 at 28672x8192; 8x64, 64x16, 128x8, 16x128 and 64x32 (8 warps),
    # split 2, 2 tiles ahead, plane words not merged, a ptxas register cap (spills) and an L2 prefetch of the tile
    # 1-3 tiles ahead all lost (not offered)
    # Wide chunks (`H2_WIDE`, bipolar 2..4 bits, last three): 16x64 wide best at 2 bits on 8192x8192, 32x16 wide at
    # 3 / 4 bits on 28672x8192 (52.9 us against 57.9 at 4 bits), 32x32 x 8 warps pair wide at 4 bits on 8192x8192
    if bits <= 4:
        shapes = ((16, 64, 4, 0, 0), (32, 32, 4, 0, 0), (16, 32, 4, 0, 0), (32, 16, 4, 0, 0), (32, 32, 8, 0, 0),
                  (32, 32, 8, 1, 0), (16, 64, 4, 0, 1), (32, 16, 4, 0, 1), (32, 32, 8, 1, 1))
    else:  # more words per thread and row: one word row per thread (R = 1); h2 512 u2 won at 5..7 bits
        shapes = ((16, 32, 4, 0, 0), (32, 16, 4, 0, 0))
    out = []
    for bn, rows, warps, pair, wide in shapes:
        if wide and (kind != "bipolar" or bits not in H2_WIDE):
            continue
        n_blocks = -(-N // bn)
        cfg = dict(kernel="deep", block_n=bn, rows=rows, num_warps=warps, depth=1,
                   split_k=_split_for(n_blocks, -(-KW // rows), sms, 2.0) if n_blocks < 2 * sms else 1,
                   chunk=h2_chunk(1 if kind == "bcq" else bits))
        if pair:
            cfg["pair"] = 1
        if wide:
            cfg["chunk"], cfg["xs"] = H2_WIDE[bits]
        if merge:
            cfg["merge"] = 1
        if cfg not in out:
            out.append(cfg)
    return out


def dequantize_t(planes, coef, offset, kind, group_size, K, dtype, block_n=64, block_kw=4):
    """W^T [K, N] in `dtype`, by the Triton kernel."""
    bits, KW, N, G, o, _, bcq = _common(planes, coef, offset, None, kind)
    bkw = _fit_kw(block_kw, group_size, K)
    out = torch.empty((K, N), dtype=dtype, device=planes.device)
    _dequant_kernel[(-(-KW // bkw), -(-N // block_n))](
        planes, coef, o, out, N, K, KW, G, group_size, MAGIC_F32,
        BITS=bits, BCQ=bcq, HAS_OFFSET=offset is not None, BLOCK_N=block_n, BLOCK_KW=bkw)
    return out


def _split_for(tiles: int, k_tiles: int, sms: int, waves: float) -> int:
    return max(1, min(k_tiles, round(waves * sms / max(tiles, 1))))


def gemv_configs(N: int, K: int, bits: int, group_size: int, kind: str, sms: int,
                 strategies: tuple[int, ...] | None = None) -> list[dict]:
    """Candidates for M == 1, the default first (defaults from docs/results/bitplane.md)."""
    KW = num_words(K)
    out = []
    for strategy in strategies or ((0, 1) if kind == "bipolar" else (1,)):
        for bn, bkw, warps in ((128, 4, 4), (64, 4, 4), (256, 2, 8)):
            bkw = _fit_kw(bkw, group_size, K)
            tiles, k_tiles = -(-N // bn), -(-KW // bkw)
            for waves in (4.0, 8.0):
                cfg = dict(block_n=bn, block_kw=bkw, num_warps=warps, strategy=strategy,
                           split_k=_split_for(tiles, k_tiles, sms, waves))
                if cfg not in out:
                    out.append(cfg)
    return out


def gemm_configs(M: int, N: int, K: int, bits: int, group_size: int, kind: str, sms: int) -> list[dict]:
    """Candidates for M >= 2, the default first."""
    KW = num_words(K)
    if M <= 16:
        shapes = [(16, 64, 4, 4, 4), (16, 128, 4, 4, 3), (16, 64, 8, 4, 3)]
    elif M <= 64:
        shapes = [(M if M > 16 else 32, 64, 4, 4, 3), (64, 128, 2, 4, 3)]
    else:
        shapes = [(128, 128, 2, 8, 3), (128, 64, 2, 4, 4), (64, 128, 2, 4, 4), (128, 256, 2, 8, 3)]
    strategies = (0,) if kind == "bipolar" else ((0, 1) if M <= 64 else (0,))
    out = []
    for strategy in strategies:
        for bm, bn, bkw, warps, stages in shapes:
            bm = min(128, max(16, 1 << (bm - 1).bit_length()))
            bkw = _fit_kw(bkw, group_size, K)
            tiles, k_tiles = -(-M // bm) * -(-N // bn), -(-KW // bkw)
            for waves in ((2.0, 4.0) if M <= 64 else (1.0,)):
                cfg = dict(block_m=bm, block_n=bn, block_kw=bkw, num_warps=warps, num_stages=stages, group_m=8,
                           strategy=strategy, split_k=_split_for(tiles, k_tiles, sms, waves))
                if cfg not in out:
                    out.append(cfg)
    return out


def gemm_t_configs(M: int, N: int, K: int, bits: int, kind: str, sms: int,
                   dtype: torch.dtype | None = None) -> list[dict]:
    """Candidates for the swapped kernel (`launch_gemm_t`, any M), the default first. block_m is the mma's N
    (M rounded up to 16..128); word tiles of 8 or 16 (a dot's K is block_kw, or 2 block_kw joined, >= 16);
    `join` feeds one dot per slot pair, `xperm` re-orders x first (one more launch, but async-copied B tiles)."""
    KW = num_words(K)
    bm = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
    # (block_n, block_kw, warps, stages, join, xperm, waves). With xperm every slot pair's B tile is its own
    # multi-buffered async copy (16 per K tile): 16 x stages x [BK', BM] fp16 must fit in shared memory, hence
    # fewer stages / narrower tiles at BM >= 64 (BM = 128 with 3 stages asked for 440 KB on the H100).
    # Measured on the H100 (docs/results/bitplane.md, 2026-11-24): joined pairs ran 2.5x slower (the joined
    # operand goes through shared memory), x gathers without xperm 2x slower; 64-row tiles with 2 stages best.
    if bm <= 32:
        # first H100 run: (64, 16, 4, 2) best at every width; 128-row tiles with 4 warps, 32-word tiles and 3
        # stages 5-30 % slower; two warpgroups (8 warps, 128 rows) are new
        shapes = [(64, 16, 4, 2, 0, 1, 4.0), (64, 16, 4, 2, 0, 1, 8.0), (64, 16, 4, 2, 0, 1, 2.0),
                  (128, 16, 8, 2, 0, 1, 4.0), (128, 16, 8, 2, 0, 1, 2.0), (64, 32, 4, 2, 0, 1, 2.0)]
    elif bm == 64:
        shapes = [(64, 16, 4, 2, 0, 1, 2.0), (64, 16, 4, 2, 0, 1, 1.0), (128, 16, 4, 1, 0, 1, 2.0)]
    else:
        shapes = [(128, 16, 8, 1, 0, 1, 1.0), (64, 16, 4, 1, 0, 1, 1.0), (128, 16, 8, 1, 0, 1, 2.0)]
    out = []
    for bn, bkw, warps, stages, join, xperm, waves in shapes:
        tiles = -(-M // bm) * -(-N // bn)
        cfg = dict(kernel="swapped", block_m=bm, block_n=bn, block_kw=bkw, num_warps=warps, num_stages=stages,
                   join=join, xperm=xperm, group_m=8, split_k=_split_for(tiles, -(-KW // bkw), sms, waves))
        if cfg not in out:
            out.append(cfg)
    if kind == "bipolar" and dtype == torch.float16:
        # the plain-Triton arithmetic (mode 1, bit-identical to the PTX) on the GPU: Triton hoists the A operand's
        # layout conversion through plain ops up to the word loads, but not through inline asm, so the PTX path
        # sends every A tile through shared memory (offline sm_90 SASS, 2-bit, 64 x 16 words, 4 warps: 33 STS,
        # 32 LDSM, 40 BAR per K tile with the PTX; 1 / 1 / 9 in mode 1, for 7 % more instructions in total)
        out[1:1] = [dict(c, mode=1) for c in out[:3] if c["num_warps"] == 4][:2]
    return out


def launch_gemv_mma(x2, planes, coef, offset, bias, out, kind, group_size, K, cfg):
    """x2 [1, K] fp16 -> out [1, N] by the tensor-core GEMV (`bitplane_mma`; bipolar without offset)."""
    from . import bitplane_mma

    if kind != "bipolar" or offset is not None:
        raise ValueError("the mma GEMV takes bipolar weights without offset")
    return bitplane_mma.launch_gemv_mma(x2, planes, coef, bias, out, group_size, K, cfg)


def launch_gemm_mma(x2, planes, coef, offset, bias, out, kind, group_size, K, cfg):
    """x2 [M <= 16, K] fp16 -> out [M, N] by the tensor-core kernel of `bitplane_mma_gemm` (bipolar, no offset)."""
    from . import bitplane_mma_gemm

    if kind != "bipolar" or offset is not None:
        raise ValueError("the mma GEMM takes bipolar weights without offset")
    return bitplane_mma_gemm.launch_gemm_mma(x2, planes, coef, bias, out, group_size, K, cfg)


MMA_LAUNCH = {"mma": launch_gemv_mma, "mma_k": launch_gemm_mma}


def gemv_candidates(N: int, K: int, bits: int, group_size: int, kind: str, dtype: torch.dtype, sms: int,
                    offset: bool = False) -> list[dict]:
    """Everything the tuner tries at M == 1: the fp32 GEMV's two first configurations, for BCQ also the swapped
    kernel's two first (it tied BCQ's fp32 GEMV at M = 1 on the H100), the f16x2 GEMV and the deep f16x2 GEMV
    (fp16 activations) and for bipolar fp16 without offset the tensor-core GEMV (`bitplane_mma`)."""
    from . import bitplane_mma

    h2 = gemv_h2_configs(N, K, bits, group_size, kind, dtype, sms) + gemv_deep_configs(N, K, bits, group_size, kind,
                                                                                      dtype, sms)
    off = True if offset else None
    mma = bitplane_mma.gemv_mma_configs(N, K, bits, group_size, kind, off, dtype, sms)
    if h2 and kind == "bipolar":  # the H100 run measured the f16x2 GEMV 1.35-1.75x faster than the fp32 GEMV at
        # 1..4 bits: keep the latter's two best configurations only (rebuild strategy)
        return mma + gemv_configs(N, K, bits, group_size, kind, sms, (0,))[:2] + h2
    extra = [] if kind == "bipolar" else gemm_t_configs(1, N, K, bits, kind, sms)[:2]
    return gemv_configs(N, K, bits, group_size, kind, sms)[:2] + extra + h2


def gemm_mma_candidates(M, N, K, bits, group_size, kind, offset, dtype) -> list[dict]:
    """The tensor-core kernel's candidates for 2 <= M <= 16 (`bitplane_mma_gemm`; [] where it does not apply).

    Opt-in (BITSMITH_MMA_GEMM=1): its PTX passed the H100 check (bits 1..8, every candidate at 2..4 bits), but it
    ran 12-26 % slower than the swapped kernel at M = 16 on both benchmark shapes (docs/results/bitplane.md, fourth
    session), so the tuner does not spend time on it by default; pinned configs (kernel="mma_k") always run it."""
    from . import bitplane_mma_gemm

    if os.environ.get("BITSMITH_MMA_GEMM", "0") != "1":
        return []
    return bitplane_mma_gemm.gemm_mma_configs(M, N, K, bits, group_size, kind, offset, dtype)


def triton_linear(x, planes, coef, offset, kind, group_size, in_features, bias=None, config: dict | None = None,
                  regime: str | None = None, candidates: list[dict] | None = None):
    """Triton path of `linear`: x [..., K] fp16/bf16 -> [..., N] in x's dtype.

    `config` / `regime` ("gemv", "gemm", "dequant") pin a kernel configuration (tests, benchmarks; a config with
    kernel="swapped" runs `launch_gemm_t` in either of the first two); by default the regime follows M and the
    configuration is tuned once per (shape, format) on the GPU among `candidates` (default: the regime's own
    configurations and `gemm_t_configs`).
    """
    if triton is None:  # pragma: no cover
        raise RuntimeError("triton is not installed")
    K = in_features
    bits, KW, N = planes.shape
    rows = flat_rows(x, K, N)
    x2, out, M = rows.x2, rows.out, rows.M
    if M == 0:
        return rows.result()
    if regime is None:
        regime = "gemv" if M == 1 else ("gemm" if M < DEQUANT_MIN_M else "dequant")
    if regime == "dequant":
        wt = dequantize_t(planes, coef, offset, kind, group_size, K, x.dtype)
        torch.matmul(x2, wt, out=out)
        if bias is not None:
            out += bias
        return rows.result()
    args = (planes, coef, offset, bias)
    sms = _num_sms(x.device)
    key = ("bitplane", kind, bits, group_size, offset is not None, bias is not None, x.dtype, N, K)
    if regime == "gemv":
        if M != 1:
            raise ValueError("the gemv regime takes exactly one row")

        def go(c, t=None):  # t: the weight tensors by name (the tuner's rotated copies), else this call's
            launch = {"swapped": launch_gemm_t, "h2": launch_gemv_h2, "deep": launch_gemv_deep,
                      **MMA_LAUNCH}.get(c.get("kernel"), launch_gemv)
            a = args if t is None else (t["planes"], t["coef"], t.get("offset"), t.get("bias"))
            return launch(x2, *a, out, kind, group_size, K, c)

        cands = [config] if config is not None else candidates or gemv_candidates(N, K, bits, group_size, kind,
                                                                                   x.dtype, sms, offset is not None)
        # timed like the benchmark table (CUDA graph over rotated weight copies > 3x L2; `_tune`): the cold-L2
        # timing it used before ranked the deep GEMV's tiles differently from the table on the H100
        weights = {k: v for k, v in zip(("planes", "coef", "offset", "bias"), args) if v is not None}
        cfg = config or _tune(("gemv",) + key, cands, go, weights)
    else:
        def go(c):
            launch = {"swapped": launch_gemm_t, **MMA_LAUNCH}.get(c.get("kernel"), launch_gemm)
            launch(x2, *args, out, kind, group_size, K, c)

        cands = [config] if config is not None else candidates or (
            gemm_mma_candidates(M, N, K, bits, group_size, kind, offset, x.dtype)
            + gemm_t_configs(M, N, K, bits, kind, sms, x.dtype) + gemm_configs(M, N, K, bits, group_size, kind,
                                                                               sms)[:2])
        cfg = config or _tune(("gemm", 1 << (M - 1).bit_length()) + key, cands, go)
    go(cfg)
    return rows.result()
