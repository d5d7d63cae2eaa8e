"""`deepshape`: a rank-preserving remap of weights onto a peakier generalized Gaussian (a tensor pass).

For each targeted weight (any shape, any floating dtype, on whatever device it is): fit GG(mu, nu, beta) by moment
matching (`bitsmith.prune.distribution`), then replace every weight by the target quantile of its rank,

    w' = F_target^-1( F_emp(w) ),   target = GG(mu, shape_scale * nu, std_scale * beta)

where F_emp is the mid-rank empirical CDF (equal weights get equal ranks, so they stay equal; order is preserved;
the map is a function of the value). Reference defaults: shape_scale 0.8, std_scale 0.6. With `scale_of: std`,
the target's standard deviation is std_scale times the fitted one instead (beta' follows from nu'): this changes
the shape alone when std_scale is 1.

`share_fit`: `tensor` (default) fits and ranks each tensor alone, in one read, memory a few copies of the tensor.
`type` (one fit per layer type across depth, e.g. every `mlp.down_proj`) or `all` (one fit over every target) pool
the weights of the group, each centred on its own tensor's mean: the group's moments give one (nu, beta), and each
weight's rank is its place in the whole group, read from a sketch of every member's sorted values (2048 knots per
tensor, dense in the tails). The sketch is built by one extra read of the group's tensors from the input checkpoint
before the sweep (so with earlier passes in the same sweep it sees the weights before them; the log says so).

`keep_zeros` (default on): exact zeros (pruned weights) stay zero and take no part in the fit or the ranks.
Deterministic: no random numbers; sorting and float64 arithmetic only.

    passes:
      - {type: deepshape, shape_scale: 0.8, std_scale: 0.6}
      - {type: finequant, bits: 4, group_size: 128}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from ..compress.errors import RecipeError
from ..compress.passes import PassKind, TargetedPass, TensorState, register_pass
from . import distribution as D

REPORT_KEY = "deepshape"
_CHUNK = 1 << 22  # unique values per quantile evaluation (bounds the float64 temporaries)
KNOTS = 2048


class DeepShape(TargetedPass):
    """Remap the targeted weights, rank for rank, onto a generalized Gaussian of smaller shape and scale."""

    type: Literal["deepshape"] = "deepshape"
    shape_scale: float = Field(0.8, gt=0.0, le=4.0, description="target shape nu' = shape_scale * fitted nu")
    std_scale: float = Field(0.6, gt=0.0, le=4.0, description="target scale beta' = std_scale * fitted beta"
                                                              " (or the std, with scale_of: std)")
    scale_of: Literal["beta", "std"] = Field("beta", description="what std_scale multiplies")
    share_fit: Literal["tensor", "type", "all"] = Field(
        "tensor", description="tensor: each alone; type: one fit per layer type across depth; all: one fit")
    keep_zeros: bool = Field(True, description="exact zeros stay zero and are left out of the fit and ranks")

    kind = PassKind.TENSOR


def plan_deepshape(cfg: DeepShape, modules) -> dict[str, str]:
    skipped = {}
    for m in modules:
        if m.dtype is not None and not m.dtype.is_floating_point:
            skipped[m.name] = f"weight dtype {m.dtype} is not floating point"
    return skipped


@dataclass(frozen=True)
class Target:
    mu: float
    nu: float
    beta: float


def target_of(fit: D.GGFit, cfg: DeepShape, mu: float | None = None) -> Target:
    nu = min(max(cfg.shape_scale * fit.nu, D.NU_MIN), D.NU_MAX)
    if cfg.scale_of == "beta":
        beta = cfg.std_scale * fit.beta
    else:
        beta = D.beta_from_std(nu, cfg.std_scale * fit.std)
    return Target(fit.mu if mu is None else mu, nu, beta)


# ------------------------------------------------------------------------------------------------ per tensor

def _quantiles(c2: torch.Tensor, n: int, tgt: Target, dtype: torch.dtype) -> torch.Tensor:
    """Target quantiles at mid-rank counts c2/2 (of n), in chunks, returned in `dtype`."""
    out = torch.empty(c2.shape, dtype=dtype, device=c2.device)
    for s in range(0, c2.numel(), _CHUNK):
        out[s:s + _CHUNK] = D.gg_quantile_from_ranks(c2[s:s + _CHUNK], n, tgt.mu, tgt.nu, tgt.beta).to(dtype)
    return out


def _remap_own_ranks(x: torch.Tensor, tgt: Target) -> torch.Tensor:
    """x (1-D) -> target quantiles of its own mid-ranks, same dtype and device."""
    u, inv, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    del u
    cum = torch.cumsum(counts, 0)
    c2 = 2 * cum - counts  # twice the mid-rank count (exact integers)
    del cum, counts
    y = _quantiles(c2, x.numel(), tgt, x.dtype)
    return y[inv]


def _scatter(t: torch.Tensor, keep_zeros: bool, fn) -> torch.Tensor:
    x = t.reshape(-1)
    if not keep_zeros:
        return fn(x).reshape(t.shape)
    nz = x != 0
    out = torch.zeros_like(x)
    out[nz] = fn(x[nz])
    return out.reshape(t.shape)


def reshape_tensor(t: torch.Tensor, cfg: DeepShape) -> tuple[torch.Tensor, dict]:
    """DeepShape of one tensor on its own fit: (new tensor, facts). A tensor without spread is returned as is."""
    fit = D.fit_gg(t, skip_zeros=cfg.keep_zeros)
    if fit is None:
        return t, {"skipped": "no spread (constant, empty or all zeros)"}
    tgt = target_of(fit, cfg)
    out = _scatter(t, cfg.keep_zeros, lambda x: _remap_own_ranks(x, tgt))
    return out, _facts(fit, tgt, t, out)


def _facts(fit: D.GGFit, tgt: Target, before: torch.Tensor, after: torch.Tensor) -> dict:
    return {"mu": round(fit.mu, 8), "nu": round(fit.nu, 4), "beta": round(fit.beta, 8),
            "nu_target": round(tgt.nu, 4), "beta_target": round(tgt.beta, 8),
            "std_before": round(float(before.double().std()), 8), "std_after": round(float(after.double().std()), 8)}


# ----------------------------------------------------------------------------------------------- shared fits

@dataclass
class GroupFit:
    """One group's pooled GG fit and the sketch of its pooled CDF (centred values -> count at or below)."""

    fit: D.GGFit
    knot_values: torch.Tensor  # float64, strictly increasing (centred weights)
    knot_counts: torch.Tensor  # float64, increasing: how many of the group's weights are <= the knot value
    n: int


def tensor_sketch(t: torch.Tensor, skip_zeros: bool, k: int = KNOTS) -> tuple[torch.Tensor, torch.Tensor, D.Moments]:
    """(knot values centred on the tensor's mean, float64; weights: elements each knot stands for; moments).

    Knots sit at ranks spaced evenly in logit(rank / n), so the tails are sampled as densely as the centre.
    """
    m = D.tensor_moments(t, skip_zeros)
    x = t.detach().reshape(-1)
    if skip_zeros:
        x = x[x != 0]
    n = x.numel()
    if n == 0:
        e = torch.empty(0, dtype=torch.float64)
        return e, e, m
    s = torch.sort(x).values
    if n <= k:
        r = torch.arange(n)
    else:
        lim = math.log(n)
        q = torch.sigmoid(torch.linspace(-lim, lim, k, dtype=torch.float64))
        r = torch.unique(torch.cat([torch.tensor([0, n - 1]), (q * (n - 1)).round().long()]).clamp(0, n - 1))
    vals = s[r.to(s.device)].double().cpu() - m.mean
    prev = torch.cat([torch.tensor([-1]), r[:-1]])
    return vals, (r - prev).double(), m


def group_fit(members) -> GroupFit | None:
    """Pool the sketches of (values, weights, moments) triples of one group."""
    vals, wts, mom = [], [], D.Moments()
    for v, w, m in members:
        vals.append(v)
        wts.append(w)
        mom = mom + m
    fit = D.fit_moments(mom)
    if fit is None:
        return None
    v = torch.cat(vals)
    w = torch.cat(wts)
    order = torch.argsort(v, stable=True)
    v, cum = v[order], torch.cumsum(w[order], 0)
    last = torch.ones_like(v, dtype=torch.bool)
    last[:-1] = v[1:] != v[:-1]  # for a repeated value keep its last (largest) count
    return GroupFit(fit, v[last], cum[last], mom.n)


def _remap_group_ranks(x: torch.Tensor, g: GroupFit, tgt: Target) -> torch.Tensor:
    m = float(x.double().mean())
    u, inv = torch.unique(x, sorted=True, return_inverse=True)
    kv, kc = g.knot_values.to(x.device), g.knot_counts.to(x.device)
    out = torch.empty(u.shape, dtype=x.dtype, device=x.device)
    for s in range(0, u.numel(), _CHUNK):
        c = D._interp(u[s:s + _CHUNK].double() - m, kv, kc)  # count at or below, in the group
        c2 = (2 * c - 1).clamp(1, 2 * g.n - 1)  # a continuity correction: mid-rank
        out[s:s + _CHUNK] = D.gg_quantile_from_ranks(c2, g.n, tgt.mu, tgt.nu, tgt.beta).to(x.dtype)
    return out[inv]


def reshape_in_group(t: torch.Tensor, g: GroupFit, cfg: DeepShape) -> tuple[torch.Tensor, dict]:
    """DeepShape of one member of a group: its weights' ranks in the group, the group's target, its own mean."""
    own = D.tensor_moments(t, cfg.keep_zeros)
    if own.n == 0:
        return t, {"skipped": "all zeros"}
    tgt = target_of(g.fit, cfg, mu=own.mean)
    out = _scatter(t, cfg.keep_zeros, lambda x: _remap_group_ranks(x, g, tgt))
    return out, _facts(D.GGFit(own.mean, g.fit.nu, g.fit.beta, g.fit.std, own.n), tgt, t, out)


def group_of(name: str, share_fit: str) -> str:
    if share_fit == "all":
        return "all"
    if share_fit == "type":
        return D.group_key(name)
    return name


def group_fits(named_tensors, cfg: DeepShape) -> dict[str, GroupFit | None]:
    """{group: fit} from (name, tensor) pairs read one at a time (only sketches are kept)."""
    members: dict[str, list] = {}
    for name, t in named_tensors:
        members.setdefault(group_of(name, cfg.share_fit), []).append(tensor_sketch(t, cfg.keep_zeros))
        del t
    return {g: group_fit(v) for g, v in members.items()}


def reshape_tensors(named: dict[str, torch.Tensor], cfg: DeepShape) -> dict[str, torch.Tensor]:
    """DeepShape of in-memory tensors as `cfg` says (shared fits included): {name: new tensor}."""
    if cfg.share_fit == "tensor":
        return {n: reshape_tensor(t, cfg)[0] for n, t in named.items()}
    fits = group_fits(named.items(), cfg)
    out = {}
    for n, t in named.items():
        g = fits[group_of(n, cfg.share_fit)]
        out[n] = t if g is None else reshape_in_group(t, g, cfg)[0]
    return out


def _ctx_group_fits(cfg: DeepShape, ctx) -> dict[str, GroupFit | None]:
    extra = getattr(ctx, "extra", None) if ctx is not None else None
    plan, path = getattr(ctx, "plan", None), getattr(ctx, "input_path", None)
    if extra is None or plan is None or path is None:
        raise RecipeError(f"deepshape: share_fit {cfg.share_fit!r} needs every member of a group before the first"
                          " is changed: run it through `bitsmith compress` (a checkpoint), or call"
                          " bitsmith.prune.deepshape.reshape_tensors on the tensors; share_fit: tensor works anywhere")
    key = ("deepshape.groups", id(cfg))
    if key not in extra:
        from ..compress.checkpoint import CheckpointReader

        mine = next((pp for pp in plan.passes if pp.config is cfg), None)
        reader = CheckpointReader(path)
        names = sorted((n for n in (mine.targets if mine else {}) if n in reader.tensors),
                       key=lambda n: (reader.tensors[n].file, n))
        if mine is not None and any(pp.index < mine.index for pp in plan.passes):
            ctx.log("deepshape: shared fits are read from the input checkpoint, before the earlier passes")
        extra[key] = group_fits(((n, reader.get(n)) for n in names), cfg)
        ctx.log(f"deepshape: {len(extra[key])} shared fits ({cfg.share_fit}) from {len(names)} tensors")
    return extra[key]


# --------------------------------------------------------------------------------------------------- the pass

def apply_deepshape(cfg: DeepShape, state: TensorState, ctx=None) -> TensorState:
    t = state.tensor
    if not t.is_floating_point():
        state.facts[REPORT_KEY] = {"skipped": f"dtype {t.dtype} is not floating point"}
        return state
    if cfg.share_fit == "tensor":
        out, facts = reshape_tensor(t, cfg)
    else:
        g = _ctx_group_fits(cfg, ctx).get(group_of(state.name, cfg.share_fit))
        if g is None:
            out, facts = reshape_tensor(t, cfg)  # not seen in the pre-read (or no spread): its own fit
        else:
            out, facts = reshape_in_group(t, g, cfg)
            facts["group"] = group_of(state.name, cfg.share_fit)
    state.tensor = out
    state.facts[REPORT_KEY] = facts
    return state


register_pass(DeepShape, apply=apply_deepshape, plan=plan_deepshape)
