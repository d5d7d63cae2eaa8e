"""BCQ (binary-coding quantization, LUT-GEMM): W ~ sum_i alpha_i d_i (+ offset), packed as `bitplane`.

q sign planes d_i in {-1, +1}, one alpha per (plane, group of `group_size` input weights, output row), and optionally
one offset per group (`offset: true`, which lets uniform grids be expressed). Fitting, per group:

1. starts: the paper's greedy initialisation (r = w, minus the group mean with an offset; for each plane
   d_i = sign(r), alpha_i = mean|r|, r -= alpha_i d_i) and, with `init: both` (the default), also the bipolar-INT
   fit (alpha_i = 2^i s, s from its scale search): ALS from the greedy start alone lands in poor local optima at 4+
   bits, where the uniform grid is close to optimal;
2. from each start, alternating least squares, `iters` rounds: alphas (and offset) by least squares for the
   current planes (a tiny ridge keeps degenerate groups solvable), then the planes by picking, for every weight,
   the nearest of the 2^q values sum_i +-alpha_i (+ offset) (exact: sorted values, midpoints / binary search);
3. the coefficients are rounded to the stored dtype and the planes are re-assigned once more for them, so the codes
   are the best ones for exactly what is stored. The best fit seen (squared error per group, over all
   starts and rounds) is kept, so the result is never worse than any start.

`rounding: gptq` (`bitsmith.quant.gptq`): each group's alphas (and offset) are fitted first, as above, on the group's
current weights (weighted by the calibration Hessian's diagonal with `importance: columns`); then every column takes,
per weight, the nearest of the group's 2^q values, with GPTQ error feedback between columns.
"""

from __future__ import annotations

import math
from typing import Literal, Union

import torch
from pydantic import Field

from ..compress.passes import TensorState, register_pass
from ..kernels import bitplane
from . import gptq
from .bipolar import (BitplaneQuantizer, coef_dtype, column_importance, effective_group_size, grouped,
                      pack_result, plan_matrices, ungroup)
from .bits_spec import BitsSpec


def _patterns(bits: int, device) -> torch.Tensor:
    """[2^b, b] digits +-1: row p has d_i = +1 where bit i of p is set (so the code of a weight is p)."""
    p = torch.arange(1 << bits, device=device)
    return (((p[:, None] >> torch.arange(bits, device=device)) & 1) * 2 - 1).to(torch.float32)


def _assign(wg: torch.Tensor, alphas: torch.Tensor, off: torch.Tensor | None, pats: torch.Tensor) -> torch.Tensor:
    """Nearest code (long [N, G, g]) for each weight: alphas [N, G, b], off [N, G] or None."""
    vals = _values(alphas, off, pats)  # [N, G, 2^b]
    sv, perm = vals.sort(-1)
    N, G, g = wg.shape
    if sv.shape[-1] <= 16:  # count the midpoints below each weight: cheaper than a binary search here
        mids = 0.5 * (sv[..., 1:] + sv[..., :-1])  # [N, G, 2^b - 1]
        idx = (wg.unsqueeze(-1) > mids.unsqueeze(2)).sum(-1)  # [N, G, g]
        return perm.gather(-1, idx)
    flat_v = sv.reshape(N * G, -1).contiguous()
    flat_w = wg.reshape(N * G, g).contiguous()
    hi = torch.searchsorted(flat_v, flat_w).clamp_max(flat_v.shape[1] - 1)
    lo = (hi - 1).clamp_min(0)
    pick_lo = (flat_w - flat_v.gather(1, lo)).abs() <= (flat_v.gather(1, hi) - flat_w).abs()
    idx = torch.where(pick_lo, lo, hi)
    return perm.reshape(N * G, -1).gather(1, idx).view(N, G, g)


def _values(alphas, off, pats):
    """The 2^b representable values of every group: [N, G, 2^b]."""
    vals = alphas @ pats.t()
    return vals + off.unsqueeze(-1) if off is not None else vals


def _stats(wg, mask, codes, n_codes):
    """Per group and code: how many real weights have it, and their sum -> two [N, G, 2^b] tensors."""
    shape = wg.shape[:2] + (n_codes,)
    ones = mask.expand_as(wg).to(torch.float32)
    count = torch.zeros(shape, device=wg.device).scatter_add_(-1, codes, ones)
    total = torch.zeros(shape, device=wg.device).scatter_add_(-1, codes, wg * ones)
    return count, total


def _solve(wg, mask, codes, pats, with_offset: bool):
    """Least-squares alphas [N, G, b] (and offset [N, G]) for fixed codes, over the real weights only.

    D^T D and D^T w come from per-code counts and sums (no [N, G, g, b] tensor); a tiny ridge keeps groups whose
    planes are linearly dependent solvable.
    """
    A_pats = torch.cat([pats, torch.ones(pats.shape[0], 1, device=pats.device)], 1) if with_offset else pats
    count, total = _stats(wg, mask, codes, pats.shape[0])
    outer = (A_pats.unsqueeze(2) * A_pats.unsqueeze(1)).reshape(pats.shape[0], -1)  # [2^b, p*p]
    p = A_pats.shape[1]
    A = (count @ outer).view(*count.shape[:2], p, p).double()
    rhs = (total @ A_pats).double()  # [N, G, p]
    ridge = 1e-6 * A.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
    A = A + ridge[..., None, None] * torch.eye(p, device=A.device, dtype=A.dtype)
    sol = torch.linalg.solve(A, rhs.unsqueeze(-1)).squeeze(-1).to(torch.float32)
    if with_offset:
        return sol[..., :-1].contiguous(), sol[..., -1].contiguous()
    return sol, None


def _sq_err(wg, mask, codes, alphas, off, pats):
    vals = _values(alphas, off, pats)
    d = wg - vals.gather(-1, codes)
    return (d * d * mask).sum(-1)  # [N, G]


def _keep_better(best, cand):
    """Per group, the fit with the lower squared error: tuples (err [N, G], codes, alphas, offset)."""
    better = cand[0] < best[0]
    b1 = better.unsqueeze(-1)
    return (torch.where(better, cand[0], best[0]), torch.where(b1, cand[1], best[1]),
            torch.where(b1, cand[2], best[2]), None if cand[3] is None else torch.where(better, cand[3], best[3]))


def quantize_bcq(w: torch.Tensor, bits: int, group_size: int, iters: int = 10, offset: bool = False,
                 coef_dtype: torch.dtype = torch.float16, init: str = "both", col_weight: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """w [N, K] -> (codes uint8 [N, K] (bit i = plane i), alphas [b, G, N], offset [G, N] or None).

    init: "greedy" (the paper's start), "bipolar" (alpha_i = 2^i s from the bipolar scale search) or "both" (ALS
    from each; the better fit per group is kept, so BCQ is never worse than bipolar-INT at equal group size).
    col_weight [K]: per-input-channel weights of the squared error (weighted least squares; the nearest-value
    assignment does not depend on them).
    """
    N, K = w.shape
    wg, mask = grouped(w, group_size)
    maskf = mask.to(torch.float32)
    if col_weight is not None:
        maskf = maskf * grouped(col_weight.view(1, K).to(torch.float32), group_size)[0]
    pats = _patterns(bits, w.device)
    count = maskf.sum(-1)  # [1, G]
    starts = []
    if init in ("greedy", "both"):
        off = (wg * maskf).sum(-1) / count if offset else None
        r = wg - off.unsqueeze(-1) if offset else wg.clone()
        alphas = torch.empty(N, wg.shape[1], bits, device=w.device)
        for i in range(bits):  # greedy: each plane fits the residual of the previous ones
            d = torch.where(r >= 0, 1.0, -1.0)
            a = (r.abs() * maskf).sum(-1) / count
            alphas[..., i] = a
            r = r - a.unsqueeze(-1) * d
        starts.append((alphas, off))
    if init in ("bipolar", "both"):  # bipolar-INT is BCQ with alpha_i = 2^i s: start from its searched scale
        from .bipolar import quantize_bipolar

        _, s = quantize_bipolar(w, bits, group_size, True, torch.float32, col_weight)
        alphas = s.t().unsqueeze(-1) * (2.0 ** torch.arange(bits, device=w.device))
        starts.append((alphas, torch.zeros_like(s.t()) if offset else None))
    best = None
    for alphas, off in starts:
        codes = _assign(wg, alphas, off, pats)
        cand = (_sq_err(wg, maskf, codes, alphas, off, pats), codes, alphas, off)
        best = cand if best is None else _keep_better(best, cand)
        for _ in range(iters):  # alternating least squares
            alphas, off = _solve(wg, maskf, codes, pats, offset)
            codes = _assign(wg, alphas, off, pats)
            best = _keep_better(best, (_sq_err(wg, maskf, codes, alphas, off, pats), codes, alphas, off))
    _, codes, alphas, off = best
    alphas = alphas.to(coef_dtype).to(torch.float32)  # what is stored; planes re-fit to it
    if offset:
        off = off.to(coef_dtype).to(torch.float32)
    codes = _assign(wg, alphas, off, pats)
    codes = ungroup(codes, K).to(torch.uint8)
    alphas_out = alphas.permute(2, 1, 0).to(coef_dtype).contiguous()  # [b, G, N]
    off_out = off.t().to(coef_dtype).contiguous() if offset else None
    return codes, alphas_out, off_out


class BCQ(BitplaneQuantizer):
    """Binary-coding quantization (LUT-GEMM) of the targeted Linear layers: per-plane, per-group alphas."""

    type: Literal["bcq"] = "bcq"
    bits: BitsSpec = Field(3, description="planes q, 1..8, or {default: q, <module pattern>: q, ...} per layer")
    group_size: Union[int, Literal["channel"]] = Field(128, description="weights per alpha along the input")
    offset: bool = Field(False, description="one extra offset per group (W ~ sum_i alpha_i d_i + offset)")
    iters: int = Field(10, ge=0, le=200, description="alternating least-squares rounds from each start")
    init: Literal["greedy", "bipolar", "both"] = Field(
        "both", description="ALS start: the greedy residual fit, the bipolar-INT fit (alpha_i = 2^i s), or both "
                            "(the better per group is kept)")
    importance: Literal["none", "columns"] = Field(
        "columns", description="weight the squared error per input channel by 1 / mean|W[:, k]|^2 (weights only)")
    scale_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"

    def column_grid(self, state: TensorState, hdiag: torch.Tensor | None = None, group_size: int | None = None
                    ) -> "BCQGrid":
        return BCQGrid(self, *self.grid_args(state, hdiag, group_size))


class BCQGrid:
    """BCQ's grid for GPTQ (`bitsmith.quant.gptq.ColumnGrid`): a group's alphas (and offset) are fitted on its current
    weights by `quantize_bcq`; a column then takes, per weight, the nearest of the group's 2^q values."""

    def __init__(self, cfg: BCQ, w: torch.Tensor, bits: int, group_size: int, col_weight: torch.Tensor | None):
        N, K = w.shape
        G = math.ceil(K / group_size)
        self.cfg, self.bits, self.group_size, self.col_weight = cfg, bits, group_size, col_weight
        self.dtype = coef_dtype(cfg.scale_dtype, w)
        self.alphas = torch.zeros(bits, G, N, dtype=self.dtype, device=w.device)
        self.offset = torch.zeros(G, N, dtype=self.dtype, device=w.device) if cfg.offset else None
        self.pats = _patterns(bits, w.device)
        self._sorted: dict[int, tuple] = {}

    def fit_group(self, gi: int, w: torch.Tensor) -> None:
        lo = gi * self.group_size
        cw = None if self.col_weight is None else self.col_weight[lo:lo + w.shape[1]]
        _, a, off = quantize_bcq(w, self.bits, w.shape[1], self.cfg.iters, self.cfg.offset, self.dtype,
                                 self.cfg.init, cw)
        self.alphas[:, gi] = a[:, 0]
        if off is not None:
            self.offset[gi] = off[0]
        a32 = a[:, 0].to(torch.float32)  # [q, N]
        vals = torch.zeros(a32.shape[1], self.pats.shape[0], device=a32.device)  # [N, 2^q], summed in the
        for i in range(self.bits):  # format's order (plane 0 first, then the offset), so values match it exactly
            vals += a32[i].unsqueeze(1) * self.pats[:, i].unsqueeze(0)
        if off is not None:
            vals += off[0].to(torch.float32).unsqueeze(1)
        sv, perm = vals.sort(-1)
        self._sorted[gi] = (sv, perm, 0.5 * (sv[:, 1:] + sv[:, :-1]))

    def quantize(self, gi: int, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sv, perm, mids = self._sorted[gi]
        idx = (col.unsqueeze(1) > mids).sum(1, keepdim=True)  # [N, 1]
        return sv.gather(1, idx).view(-1), perm.gather(1, idx).view(-1)

    def pack(self, state: TensorState, codes: torch.Tensor) -> tuple[TensorState, torch.Tensor]:
        alphas = self.alphas.contiguous()
        deq = bitplane.dequantize(bitplane.pack_planes(codes, self.bits), alphas, self.offset, "bcq",
                                  self.group_size, codes.shape[1], dtype=torch.float32)
        return pack_result(state, "bcq", self.bits, self.group_size, codes, alphas, self.offset, "bcq",
                           {"offset": self.cfg.offset}), deq


def _bcq_nearest(cfg: BCQ, state: TensorState) -> TensorState:
    w = state.tensor  # [N, K]
    bits = cfg.layer_bits(state)
    g = effective_group_size(cfg.group_size, w.shape[1])
    cw = column_importance(w) if cfg.importance == "columns" else None
    codes, alphas, off = quantize_bcq(w, bits, g, cfg.iters, cfg.offset, coef_dtype(cfg.scale_dtype, w),
                                      cfg.init, cw)
    return pack_result(state, "bcq", bits, g, codes, alphas, off, "bcq", {"offset": cfg.offset})


apply_bcq = gptq.rounding_handler(
    _bcq_nearest, plan_matrices, "apply_bcq",
    """Tensor pass (rounding nearest): one TensorState. Model pass (rounding gptq): the model; returns the packed
    states by weight name.""")

register_pass(BCQ, apply=apply_bcq, plan=plan_matrices)
