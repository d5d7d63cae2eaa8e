"""Group-wise integer quantization of one weight matrix (round-to-nearest), the grid shared by FineQuant and int8.

w: [N, K] float. Groups of `group_size` consecutive input weights per output row; the last group may be partial.
Symmetric: scale = max|w| / D, q = clamp(round(w / scale), -2^(b-1), 2^(b-1) - 1), stored as code = q + 2^(b-1),
with D = 2^(b-1) ("pow2", the FasterTransformer convention: the positive max clips to (2^(b-1)-1)/2^(b-1) of itself)
or D = 2^(b-1) - 1 ("pow2_minus_1": no clipping, the most negative code unused).
Asymmetric: scale = (max - min) / (2^b - 1), zero = round(-min / scale), code = clamp(round(w / scale) + zero, 0, 2^b - 1).
"""

from __future__ import annotations

import math

import torch


def pad_to_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """[N, K] -> [N, G, g] (zero-padded), and K. Zero padding does not change any group's max or min sign."""
    N, K = w.shape
    G = math.ceil(K / group_size)
    if G * group_size != K:
        w = torch.nn.functional.pad(w, (0, G * group_size - K))
    return w.view(N, G, group_size), K


def quantize_groupwise(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = True,
                       scale_divisor: str = "pow2_minus_1", scale_dtype: torch.dtype = torch.float16,
                       clip: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Returns codes uint8 [N, K], scales [G, N] (scale_dtype), zeros uint8 [G, N] or None.

    `clip` (optional, [N, G] in (0, 1]) shrinks each group's range before computing its scale (clipping search).
    Scales are rounded to scale_dtype *before* the codes are computed, so dequantization is exactly what was fitted.
    """
    wg, K = pad_to_groups(w.to(torch.float32), group_size)  # [N, G, g]
    N, G, g = wg.shape
    if symmetric:
        half = 1 << (bits - 1)
        divisor = half if scale_divisor == "pow2" else max(half - 1, 1)
        amax = wg.abs().amax(dim=-1)  # [N, G]
        if clip is not None:
            amax = amax * clip
        scale = (amax / divisor).clamp_min(1e-10).to(scale_dtype).to(torch.float32)
        scale = torch.where(scale == 0, torch.full_like(scale, 1e-4), scale)  # fp16 underflow of tiny groups
        q = torch.clamp(torch.round(wg / scale.unsqueeze(-1)), -half, half - 1)
        codes = (q + half).to(torch.uint8)
        zeros = None
    else:
        levels = (1 << bits) - 1
        wmax, wmin = wg.amax(dim=-1).clamp_min(0), wg.amin(dim=-1).clamp_max(0)  # [N, G]; the range holds 0
        if clip is not None:
            wmax, wmin = wmax * clip, wmin * clip
        scale = ((wmax - wmin) / levels).clamp_min(1e-10).to(scale_dtype).to(torch.float32)
        scale = torch.where(scale == 0, torch.full_like(scale, 1e-4), scale)
        zero = torch.clamp(torch.round(-wmin / scale), 0, levels)
        codes = torch.clamp(torch.round(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, levels).to(torch.uint8)
        zeros = zero.to(torch.uint8).t().contiguous()  # [G, N]
    codes = codes.view(N, G * g)[:, :K].contiguous()
    return codes, scale.to(scale_dtype).t().contiguous(), zeros


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                     group_size: int) -> torch.Tensor:
    """The float32 weight [N, K] the codes stand for (same rule as the packed format's dequantize)."""
    N, K = codes.shape
    group_of_k = torch.arange(K) // group_size
    s = scales.to(torch.float32).t()[:, group_of_k]
    z = float(1 << (bits - 1)) if zeros is None else zeros.to(torch.float32).t()[:, group_of_k]
    return (codes.to(torch.float32) - z) * s
