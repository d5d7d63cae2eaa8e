"""`rf8`: pack the targeted Linear weights in the RF8 code (one byte per weight: two signed powers of two, exponents
1 to 4 apart, and an int8 exponent offset per group, per output channel or per tensor). Layout and rounding in
`bitsmith.kernels.rf8`; docs/formats/rf8.md.

    passes:
      - {type: rf8, group_size: channel}

`rf8_gptq` (a model pass) rounds the targeted weights onto the RF8 grid with GPTQ error feedback instead of rounding
each weight to its nearest value: with H = X^T X of each Linear's inputs on calibration text (collected once, on the
model as it is before the pass), the columns of W [N, K] are rounded in order and each column's error is spread over
the columns not yet rounded through the upper Cholesky factor of H^-1 (optimal-brain-surgeon updates, in blocks of
`block_size` columns). The exponent offsets are those RTN would use (from each group's max|w| of the original
weights). It leaves dense weights that lie on the RF8 grid; the `rf8` pass after it (same group_size) packs them
(nearest rounding of a grid value is the value itself).

    passes:
      - {type: rf8_gptq, text: calib.txt, samples: 32, seq_len: 256}
      - {type: rf8, group_size: channel}
"""

from __future__ import annotations

import math
import time
from typing import ClassVar, Literal, Union

import torch
from pydantic import Field, field_validator

from ..compress.errors import RecipeError
from ..compress.formats import PackedTensor
from ..compress.inventory import non_matrix_reasons
from ..compress.passes import PassKind, TargetedPass, TensorState, register_pass
from ..kernels import rf8
from ..prune.block_sparse import CalibrationFields


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
    return non_matrix_reasons(modules)


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


# --------------------------------------------------------------------------------------- GPTQ rounding (model pass)

def _group_offsets(w: torch.Tensor, group_size: int | str) -> torch.Tensor:
    """The exponent offset of every weight [N, K] (int32), as `rf8.pack` chooses them."""
    N, K = w.shape
    if group_size == "tensor":
        return rf8._offsets(w.detach().abs().max().reshape(1, 1)).expand(N, K)
    g = K if group_size == "channel" else min(int(group_size), K)
    G = math.ceil(K / g)
    a = torch.nn.functional.pad(w.detach().double().abs(), (0, G * g - K)).view(N, G, g).amax(-1)
    return rf8._offsets(a).repeat_interleave(g, dim=1)[:, :K]


def _levels(device) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints, levels) of the nonnegative RF8 values under offset 0, float32 (both exact in float32)."""
    mids, codes = rf8._encoder(device)
    lut = rf8.decode_table(torch.float32).to(device)
    return mids.to(torch.float32), lut[codes.long()]


def round_nearest(x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """The nearest RF8 value of x (float32) under offsets o (same shape), float32; the same value `rf8.pack` picks."""
    scale = torch.ldexp(torch.ones_like(x, dtype=torch.float32), o.to(torch.float32))
    return _round_scaled(x.to(torch.float32), scale, *_levels(x.device))


def _round_scaled(x: torch.Tensor, scale: torch.Tensor, mids: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    lv = levels[torch.searchsorted(mids, (x.abs() / scale).contiguous())]  # / 2^o: exact
    return torch.where(x < 0, -lv, lv) * scale


def gptq_round(w: torch.Tensor, H: torch.Tensor, group_size: int | str = "channel", damp: float = 0.01,
               block_size: int = 128) -> torch.Tensor:
    """w [N, K] rounded onto the RF8 grid with GPTQ error feedback under H [K, K] (sum of x x^T); float32 [N, K]."""
    W = w.detach().to(torch.float32).clone()
    N, K = W.shape
    o = _group_offsets(w, group_size)
    Hd = H.detach().to(torch.float64).clone()
    dead = Hd.diagonal() == 0
    Hd[dead, dead] = 1.0
    W[:, dead] = 0.0
    eye = torch.eye(K, dtype=torch.float64, device=Hd.device)
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(Hd + damp * float(Hd.diagonal().mean()) * eye)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0:
                break
        damp *= 10
    else:
        raise RecipeError("rf8_gptq: the calibration Hessian is not positive definite; use more calibration samples")
    U = U.to(torch.float32)
    scale = torch.ldexp(torch.ones_like(W), o.to(torch.float32))  # 2^o per weight
    mids, levels = _levels(W.device)
    Q = torch.empty_like(W)
    for i1 in range(0, K, block_size):
        i2 = min(K, i1 + block_size)
        W1 = W[:, i1:i2].clone()
        E1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            q = _round_scaled(W1[:, i], scale[:, i1 + i], mids, levels)
            Q[:, i1 + i] = q
            e = (W1[:, i] - q) / U1[i, i]
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            E1[:, i] = e
        if i2 < K:
            W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Q


class RF8Gptq(CalibrationFields):
    """Round the targeted weights onto the RF8 grid by GPTQ on calibration text (dense; pack with `rf8` after)."""

    type: Literal["rf8_gptq"] = "rf8_gptq"
    group_size: Union[int, Literal["channel", "tensor"]] = Field(
        "channel", description="as the `rf8` pass that packs the weights after this one")
    damp: float = Field(0.01, gt=0.0, le=10.0, description="H += damp * mean(diag H) * I")
    block_size: int = Field(128, ge=1, le=8192, description="columns per lazy batch update")

    kind: ClassVar[PassKind] = PassKind.MODEL


def plan_rf8_gptq(cfg: RF8Gptq, view, inventory) -> None:
    from ..compress import calibration

    calibration.check_text_source(cfg.text, cfg.type)


@torch.no_grad()
def gptq_model(model: torch.nn.Module, cfg: RF8Gptq, tokenizer, *, log=None, progress: bool = False) -> dict:
    """Round every targeted Linear of `model` in place (one calibration over the unchanged model); a report."""
    from ..prune.block_sparse import calibrate, targeted_linears

    t0 = time.time()
    modules = {n: m for n, m in targeted_linears(model, cfg, cfg.type).items()
               if m.weight.dim() == 2 and m.weight.is_floating_point()}
    stats = calibrate(model, cfg, list(modules), tokenizer, gram=True, progress=progress, desc=cfg.type)
    errs = {}
    for n, m in modules.items():
        st = stats[n]
        H = st.gram if st.gram is not None else stats[st.shares_gram_with].gram
        w = m.weight.detach()
        q = gptq_round(w, H, cfg.group_size, cfg.damp, cfg.block_size)
        rtn = round_nearest(w.float(), _group_offsets(w, cfg.group_size))
        Hf = H.to(torch.float32)
        e_q = float((((q - w.float()) @ Hf) * (q - w.float())).sum())
        e_r = float((((rtn - w.float()) @ Hf) * (rtn - w.float())).sum())
        errs[n] = round(e_q / max(e_r, 1e-30), 4)
        m.weight.copy_(q.to(m.weight.dtype))
    vals = sorted(errs.values())
    report = {"modules": len(errs), "output_error_vs_nearest_median": vals[len(vals) // 2] if vals else None,
              "seconds": round(time.time() - t0, 1)}
    if log is not None:
        log(f"rf8_gptq: {len(errs)} weights rounded; output error / nearest rounding's: median"
            f" {report['output_error_vs_nearest_median']}, range {vals[0] if vals else 0}..{vals[-1] if vals else 0}"
            f" ({report['seconds']} s)")
    return report


def apply_rf8_gptq(cfg: RF8Gptq, model: torch.nn.Module, ctx) -> None:
    from ..prune.block_sparse import resolve_tokenizer

    tokenizer = resolve_tokenizer(cfg, model, ctx, cfg.type)
    report = gptq_model(model, cfg, tokenizer, log=ctx.log if ctx is not None else None,
                        progress=bool(getattr(ctx, "progress", False)))
    if ctx is not None:
        ctx.extra.setdefault("rf8_gptq.report", []).append(report)


register_pass(RF8Gptq, apply=apply_rf8_gptq, plan=plan_rf8_gptq)
