"""FineQuant: group-wise weight-only int8/int4/int3 (and int2) quantization, packed as `gwint`.

Scale-only symmetric by default, optional asymmetric zero points; group sizes from 16 to per-channel; partial last
groups are handled (never a skipped layer). Scales are stored in the model's dtype (fp16 or bf16) unless set.
"""

from __future__ import annotations

from typing import Literal, Union

import torch
from pydantic import Field, field_validator

from ..compress.formats import PackedTensor
from ..compress.passes import PassKind, TargetedPass, TensorState, register_pass
from ..kernels import gwint
from .groupwise import dequantize_codes, quantize_groupwise

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class FineQuant(TargetedPass):
    """Weight-only group-wise integer quantization of the targeted Linear layers."""

    type: Literal["finequant"] = "finequant"
    bits: Literal[2, 3, 4, 8] = 4
    group_size: Union[int, Literal["channel"]] = Field(128, description="weights per scale along the input; 'channel' = whole row")
    symmetric: bool = True
    scale_divisor: Literal["pow2", "pow2_minus_1"] = "pow2_minus_1"
    scale_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"

    kind = PassKind.TENSOR
    packs = True

    @field_validator("group_size")
    @classmethod
    def _group_size_range(cls, v):
        if isinstance(v, int) and v < 16:
            raise ValueError("group_size must be >= 16, or 'channel' for one scale per output row")
        return v


def effective_group_size(cfg: FineQuant, in_features: int) -> int:
    if cfg.group_size == "channel":
        return in_features
    return min(int(cfg.group_size), in_features)


def plan_finequant(cfg: FineQuant, modules) -> dict[str, str]:
    skipped = {}
    for m in modules:
        if m.shape is None or len(m.shape) != 2:
            skipped[m.name] = f"weight is not a matrix (shape {list(m.shape or [])})"
        elif m.dtype is not None and not m.dtype.is_floating_point:
            skipped[m.name] = f"weight dtype {m.dtype} is not floating point"
    return skipped


def apply_finequant(cfg: FineQuant, state: TensorState, ctx=None) -> TensorState:
    w = state.tensor  # [N, K]
    N, K = w.shape
    g = effective_group_size(cfg, K)
    scale_dtype = w.dtype if cfg.scale_dtype == "auto" and w.dtype in (torch.float16, torch.bfloat16) \
        else _DTYPES.get(cfg.scale_dtype, torch.float16)
    codes, scales, zeros = quantize_groupwise(w, cfg.bits, g, cfg.symmetric, cfg.scale_divisor, scale_dtype)
    tensors = {"qweight": gwint.pack_codes(codes, cfg.bits), "scales": scales}
    if zeros is not None:
        tensors["zeros"] = zeros
    params = {"in_features": K, "out_features": N, "bits": cfg.bits, "group_size": g, "symmetric": cfg.symmetric}
    deq = dequantize_codes(codes, scales, zeros, cfg.bits, g)
    err = (deq - w.float()).norm() / w.float().norm().clamp_min(1e-12)
    state.packed = PackedTensor("gwint", params, tensors)
    state.tensor = deq.to(w.dtype)
    state.facts["finequant"] = {"bits": cfg.bits, "group_size": g, "rel_error": round(float(err), 6)}
    return state


register_pass(FineQuant, apply=apply_finequant, plan=plan_finequant)
