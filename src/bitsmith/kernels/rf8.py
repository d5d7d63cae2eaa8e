"""RF8 weights (format `rf8`, version 1): one byte per weight, two signed powers of two, and the linear op.

Each weight is s1 * (2^e1 + s2 * 2^e2) with e2 = e1 - 1 - d, d in 0..3 (the two exponents 1 to 4 apart), e1
relative to an exponent offset o shared by a group of weights. Layout, for a Linear with weight W [N, K]
(N = out_features, K = in_features), group size g along K (g = K: per output channel), G = ceil(K / g):

    qweight  uint8 [N, K]      one code per weight, row-major (K contiguous)
    exps     int8  [N, G]      the exponent offset o of each (row, group); [1, 1] when `scope` is "tensor"

Code byte, most significant bit first:

    bit 7      s1   sign of the weight (1 = negative)
    bits 6..3  E    0..15; E = 0 means the weight is exactly 0 (whatever the other bits)
    bits 2..1  d    0..3; the second power is 2^(d+1) times smaller than the first
    bit 0      s2   sign of the second power relative to the first (1 = subtracted)

    W[n, k] = 0                                                           if E == 0
            = (-1)^s1 * 2^(E - 15 + o) * (1 + (-1)^s2 * 2^-(d+1))         otherwise, o = exps[n, k // g]

So every magnitude is 2^e1 +- 2^e2 with e1 = E - 15 + o; per octave the code reaches the mantissas 1, 1.0625,
1.125, 1.25, 1.5, 1.75, 1.875 (some values have two codes; the encoder writes the smaller code). Codes reach
1.5 * 2^o at most and 2^(o - 15) at least (nonzero). The encoder takes o = floor(log2(max|w|)) + 1 for each group
(clamped to [-110, 110]), so the group's largest weight lies in [2^(o-1), 2^o), the highest octave with all seven
levels (a smaller o would lose the level 2^o itself: 1.0 is reached only as 0.5 * 2^(e1+1)). The codes above 2^o
are then unused, and any weight matrix whose values are RF8 values under these offsets packs exactly (which
`rf8_gptq` relies on). Encoding rounds each weight to the nearest representable value (ties to the smaller
magnitude). Dequantization is exact in float32 (and in bf16; in fp16 below 2^-14 values become subnormal).

Kernels: `_rf8_mm_kernel` (Triton) decodes a [BLOCK_N, BLOCK_K] tile of codes in registers (the power of two is
built in the float32 exponent field; one multiply-add for the second power) and feeds tl.dot with fp32
accumulation; masks handle any M, N, K and a partial last group. CUDA with fp16/bf16 activations runs it
(TRITON_INTERPRET=1 runs it on the CPU for tests); elsewhere the torch reference (exact dequantization, then
F.linear) runs.
"""

from __future__ import annotations

import math
import os

import torch

from .launch import flat_rows, function_format

FORMAT_NAME = "rf8"
FORMAT_VERSION = 1
EXP_MIN, EXP_MAX = -110, 110
E_BIAS = 15

try:  # Triton is optional at import time (the torch reference works without it)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


# --------------------------------------------------------------------------------------------------------------
# the code table

def decode_table(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Value of each of the 256 codes with offset o = 0, [256]."""
    c = torch.arange(256)
    s1, E, d, s2 = (c >> 7) & 1, (c >> 3) & 15, (c >> 1) & 3, c & 1
    mag = torch.ldexp(torch.ones(256, dtype=torch.float64), (E - E_BIAS)) * (
        1 + (1 - 2 * s2).double() * torch.ldexp(torch.ones(256, dtype=torch.float64), -(d + 1)))
    v = torch.where(E == 0, torch.zeros_like(mag), torch.where(s1 == 1, -mag, mag))
    return v.to(dtype)


_ENC: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _encoder(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints between consecutive nonnegative levels, canonical code of each level), float64 / uint8."""
    key = str(device)
    if key not in _ENC:
        table = decode_table()
        pos = table[:128]  # s1 = 0
        levels, first = [], {}
        for code in range(128):
            v = float(pos[code])
            if v not in first:
                first[v] = code
                levels.append(v)
        levels.sort()
        lv = torch.tensor(levels, dtype=torch.float64)
        codes = torch.tensor([first[v] for v in levels], dtype=torch.uint8)
        mids = (lv[1:] + lv[:-1]) / 2
        _ENC[key] = (mids.to(device), codes.to(device))
    return _ENC[key]


def check_params(p: dict) -> str | None:
    g = p.get("group_size")
    if not isinstance(g, int) or isinstance(g, bool) or g <= 0:
        return f"rf8 'group_size' must be a positive integer, got {g!r}"
    if p.get("scope", "group") not in ("group", "tensor"):
        return f"rf8 'scope' must be 'group' or 'tensor', got {p.get('scope')!r}"
    return None


def num_groups(params: dict) -> int:
    return math.ceil(params["in_features"] / params["group_size"])


def tensor_specs(params: dict, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    N, K = params["out_features"], params["in_features"]
    exps = (1, 1) if params.get("scope", "group") == "tensor" else (N, num_groups(params))
    return {"qweight": ((N, K), torch.uint8), "exps": (exps, torch.int8)}


# --------------------------------------------------------------------------------------------------------------
# packing

def _offsets(absmax: torch.Tensor) -> torch.Tensor:
    """o = floor(log2(absmax)) + 1 (int32), clamped; all-zero groups get o = 0."""
    a = absmax.double()
    o = torch.floor(torch.log2(a.clamp_min(1e-300))) + 1
    o = torch.where(a > 0, o, torch.zeros_like(o))
    return o.clamp(EXP_MIN, EXP_MAX).to(torch.int32)


def pack(w: torch.Tensor, group_size: int | None = None, scope: str = "group") -> tuple[dict, dict]:
    """w [N, K] (any float dtype, any device) -> ({"qweight", "exps"}, params). group_size None: per channel."""
    if w.dim() != 2:
        raise ValueError(f"rf8 packs a matrix, got shape {list(w.shape)}")
    N, K = w.shape
    g = K if group_size is None else min(int(group_size), K)
    params = {"in_features": K, "out_features": N, "group_size": g, "scope": scope}
    G = math.ceil(K / g)
    wf = w.detach().double()
    if scope == "tensor":
        o = _offsets(wf.abs().max().reshape(1, 1))  # [1, 1]
        o_full = o.expand(N, K)
    else:
        pad = G * g - K
        a = torch.nn.functional.pad(wf.abs(), (0, pad)).view(N, G, g).amax(-1)  # [N, G]
        o = _offsets(a)
        o_full = o.repeat_interleave(g, dim=1)[:, :K]
    mids, codes = _encoder(w.device)
    scaled = torch.ldexp(wf.abs(), -o_full)  # exact: |w| / 2^o
    idx = torch.searchsorted(mids, scaled.contiguous())
    q = codes[idx]
    q = torch.where((wf < 0) & (q != 0), q | 0x80, q)
    return {"qweight": q.contiguous(), "exps": o.to(torch.int8).contiguous()}, params


def dequantize(tensors: dict, params: dict, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Exact weight [N, K] (float32 unless `dtype`)."""
    q, e = tensors["qweight"], tensors["exps"]
    N, K = params["out_features"], params["in_features"]
    g = params["group_size"]
    lut = decode_table(torch.float32).to(q.device)
    w = lut[q.long()]  # [N, K]
    if params.get("scope", "group") == "tensor":
        w = torch.ldexp(w, e.to(torch.int32).reshape(()).expand_as(w).float())
    else:
        G = e.shape[1]
        w = torch.nn.functional.pad(w, (0, G * g - K)).view(N, G, g)
        w = torch.ldexp(w, e.to(torch.float32).unsqueeze(-1)).view(N, G * g)[:, :K]
    return w.to(dtype) if dtype is not None else w


def linear_reference(x: torch.Tensor, tensors: dict, params: dict, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) -> [..., N] through the exact dequantized weight."""
    return torch.nn.functional.linear(x, dequantize(tensors, params, x.dtype), bias)


def use_triton(x: torch.Tensor) -> bool:
    from .gwint import use_triton as _use

    return triton is not None and _use(x)


def linear(x: torch.Tensor, tensors: dict, params: dict, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The op packed modules call: the Triton kernel on CUDA (fp16/bf16), the torch reference elsewhere."""
    if use_triton(x):
        return triton_linear(x, tensors, params, bias)
    return linear_reference(x, tensors, params, bias)


# --------------------------------------------------------------------------------------------------------------
# the Triton kernel

if triton is not None:

    @triton.jit
    def _rf8_mm_kernel(x_ptr, q_ptr, e_ptr, b_ptr, out_ptr, M, N, K, GS, stride_xm, stride_qn, stride_en, stride_eg,
                       stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        n_mask = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            k_mask = ks < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :], mask=m_mask[:, None] & k_mask[None, :],
                        other=0.0)  # [BM, BK]
            wmask = n_mask[:, None] & k_mask[None, :]
            q = tl.load(q_ptr + offs_n[:, None] * stride_qn + ks[None, :], mask=wmask, other=0).to(tl.int32)
            o = tl.load(e_ptr + offs_n[:, None] * stride_en + (ks // GS)[None, :] * stride_eg, mask=wmask,
                        other=0).to(tl.int32)  # [BN, BK]
            E = (q >> 3) & 15
            d = (q >> 1) & 3
            # 2^(E - 15 + o) and 2^-(d + 1) built in the float32 exponent field
            p = ((E + o + (127 - 15)) << 23).to(tl.float32, bitcast=True)
            h = ((126 - d) << 23).to(tl.float32, bitcast=True)
            h = tl.where((q & 1) == 1, -h, h)
            mag = p + p * h
            w = tl.where(E == 0, 0.0, tl.where((q & 128) != 0, -mag, mag))  # [BN, BK]
            if DOT_F32:
                acc += tl.dot(x.to(tl.float32), tl.trans(w))
            else:
                acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def default_config(M: int, N: int, K: int) -> dict:
    """Tile sizes: BLOCK_M covers small M in one tile (>= 16 for tl.dot); 64 x 64 weight tiles."""
    bm = min(64, max(16, _next_pow2(M)))
    bk = 32 if _interpreting() else 64
    bn = 32 if _interpreting() else 64
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=3)


def triton_linear(x: torch.Tensor, tensors: dict, params: dict, bias: torch.Tensor | None = None,
                  config: dict | None = None) -> torch.Tensor:
    """x [..., K] (fp16/bf16; fp32 under the interpreter) @ W^T (+ bias) -> [..., N] by `_rf8_mm_kernel`."""
    if triton is None:  # pragma: no cover
        raise RuntimeError("triton is not installed")
    K, N = params["in_features"], params["out_features"]
    rows = flat_rows(x, K, N)
    x2, out, M = rows.x2, rows.out, rows.M
    if M == 0:
        return rows.result()
    q, e = tensors["qweight"], tensors["exps"]
    per_tensor = e.numel() == 1 and params.get("scope", "group") == "tensor"
    stride_en, stride_eg = (0, 0) if per_tensor else (e.stride(0), e.stride(1))
    cfg = dict(config or default_config(M, N, K))
    bm, bn, bk = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    b = bias if bias is not None else x2
    _rf8_mm_kernel[grid](x2, q, e, b, out, M, N, K, params["group_size"], x2.stride(0), q.stride(0), stride_en,
                         stride_eg, out.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, HAS_BIAS=bias is not None,
                         DOT_F32=_interpreting() or x.dtype == torch.float32, **cfg)
    return rows.result()


# --------------------------------------------------------------------------------------------------------------
# the format

Rf8Format = function_format(
    FORMAT_NAME, FORMAT_VERSION,
    "RF8: one byte per weight (two signed powers of two) and an int8 exponent offset per group (layout above).",
    check_params=check_params, tensor_specs=tensor_specs, dequantize=dequantize, linear=linear)
