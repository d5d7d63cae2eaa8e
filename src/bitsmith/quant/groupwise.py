"""Group-wise integer quantization of one weight matrix, the grid shared by FineQuant and int8.

w: [N, K] float. Groups of `group_size` consecutive input weights per output row; the last group may be partial.
Symmetric: scale = max|w| / D, q = clamp(round(w / scale), -2^(b-1), 2^(b-1) - 1), stored as code = q + 2^(b-1),
with D = 2^(b-1) ("pow2", the FasterTransformer convention: the positive max clips to (2^(b-1)-1)/2^(b-1) of itself)
or D = 2^(b-1) - 1 ("pow2_minus_1": no clipping, the most negative code unused).
Asymmetric: scale = (max - min) / (2^b - 1), zero = round(-min / scale),
code = clamp(round(w / scale) + zero, 0, 2^b - 1).

A `clip` factor per group (from `bitsmith.quant.clipping`) shrinks the range (max|w|, or max and min) before the scale
is computed; the codes then follow from that scale. Scales are rounded to their storage dtype before any code is
computed, so what is measured here is exactly what the packed format dequantizes to.
"""

from __future__ import annotations

import math

import torch

SCALE_BITS = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32}
ZERO_BITS = 8  # gwint stores zero points as uint8


def pad_to_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """[N, K] -> [N, G, g] (zero-padded), and K. Zero padding does not change any group's max or min sign, and
    padded zeros quantize to exactly zero (symmetric: q = 0; asymmetric: code = zero point)."""
    N, K = w.shape
    G = math.ceil(K / group_size)
    if G * group_size != K:
        w = torch.nn.functional.pad(w, (0, G * group_size - K))
    return w.view(N, G, group_size), K


def divisor_for(bits: int, scale_divisor: str) -> int:
    half = 1 << (bits - 1)
    return half if scale_divisor == "pow2" else max(half - 1, 1)


def group_scales(wg: torch.Tensor, bits: int, symmetric: bool, scale_divisor: str, scale_dtype: torch.dtype,
                 clip: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales [N, G] (float32 values exactly representable in scale_dtype) and zero points [N, G] (float32, asym)."""
    if symmetric:
        amax = wg.abs().amax(dim=-1)  # [N, G]
        if clip is not None:
            amax = amax * clip
        scale = (amax / divisor_for(bits, scale_divisor)).clamp_min(1e-10).to(scale_dtype).to(torch.float32)
        return torch.where(scale == 0, torch.full_like(scale, 1e-4), scale), None  # fp16 underflow of tiny groups
    levels = (1 << bits) - 1
    wmax, wmin = wg.amax(dim=-1).clamp_min(0), wg.amin(dim=-1).clamp_max(0)  # [N, G]; the range holds 0
    if clip is not None:
        wmax, wmin = wmax * clip, wmin * clip
    scale = ((wmax - wmin) / levels).clamp_min(1e-10).to(scale_dtype).to(torch.float32)
    scale = torch.where(scale == 0, torch.full_like(scale, 1e-4), scale)
    zero = torch.clamp(torch.round(-wmin / scale), 0, levels)
    return scale, zero


def group_codes(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Float codes [N, G, g] in 0 .. 2^b - 1 for the given scales (and zero points)."""
    if zero is None:
        half = 1 << (bits - 1)
        return torch.clamp(torch.round(wg / scale.unsqueeze(-1)), -half, half - 1) + half
    levels = (1 << bits) - 1
    return torch.clamp(torch.round(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, levels)


def group_dequant(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    z = float(1 << (bits - 1)) if zero is None else zero.unsqueeze(-1)
    return (codes - z) * scale.unsqueeze(-1)


def group_sq_error(wg: torch.Tensor, bits: int, symmetric: bool, scale_divisor: str, scale_dtype: torch.dtype,
                   clip: torch.Tensor | float | None = None) -> torch.Tensor:
    """Squared reconstruction error per group [N, G] (float32) of quantizing wg [N, G, g] (float32).

    The same arithmetic as group_codes + group_dequant (so the same numbers), done in place to save memory passes.
    """
    scale, zero = group_scales(wg, bits, symmetric, scale_divisor, scale_dtype, clip)
    s = scale.unsqueeze(-1)
    x = torch.round(wg / s)
    if zero is None:
        half = 1 << (bits - 1)
        x.clamp_(-half, half - 1)
    else:
        z = zero.unsqueeze(-1)
        x.add_(z).clamp_(0, (1 << bits) - 1).sub_(z)
    return x.mul_(s).sub_(wg).square_().sum(dim=-1)


def quantize_groupwise(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = True,
                       scale_divisor: str = "pow2_minus_1", scale_dtype: torch.dtype = torch.float16,
                       clip: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Returns codes uint8 [N, K], scales [G, N] (scale_dtype), zeros uint8 [G, N] or None.

    `clip` (optional, [N, G] in (0, 1]) shrinks each group's range before computing its scale (clipping search).
    """
    wg, K = pad_to_groups(w.to(torch.float32), group_size)  # [N, G, g]
    N, G, g = wg.shape
    scale, zero = group_scales(wg, bits, symmetric, scale_divisor, scale_dtype, clip)
    codes = group_codes(wg, scale, zero, bits).to(torch.uint8).view(N, G * g)[:, :K].contiguous()
    zeros = None if zero is None else zero.to(torch.uint8).t().contiguous()  # [G, N]
    return codes, scale.to(scale_dtype).t().contiguous(), zeros


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                     group_size: int) -> torch.Tensor:
    """The float32 weight [N, K] the codes stand for (same rule as the packed format's dequantize)."""
    N, K = codes.shape
    group_of_k = torch.arange(K) // group_size
    s = scales.to(torch.float32).t()[:, group_of_k]
    z = float(1 << (bits - 1)) if zeros is None else zeros.to(torch.float32).t()[:, group_of_k]
    return (codes.to(torch.float32) - z) * s


def storage_bits(out_features: int, in_features: int, bits: int, group_size: int, symmetric: bool,
                 scale_bits: int = 16) -> int:
    """Bits a quantized matrix costs: b per weight, plus per (group, row) a scale and, when asymmetric, a zero point.

    This is the count that `bits_budget` constrains (code bits at their nominal width; gwint's int32 words waste
    2 bits per 10 codes at b = 3, and `packed_bits` counts that too).
    """
    groups = math.ceil(in_features / group_size)
    per_group = scale_bits + (0 if symmetric else ZERO_BITS)
    return out_features * (in_features * bits + groups * per_group)


def packed_bits(out_features: int, in_features: int, bits: int, group_size: int, symmetric: bool,
                scale_bits: int = 16) -> int:
    """Bits gwint actually stores: int32 words of floor(32 / b) codes, scales, zero points."""
    words = math.ceil(in_features / (32 // bits))
    groups = math.ceil(in_features / group_size)
    per_group = scale_bits + (0 if symmetric else ZERO_BITS)
    return out_features * (words * 32 + groups * per_group)
