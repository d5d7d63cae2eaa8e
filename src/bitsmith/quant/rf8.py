"""`rf8`: pack the targeted Linear weights in the RF8 code (one byte per weight: two signed powers of two, exponents
1 to 4 apart, and an int8 exponent offset per group, per output channel or per tensor). Layout and rounding in
`bitsmith.kernels.rf8`; docs/formats/rf8.md.

    passes:
      - {type: rf8, group_size: channel}
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import Field, field_validator

from ..compress.formats import PackedTensor
from ..compress.passes import PassKind, TargetedPass, TensorState, register_pass
from ..kernels import rf8


class RF8(TargetedPass):
    """Round every targeted weight to the nearest RF8 value and pack it (format `rf8`)."""

    type: Literal["rf8"] = "rf8"
    group_size: Union[int, Literal["channel", "tensor"]] = Field(
        "channel", description="weights per exponent offset along the input; 'channel' = a row; 'tensor' = one")

    kind = PassKind.TENSOR
    packs = True

    @field_validator("group_size")
    @classmethod
    def _positive(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("group_size must be a positive integer, 'channel' or 'tensor'")
        return v


def plan_rf8(cfg: RF8, modules) -> dict[str, str]:
    skipped = {}
    for m in modules:
        if m.shape is None or len(m.shape) != 2:
            skipped[m.name] = f"weight is not a matrix (shape {list(m.shape or [])})"
        elif m.dtype is not None and not m.dtype.is_floating_point:
            skipped[m.name] = f"weight dtype {m.dtype} is not floating point"
    return skipped


def apply_rf8(cfg: RF8, state: TensorState, ctx=None) -> TensorState:
    w = state.tensor  # [N, K]
    if cfg.group_size == "tensor":
        tensors, params = rf8.pack(w, None, "tensor")
    else:
        tensors, params = rf8.pack(w, None if cfg.group_size == "channel" else cfg.group_size)
    deq = rf8.dequantize(tensors, params)
    err = (deq - w.float()).norm() / w.float().norm().clamp_min(1e-12)
    state.packed = PackedTensor(rf8.FORMAT_NAME, params, tensors)
    state.tensor = deq.to(w.dtype)
    state.facts["rf8"] = {"group_size": params["group_size"], "scope": params["scope"],
                          "rel_error": round(float(err), 6)}
    return state


register_pass(RF8, apply=apply_rf8, plan=plan_rf8)
