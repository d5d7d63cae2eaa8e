"""bipolar-INT: arbitrary-precision (1..8 bits) symmetric odd-level quantization, packed as `bitplane`.

Each weight is s * q with q in the odd levels +-1, +-3, ..., +-(2^b - 1) (no zero level), one scale s per group of
`group_size` consecutive input weights of an output row (the last group may be partial). Naive rounding takes
s = max|w| / (2^b - 1); `scale_search` (the default) picks, per group, the scale that minimises the squared error
over a grid of shrink factors, then refines it by least squares (s = <w, q> / <q, q> for the chosen levels, kept
only where it lowers the error). With `importance: columns` (the default) the squared error is weighted per input
channel by 1 / mean|W[:, k]|^2: no calibration data, but it tracks the channels with large activations, where
bipolar's missing zero level costs most (docs/results/bitplane.md). Per-layer bit widths: `bits: {default: 3, "re:.*down_proj": 4}`
(see `bitsmith.quant.bits_spec`). `rounding: gptq` rounds with calibration error feedback on the same grid
(`bitsmith.quant.gptq`): each group's scale is searched first (weighted by the calibration Hessian's diagonal
instead of the weights-only column importance), then the levels are chosen column by column.
"""

from __future__ import annotations

import logging
import math
from typing import Literal, Union

import torch
from pydantic import Field, field_validator, model_validator

from ..compress.formats import PackedTensor
from ..compress.inventory import non_matrix_reasons
from ..compress.passes import TensorState, register_pass
from ..kernels import bitplane
from . import bits_spec, gptq
from .bits_spec import BitsSpec

log = logging.getLogger("bitsmith")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SEARCH_GRID = torch.linspace(0.1, 1.0, 19)  # shrink factors of max|w| / (2^b - 1) tried by the scale search
SEARCH_FINE = torch.tensor([-0.04, -0.03, -0.02, -0.01, 0.01, 0.02, 0.03, 0.04])  # then around each group's best


# --------------------------------------------------------------------------------------------------------------
# shared by bipolar and bcq


def check_group_size(v):
    if v == "channel":
        return v
    if isinstance(v, bool) or not isinstance(v, int) or v < 32 or v % 32 != 0:
        raise ValueError("group_size must be a multiple of 32 (>= 32; the kernels' K-tiles are whole 32-bit words"
                         " inside one group), or 'channel' for one group per output row")
    return v


def effective_group_size(group_size: Union[int, str], in_features: int) -> int:
    return in_features if group_size == "channel" else min(int(group_size), in_features)


def coef_dtype(setting: str, w: torch.Tensor) -> torch.dtype:
    if setting == "auto":
        return w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.float16
    return _DTYPES[setting]


def grouped(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (float32 [N, G, g] zero-padded, mask [1, G, g] of real weights)."""
    N, K = w.shape
    G = math.ceil(K / group_size)
    pad = G * group_size - K
    wf = torch.nn.functional.pad(w.to(torch.float32), (0, pad)).view(N, G, group_size)
    mask = (torch.arange(G * group_size, device=w.device) < K).view(1, G, group_size)
    return wf, mask


def ungroup(t: torch.Tensor, K: int) -> torch.Tensor:
    """[N, G, g] -> [N, K]."""
    return t.reshape(t.shape[0], -1)[:, :K]


def plan_matrices(cfg, modules) -> dict[str, str]:
    """Skip reasons shared by bit-plane passes; checks the per-layer bits keys and logs the average bits."""
    cfg.plan_rounding()
    skipped = non_matrix_reasons(modules)
    kept = [m for m in modules if m.name not in skipped]
    bits_spec.check_patterns(cfg.bits, kept, f"{cfg.type}.bits")
    log.info("%s: %s", cfg.type, bits_spec.describe(cfg.bits, kept, lambda b, k: stored_overhead(cfg, b, k)))
    return skipped


def stored_overhead(cfg, bits: int, in_features: int) -> float:
    """Bits per weight spent on scales / alphas / offsets (16-bit each) for one module."""
    g = effective_group_size(cfg.group_size, in_features)
    per_group = 1 if cfg.type == "bipolar" else bits
    per_group += 1 if getattr(cfg, "offset", False) else 0
    return 16.0 * per_group * math.ceil(in_features / g) / in_features


# --------------------------------------------------------------------------------------------------------------
# bipolar quantization


def _levels(wg: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """u in 0..2^b-1 for wg [N, G, g] and scales s [N, G] (float32, > 0)."""
    L = (1 << bits) - 1
    return torch.clamp(torch.round((wg / s.unsqueeze(-1) + L) * 0.5), 0, L)


def _err(wg, weight, s, u, bits):
    L = (1 << bits) - 1
    d = wg - s.unsqueeze(-1) * (2.0 * u - L)
    return (d * d * weight).sum(-1)


def column_importance(w: torch.Tensor) -> torch.Tensor:
    """A weights-only guess of how much each input channel's error costs: 1 / (mean |W[:, k]|)^2, mean 1.

    Trained LLMs meet input channels with large activations with small weight columns; an error of a given size
    in such a column costs more. Used as per-column weights of the squared error (`importance: columns`).
    """
    col = w.float().abs().mean(0)
    h = 1.0 / (col.clamp_min(col.mean() * 1e-3) ** 2)
    return h / h.mean()


def quantize_bipolar(w: torch.Tensor, bits: int, group_size: int, scale_search: bool = True,
                     scale_dtype: torch.dtype = torch.float16, col_weight: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (codes u uint8 [N, K], scales [G, N] in scale_dtype); W^ = s (2u - (2^b - 1)).

    The search minimises the squared error, weighted per input channel by `col_weight` [K] when given.
    Scales are rounded to scale_dtype before the final rounding of the weights, so the codes fit the stored scales.
    """
    N, K = w.shape
    wg, mask = grouped(w, group_size)
    if col_weight is not None:
        cw, _ = grouped(col_weight.view(1, K).to(torch.float32), group_size)
        mask = mask * cw  # [1, G, g], zero on padding
    L = (1 << bits) - 1
    amax = wg.abs().amax(-1).clamp_min(1e-12)  # [N, G]
    base = amax / L
    best_s = base
    if scale_search:
        best_e = _err(wg, mask, base, _levels(wg, base, bits), bits)

        def consider(s):
            nonlocal best_e, best_s
            e = _err(wg, mask, s, _levels(wg, s, bits), bits)
            better = e < best_e
            best_e = torch.where(better, e, best_e)
            best_s = torch.where(better, s, best_s)

        for c in SEARCH_GRID.tolist():  # coarse grid of shrink factors, then a finer one around each group's best
            consider(base * c)
        center = best_s / base
        for d in SEARCH_FINE.tolist():
            consider(base * (center + d).clamp(0.02, 1.0))
        for _ in range(2):  # least-squares refinement of the scale for the chosen levels
            q = 2.0 * _levels(wg, best_s, bits) - L
            consider(((mask * wg * q).sum(-1) / (mask * q * q).sum(-1).clamp_min(1e-12)).clamp_min(1e-12))
    s = best_s.to(scale_dtype).to(torch.float32)
    s = torch.where(s > 0, s, torch.full_like(s, torch.finfo(scale_dtype).tiny))  # fp16 underflow of tiny groups
    u = _levels(wg, s, bits)
    return ungroup(u, K).to(torch.uint8), s.to(scale_dtype).t().contiguous()


# --------------------------------------------------------------------------------------------------------------
# the pass


class BitplaneQuantizer(gptq.QuantizerPass):
    """What Bipolar and BCQ share: both pack `bitplane`, validate `bits` (1..8, or per layer) and `group_size` (a
    multiple of 32, or "channel") the same way, and give GPTQ their grid the same arguments. The subclasses declare
    the fields themselves (their own defaults and help texts)."""

    packs = True

    @field_validator("bits", mode="before", check_fields=False)
    @classmethod
    def _bits(cls, v):
        return bits_spec.validate_bits(v, range(1, 9))

    @field_validator("group_size", mode="before", check_fields=False)
    @classmethod
    def _group_size(cls, v):
        return check_group_size(v)

    @model_validator(mode="after")
    def _rounding(self):
        return self.check_rounding()

    def layer_bits(self, state: TensorState) -> int:
        """The bit width of this state's module (per-layer `bits` resolved)."""
        return bits_spec.bits_for(self.bits, state.module, (state.module_class,) if state.module_class else ())

    def grid_args(self, state: TensorState, hdiag: torch.Tensor | None, group_size: int | None
                  ) -> tuple[torch.Tensor, int, int, torch.Tensor | None]:
        """(weight [N, K], bits, group size, per-column error weights or None) for the pass's `ColumnGrid`."""
        w = state.tensor
        return (w, self.layer_bits(state), group_size or effective_group_size(self.group_size, w.shape[1]),
                hessian_importance(hdiag) if self.importance == "columns" else None)


class Bipolar(BitplaneQuantizer):
    """bipolar-INT weight quantization of the targeted Linear layers (odd symmetric levels, group-wise scales)."""

    type: Literal["bipolar"] = "bipolar"
    bits: BitsSpec = Field(4, description="1..8, or {default: b, <module pattern>: b, ...} per layer")
    group_size: Union[int, Literal["channel"]] = Field(128, description="weights per scale along the input")
    scale_search: bool = Field(True, description="per-group scale search (MSE) instead of max|w| / (2^b - 1)")
    importance: Literal["none", "columns"] = Field(
        "columns", description="search weights per input channel: 1 / mean|W[:, k]|^2 (weights only)")
    scale_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"

    def column_grid(self, state: TensorState, hdiag: torch.Tensor | None = None, group_size: int | None = None
                    ) -> "BipolarGrid":
        return BipolarGrid(self, *self.grid_args(state, hdiag, group_size))


def pack_result(state: TensorState, kind: str, bits: int, g: int, codes: torch.Tensor, coef: torch.Tensor,
                offset: torch.Tensor | None, facts_key: str, extra_facts: dict | None = None) -> TensorState:
    """Store a bit-plane result on the state: packed tensors, the exact dequantized weight, and the facts."""
    w = state.tensor
    N, K = w.shape
    tensors = {"planes": bitplane.pack_planes(codes, bits), ("scales" if kind == "bipolar" else "alphas"): coef}
    if offset is not None:
        tensors["offset"] = offset
    params = {"in_features": K, "out_features": N, "bits": bits, "group_size": g, "kind": kind,
              "offset": offset is not None}
    packed = PackedTensor(bitplane.FORMAT_NAME, params, tensors)
    deq = bitplane.dequantize(tensors["planes"], coef, offset, kind, g, K, dtype=torch.float32)
    err = (deq - w.float()).norm() / w.float().norm().clamp_min(1e-12)
    state.packed = packed
    state.tensor = deq.to(w.dtype)
    state.facts[facts_key] = {"bits": bits, "group_size": g, "rel_error": round(float(err), 6),
                              "bits_per_weight": round(packed.nbytes * 8 / (N * K), 4), **(extra_facts or {})}
    return state


def hessian_importance(hdiag: torch.Tensor | None) -> torch.Tensor | None:
    """Per-input-channel weights of the squared error from the calibration Hessian's diagonal (mean 1)."""
    if hdiag is None:
        return None
    h = hdiag.to(torch.float32).clamp_min(0)
    m = h.mean()
    return h / m if float(m) > 0 else None


class BipolarGrid:
    """bipolar-INT's grid for GPTQ (`bitsmith.quant.gptq.ColumnGrid`): a group's scale is searched on its current
    weights (as `quantize_bipolar` does), then each column takes its nearest odd level."""

    def __init__(self, cfg: Bipolar, w: torch.Tensor, bits: int, group_size: int, col_weight: torch.Tensor | None):
        N, K = w.shape
        self.cfg, self.bits, self.group_size, self.col_weight = cfg, bits, group_size, col_weight
        self.dtype = coef_dtype(cfg.scale_dtype, w)
        self.scales = torch.ones(math.ceil(K / group_size), N, device=w.device)  # float32, exact in self.dtype
        self.L = (1 << bits) - 1

    def fit_group(self, gi: int, w: torch.Tensor) -> None:
        lo = gi * self.group_size
        cw = None if self.col_weight is None else self.col_weight[lo:lo + w.shape[1]]
        _, s = quantize_bipolar(w, self.bits, w.shape[1], self.cfg.scale_search, self.dtype, cw)
        self.scales[gi] = s[0].to(torch.float32)

    def quantize(self, gi: int, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scales[gi]
        u = torch.clamp(torch.round((col / s + self.L) * 0.5), 0, self.L)
        return s * (2.0 * u - self.L), u

    def pack(self, state: TensorState, codes: torch.Tensor) -> tuple[TensorState, torch.Tensor]:
        scales = self.scales.to(self.dtype).contiguous()  # [G, N]
        deq = bitplane.dequantize(bitplane.pack_planes(codes, self.bits), scales, None, "bipolar", self.group_size,
                                  codes.shape[1], dtype=torch.float32)
        return pack_result(state, "bipolar", self.bits, self.group_size, codes, scales, None, "bipolar"), deq


def _bipolar_nearest(cfg: Bipolar, state: TensorState) -> TensorState:
    w = state.tensor  # [N, K]
    bits = cfg.layer_bits(state)
    g = effective_group_size(cfg.group_size, w.shape[1])
    cw = column_importance(w) if cfg.importance == "columns" and cfg.scale_search else None
    codes, scales = quantize_bipolar(w, bits, g, cfg.scale_search, coef_dtype(cfg.scale_dtype, w), cw)
    return pack_result(state, "bipolar", bits, g, codes, scales, None, "bipolar")


apply_bipolar = gptq.rounding_handler(
    _bipolar_nearest, plan_matrices, "apply_bipolar",
    """Tensor pass (rounding nearest): one TensorState. Model pass (rounding gptq): the model; returns the packed
    states by weight name.""")


register_pass(Bipolar, apply=apply_bipolar, plan=plan_matrices)
