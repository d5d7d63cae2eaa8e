"""FineQuant: group-wise weight-only int8/int4/int3 (and int2) quantization, packed as `gwint`.

Scale-only symmetric by default, optional asymmetric zero points; group sizes from 16 to per-channel; partial last
groups are handled (never a skipped layer). Scales are stored in the model's dtype (fp16 or bf16) unless set.
`clip_search` (on by default below 8 bits) picks each group's scale by a clipping search that minimises its
reconstruction error (`bitsmith.quant.clipping`); `scale_divisor: auto` picks each group's scale among the two
divisors with and without that search, by least sum of |error|^4 (`clipping.rule_search`). `group_size: auto` picks a
group size per matrix from the weights only, under an average bits-per-weight budget that counts scales and zero
points (`bitsmith.quant.adaptive`, docs/passes/finequant.md). `rounding: gptq` rounds with calibration error
feedback on the same grid (`bitsmith.quant.gptq`; group sizes, auto included, are chosen from the weights first).
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Union

import torch
from pydantic import Field, field_validator, model_validator

from ..compress.errors import PlanError
from ..compress.formats import PackedTensor
from ..compress.inventory import non_matrix_reasons
from ..compress.passes import TensorState, register_pass
from ..kernels import gwint
from . import adaptive, gptq
from .clipping import BASE_DIVISOR, rule_search, search_clip
from .groupwise import (SCALE_BITS, ZERO_BITS, dequantize_codes, group_codes, group_dequant, group_scales,
                        quantize_groupwise)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MIN_GROUP_SIZE = 16
DEFAULT_BUDGET_OVERHEAD = 0.25  # auto without bits_budget: bits + 0.25 (+ 0.125 asymmetric), what g64 costs


class FineQuant(gptq.QuantizerPass):
    """Weight-only group-wise integer quantization of the targeted Linear layers."""

    type: Literal["finequant"] = "finequant"
    bits: Literal[2, 3, 4, 8] = 4
    group_size: Union[int, Literal["channel", "auto"]] = Field(
        128, description="weights per scale along the input; 'channel' = whole row; 'auto' = chosen per matrix")
    symmetric: bool = True
    scale_divisor: Literal["pow2", "pow2_minus_1", "auto"] = Field(
        "pow2_minus_1", description="scale = max|w| / 2^(b-1) (pow2) or / (2^(b-1)-1); auto: per group, either"
                                    " divisor with or without the clipping search, by least sum of |error|^4")
    scale_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    clip_search: Optional[bool] = Field(
        None, description="per-group scale by a clipping search minimising the error; default: on below 8 bits")
    bits_budget: Optional[float] = Field(
        None, description="group_size auto: average bits per weight over all targeted weights, scales counted")
    candidates: tuple[Union[int, Literal["channel"]], ...] = Field(
        adaptive.DEFAULT_CANDIDATES, description="group_size auto: the group sizes it may choose from")

    packs = True

    @field_validator("group_size")
    @classmethod
    def _group_size_range(cls, v):
        if isinstance(v, int) and v < MIN_GROUP_SIZE:
            raise ValueError(f"group_size must be >= {MIN_GROUP_SIZE}, 'channel' for one scale per output row,"
                             " or 'auto'")
        return v

    @field_validator("candidates")
    @classmethod
    def _candidates_range(cls, v):
        if not v:
            raise ValueError("candidates must list at least one group size (ints >= 16 or 'channel')")
        bad = [c for c in v if isinstance(c, int) and c < MIN_GROUP_SIZE]
        if bad:
            raise ValueError(f"candidates must be group sizes >= {MIN_GROUP_SIZE} or 'channel', got {bad}")
        return v

    @model_validator(mode="after")
    def _auto_keys(self):
        if self.scale_divisor == "auto":
            if self.clip_search is not None:
                raise ValueError("scale_divisor auto chooses the clipping search per group: leave clip_search unset")
            if self.rounding != "nearest":
                raise ValueError(f"scale_divisor auto needs rounding: nearest (rounding is {self.rounding!r})")
        if self.group_size != "auto":
            if self.bits_budget is not None:
                raise ValueError(f"bits_budget needs group_size: auto (group_size is {self.group_size!r})")
            if tuple(self.candidates) != adaptive.DEFAULT_CANDIDATES:
                raise ValueError(f"candidates needs group_size: auto (group_size is {self.group_size!r})")
        elif self.bits_budget is not None and not self.bits_budget > self.bits:
            raise ValueError(f"bits_budget must be more than bits ({self.bits}): scales cost bits too,"
                             f" got {self.bits_budget}")
        return self.check_rounding()

    def column_grid(self, state: TensorState, hdiag: torch.Tensor | None = None, group_size: int | None = None
                    ) -> "GroupIntGrid":
        """The gwint grid of one weight for `rounding: gptq` (group size as chosen, else the configured one)."""
        w = state.tensor
        return GroupIntGrid(self, w.shape[0], w.shape[1], group_size or local_group_size(self, state),
                            scale_dtype_for(self, w.dtype), w.device)

    @property
    def use_clip(self) -> bool:
        """clip_search as set, or by default on for 2..4 bits and off for 8 (where RTN is already within noise);
        with scale_divisor auto the search is one of the per-group candidates (see clipping.rule_search)."""
        return self.bits < 8 if self.clip_search is None else self.clip_search

    def budget(self, scale_bits: int = 16) -> float:
        """The average bits per weight that group_size auto may spend."""
        if self.bits_budget is not None:
            return float(self.bits_budget)
        return self.bits + DEFAULT_BUDGET_OVERHEAD * (scale_bits + (0 if self.symmetric else ZERO_BITS)) / 16


def effective_group_size(cfg: FineQuant, in_features: int) -> int:
    if cfg.group_size == "channel":
        return in_features
    if cfg.group_size == "auto":
        raise ValueError("group_size auto has no fixed size: see bitsmith.quant.adaptive")
    return min(int(cfg.group_size), in_features)


def scale_dtype_for(cfg: FineQuant, weight_dtype: torch.dtype | None) -> torch.dtype:
    if cfg.scale_dtype == "auto":
        return weight_dtype if weight_dtype in (torch.float16, torch.bfloat16) else torch.float16
    return _DTYPES[cfg.scale_dtype]


def plan_finequant(cfg: FineQuant, modules) -> dict[str, str]:
    cfg.plan_rounding()
    skipped = non_matrix_reasons(modules)
    if cfg.group_size == "auto":
        kept = [m for m in modules if m.name not in skipped]
        by_bits: dict[int, list] = {}
        for m in kept:
            by_bits.setdefault(SCALE_BITS[scale_dtype_for(cfg, m.dtype)], []).append(tuple(m.shape))
        lo = hi = n = 0.0
        for scale_bits, shapes in by_bits.items():
            a, b = adaptive.budget_range(shapes, cfg.bits, cfg.symmetric, scale_bits, cfg.candidates)
            w = sum(N * K for N, K in shapes)
            lo, hi, n = lo + a * w, hi + b * w, n + w
        if n and cfg.budget() < lo / n - 1e-9:
            raise PlanError(f"finequant: bits_budget {cfg.budget()} is below the cheapest allocation for the"
                            f" {len(kept)} targeted matrices: {lo / n:.4f} bits per weight (every matrix at its"
                            f" coarsest candidate group size, candidates {list(cfg.candidates)});"
                            f" allowed: {lo / n:.4f} or more (up to {hi / n:.4f} buys the finest candidate everywhere)")
    return skipped


# --- group_size auto: the allocation over the whole model ---------------------------------------------------------

def _profile(cfg: FineQuant, name: str, w: torch.Tensor) -> adaptive.MatrixProfile:
    return adaptive.profile_matrix(name, w, bits=cfg.bits, symmetric=cfg.symmetric, scale_divisor=cfg.scale_divisor,
                                   scale_dtype=scale_dtype_for(cfg, w.dtype), clip_search=cfg.use_clip,
                                   candidates=cfg.candidates)


def allocate_weights(cfg: FineQuant, weights, progress: bool = False, log=None) -> dict[str, adaptive.Option]:
    """{weight name: option} for (name, weight) pairs, read one at a time; the budget spans all of them."""
    from tqdm.auto import tqdm

    profiles = []
    for name, w in tqdm(weights, desc="finequant auto: profiling", disable=not progress, leave=False):
        profiles.append(_profile(cfg, name, w))
    if not profiles:
        return {}
    scale_bits = 16 if cfg.scale_dtype != "float32" else 32
    budget = cfg.budget(scale_bits)
    choice = adaptive.allocate(profiles, budget)
    if log is not None:
        hist: dict[int, int] = {}
        for p in profiles:
            g = choice[p.name].group_size
            key = -1 if g == p.shape[1] else g
            hist[key] = hist.get(key, 0) + 1
        sizes = ", ".join(f"{'channel' if k == -1 else k}: {v}" for k, v in sorted(hist.items(), key=lambda kv:
                                                                                  (kv[0] == -1, kv[0])))
        log(f"finequant auto: {len(profiles)} matrices, budget {budget:.4f} bits/weight, allocated"
            f" {adaptive.allocation_bits(choice, profiles):.4f}; group sizes ({sizes})")
    return choice


def _allocation(cfg: FineQuant, ctx) -> dict[str, adaptive.Option] | None:
    """The whole-model allocation for this pass, computed once per run and cached on the context."""
    if ctx is None:
        return None
    extra = getattr(ctx, "extra", None)
    if extra is None:
        return None
    key = ("finequant.auto", id(cfg))
    if key in extra:
        return extra[key]
    log = getattr(ctx, "log", None)
    progress = bool(getattr(ctx, "progress", False))
    model = extra.get("model")
    plan, path = getattr(ctx, "plan", None), getattr(ctx, "input_path", None)
    if model is not None:
        result = allocate_weights(cfg, adaptive.iter_model_weights(model, cfg), progress, log)
    elif plan is not None and path is not None:
        from ..compress.checkpoint import CheckpointReader

        mine = next((pp for pp in plan.passes if pp.config is cfg), None)
        if mine is None:
            return None
        reader = CheckpointReader(path)
        names = sorted((n for n in mine.targets if n in reader.tensors), key=lambda n: (reader.tensors[n].file, n))
        if log is not None and any(pp.index < mine.index for pp in plan.passes):
            log("finequant auto: group sizes are chosen from the input checkpoint's weights, before the earlier"
                " passes of the recipe change them")
        device = getattr(ctx, "device", "cpu") or "cpu"  # profile where the sweep computes (one weight at a time)
        reader.read_ahead(names)
        try:
            result = allocate_weights(cfg, ((n, reader.get(n).to(device)) for n in names), progress, log)
        finally:
            reader.close()
    else:
        return None
    extra[key] = result
    return result


def choose_group_size(cfg: FineQuant, state: TensorState, ctx) -> int:
    K = state.tensor.shape[1]
    if cfg.group_size != "auto":
        return effective_group_size(cfg, K)
    allocation = _allocation(cfg, ctx)
    if allocation is not None and state.name in allocation:
        return allocation[state.name].group_size
    # No view of the whole model (e.g. a bare TensorState): this matrix alone must fit the budget.
    scale_bits = SCALE_BITS[scale_dtype_for(cfg, state.tensor.dtype)]
    return adaptive.local_choice(_profile(cfg, state.name, state.tensor), cfg.budget(scale_bits)).group_size


# --- the pass --------------------------------------------------------------------------------------------------------

def quantize_matrix(w: torch.Tensor, cfg: FineQuant, group_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(codes uint8 [N, K], scales [G, N], zeros [G, N] or None, dequantized float32 [N, K])."""
    scale_dtype = scale_dtype_for(cfg, w.dtype)
    clip, divisor = None, cfg.scale_divisor
    if divisor == "auto":  # per group: a clip factor under the base divisor stands for the chosen rule
        clip, divisor = rule_search(w, cfg.bits, group_size, cfg.symmetric, scale_dtype)[0], BASE_DIVISOR
    elif cfg.use_clip:
        clip = search_clip(w, cfg.bits, group_size, cfg.symmetric, cfg.scale_divisor, scale_dtype)[0]
    codes, scales, zeros = quantize_groupwise(w, cfg.bits, group_size, cfg.symmetric, divisor, scale_dtype, clip)
    return codes, scales, zeros, dequantize_codes(codes, scales, zeros, cfg.bits, group_size)


def local_group_size(cfg: FineQuant, state: TensorState) -> int:
    """A group size for one weight without a run context (auto: this matrix alone within the budget)."""
    return choose_group_size(cfg, state, None)


def pack_gwint(cfg: FineQuant, state: TensorState, g: int, codes: torch.Tensor, scales: torch.Tensor,
               zeros: torch.Tensor | None, deq: torch.Tensor) -> TensorState:
    """Store gwint codes [N, K] uint8, scales [G, N], zeros [G, N] | None on the state; deq float32 [N, K]."""
    w = state.tensor  # [N, K]
    N, K = w.shape
    tensors = {"qweight": gwint.pack_codes(codes, cfg.bits), "scales": scales}
    if zeros is not None:
        tensors["zeros"] = zeros
    params = {"in_features": K, "out_features": N, "bits": cfg.bits, "group_size": g, "symmetric": cfg.symmetric}
    err = (deq - w.float()).norm() / w.float().norm().clamp_min(1e-12)
    state.packed = PackedTensor("gwint", params, tensors)
    state.tensor = deq.to(w.dtype)
    state.facts["finequant"] = {"bits": cfg.bits, "group_size": g, "rel_error": round(float(err), 6)}
    return state


class GroupIntGrid:
    """gwint's grid for GPTQ (`bitsmith.quant.gptq.ColumnGrid`): a group's scale (clipping search as configured) and
    zero point are fitted from its current weights; a column rounds like `group_codes`."""

    def __init__(self, cfg: FineQuant, N: int, K: int, group_size: int, scale_dtype: torch.dtype, device=None):
        self.cfg, self.K, self.group_size, self.scale_dtype = cfg, K, group_size, scale_dtype
        G = math.ceil(K / group_size)
        self.scales = torch.ones(G, N, device=device)  # float32 values exactly representable in scale_dtype
        self.zeros = None if cfg.symmetric else torch.zeros(G, N, device=device)

    def fit_group(self, gi: int, w: torch.Tensor) -> None:
        cfg, c = self.cfg, w.shape[1]
        clip = None
        if cfg.use_clip:
            clip = search_clip(w, cfg.bits, c, cfg.symmetric, cfg.scale_divisor, self.scale_dtype)[0]
        s, z = group_scales(w.to(torch.float32).view(w.shape[0], 1, c), cfg.bits, cfg.symmetric, cfg.scale_divisor,
                            self.scale_dtype, clip)
        self.scales[gi] = s[:, 0]
        if z is not None:
            self.zeros[gi] = z[:, 0]

    def quantize(self, gi: int, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scales[gi].view(-1, 1)
        z = None if self.zeros is None else self.zeros[gi].view(-1, 1)
        code = group_codes(col.view(-1, 1, 1), s, z, self.cfg.bits)  # [N, 1, 1]
        return group_dequant(code, s, z, self.cfg.bits).view(-1), code.view(-1)

    def pack(self, state: TensorState, codes: torch.Tensor) -> tuple[TensorState, torch.Tensor]:
        cfg, g = self.cfg, self.group_size
        scales = self.scales.to(self.scale_dtype).contiguous()  # [G, N]
        zeros = None if self.zeros is None else self.zeros.to(torch.uint8).contiguous()
        deq = dequantize_codes(codes, scales, zeros, cfg.bits, g)
        return pack_gwint(cfg, state, g, codes, scales, zeros, deq), deq


def apply_finequant(cfg: FineQuant, state, ctx=None):
    """Tensor pass (rounding nearest): one TensorState. Model pass (rounding gptq): the model; returns the packed
    states by weight name."""
    if not isinstance(state, TensorState):
        return _apply_gptq(cfg, state, ctx)
    w = state.tensor  # [N, K]
    g = choose_group_size(cfg, state, ctx)
    codes, scales, zeros, deq = quantize_matrix(w, cfg, g)
    return pack_gwint(cfg, state, g, codes, scales, zeros, deq)


def _apply_gptq(cfg: FineQuant, model, ctx) -> dict[str, TensorState]:
    nearest_cfg = cfg.model_copy(update={"rounding": "nearest"})

    def group_sizes(targets):
        if cfg.group_size != "auto":
            return {}
        named = dict(model.named_modules())
        weights = ((n, named[m].weight.detach()) for n, (m, _) in sorted(targets.items()))
        say = ctx.log if ctx is not None else None
        return {n: o.group_size for n, o in allocate_weights(cfg, weights, bool(getattr(ctx, "progress", False)),
                                                               say).items()}

    return gptq.run_model_pass(cfg, model, ctx, plan_finequant, lambda st: apply_finequant(nearest_cfg, st, None),
                               group_sizes)


register_pass(FineQuant, apply=apply_finequant, plan=plan_finequant)
