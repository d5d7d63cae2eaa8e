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


def triton_linear(x, planes, coef, offset, kind, group_size, in_features, bias=None, config: dict | None = None,
                  regime: str | None = None, candidates: list[dict] | None = None):
    """Triton path of `linear`: x [..., K] fp16/bf16 -> [..., N] in x's dtype.

    `config` / `regime` ("gemv", "gemm", "dequant") pin a kernel configuration (tests, benchmarks); by default the
    regime follows M and the configuration is tuned once per (shape, format) on the GPU among `candidates`
    (default: `gemv_configs` / `gemm_configs`).
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

        def go(c):
            launch_gemv(x2, *args, out, kind, group_size, K, c)

        cands = [config] if config is not None else candidates or gemv_configs(N, K, bits, group_size, kind, sms)
        cfg = config or _tune(("gemv",) + key, cands, go)
    else:
        def go(c):
            launch_gemm(x2, *args, out, kind, group_size, K, c)

        cands = [config] if config is not None else candidates or gemm_configs(M, N, K, bits, group_size, kind, sms)
        cfg = config or _tune(("gemm", 1 << (M - 1).bit_length()) + key, cands, go)
    go(cfg)
    return rows.result()
