"""Block scores, the allocation of sparsity over blocks/rows/layers, and the least-squares refit of kept weights.

Scores. A weight W [N, K] (N outputs, K inputs) is cut into blocks of R x C (R output rows, C input columns).
Elementwise importance is |W_ij| (magnitude) or |W_ij| * ||X_j||_2 (activation-aware, Wanda: X the calibration
inputs of the layer). A block's score is the sum of the squared elementwise importances: for uncorrelated inputs,
sum_ij W_ij^2 ||X_j||^2 is exactly the squared output error that zeroing the block adds, so the blocks whose removal
costs least go first, and scores of different block shapes and layers are in the same units (output energy).

Allocation (`allocate`) turns scores into keep-masks [N/R, K/C]:
  - "layer": each matrix loses its `sparsity` fraction of blocks, the lowest-scored ones;
  - "row": every block row of each matrix loses the same fraction (Wanda's per-output comparison);
  - "global": one threshold across all matrices (the lowest-scored blocks of the whole model go first), each
    matrix's sparsity clamped to [min_sparsity, max_sparsity]; the threshold is found so that the pruned weights
    make up `sparsity` of all targeted weights.
Global scores are divided by each matrix's mean score over its rows (`normalize`), so a layer whose outputs are
large (or small) is not pruned less (more) for that alone; without it one layer with small outputs is emptied first.

Refit (`refit_rows`): with the mask fixed, the kept weights of each output row are re-solved to reproduce the dense
layer's outputs on the calibration inputs: min ||X (w'_S - w)||^2 with w'_pruned = 0, i.e.
w'_S = w_S + (G_SS + lambda I)^-1 G_SP w_P, G = X^T X (lambda: `ridge` times the mean diagonal of G_SS).
Rows of one block row share their kept columns, so one Cholesky factorization serves R rows.
"""

from __future__ import annotations

import math

import torch

from ..compress.calibration import ridge_solve


def elementwise(w: torch.Tensor, act_norm: torch.Tensor | None = None) -> torch.Tensor:
    """|W| or |W| * ||X_j|| (float32 [N, K])."""
    s = w.detach().abs().to(torch.float32)
    if act_norm is not None:
        s = s * act_norm.to(s.device, torch.float32)[None, :]
    return s


def block_scores(w: torch.Tensor, block: tuple[int, int], act_norm: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [N/R, K/C]: sum of squared elementwise importances over each block."""
    R, C = block
    N, K = w.shape
    e = elementwise(w, act_norm).pow(2)
    return e.reshape(N // R, R, K // C, C).sum(dim=(1, 3))


def expand(mask: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Block mask [NB, KB] -> element mask [NB*R, KB*C]."""
    R, C = block
    return mask.repeat_interleave(R, dim=0).repeat_interleave(C, dim=1)


def keep_lowest_pruned(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Keep-mask with the n_prune lowest scores set False (ties broken by position, deterministic)."""
    flat = scores.reshape(-1)
    n_prune = max(0, min(int(n_prune), flat.numel()))
    keep = torch.ones_like(flat, dtype=torch.bool)
    if n_prune:
        order = torch.argsort(flat, stable=True)
        keep[order[:n_prune]] = False
    return keep.reshape(scores.shape)


def allocate(scores: dict[str, torch.Tensor], sparsity: float, scope: str = "layer", *, min_sparsity: float = 0.0,
             max_sparsity: float = 1.0, normalize: bool = True) -> dict[str, torch.Tensor]:
    """{name: keep-mask [NB, KB]} (see the module docstring). All blocks of all matrices have the same size."""
    if scope == "layer":
        return {n: keep_lowest_pruned(s, round(sparsity * s.numel())) for n, s in scores.items()}
    if scope == "row":
        out = {}
        for n, s in scores.items():
            k = round(sparsity * s.shape[1])
            order = torch.argsort(s, dim=1, stable=True)
            keep = torch.ones_like(s, dtype=torch.bool)
            keep.scatter_(1, order[:, :k], False)
            out[n] = keep
        return out
    if scope != "global":
        raise ValueError(f"unknown scope {scope!r}")
    names = list(scores)
    sorted_s = {}
    for n in names:
        s = scores[n].reshape(-1).to(torch.float64)
        if normalize:
            s = s / s.mean().clamp_min(1e-30)
        sorted_s[n] = torch.sort(s).values
    sizes = {n: sorted_s[n].numel() for n in names}
    total = sum(sizes.values())
    target = sparsity * total

    def pruned_at(t: float) -> dict[str, int]:
        out = {}
        for n in names:
            c = int(torch.searchsorted(sorted_s[n], torch.tensor(t, dtype=torch.float64), right=False))
            lo, hi = math.ceil(min_sparsity * sizes[n] - 1e-9), math.floor(max_sparsity * sizes[n] + 1e-9)
            out[n] = min(max(c, lo), hi)
        return out

    # bisection on the threshold over the pooled scores (the pruned count is monotone in it)
    pooled = torch.sort(torch.cat([sorted_s[n] for n in names])).values
    lo_i, hi_i = 0, pooled.numel()
    while lo_i < hi_i:
        mid = (lo_i + hi_i) // 2
        t = float(pooled[mid])
        if sum(pruned_at(t).values()) < target:
            lo_i = mid + 1
        else:
            hi_i = mid
    t = float(pooled[min(lo_i, pooled.numel() - 1)]) if lo_i < pooled.numel() else math.inf
    counts = pruned_at(t)
    # the threshold lands on a block boundary: hand out the remainder to the matrices with room, lowest next score
    deficit = round(target) - sum(counts.values())
    if deficit > 0:
        hi = {n: math.floor(max_sparsity * sizes[n] + 1e-9) for n in names}
        cands = sorted((float(sorted_s[n][counts[n]]), n) for n in names if counts[n] < hi[n])
        for _, n in cands[:deficit]:
            counts[n] += 1
    return {n: keep_lowest_pruned(scores[n], counts[n]) for n in names}


def sparsity_of(mask: torch.Tensor) -> float:
    return 1.0 - float(mask.float().mean()) if mask.numel() else 0.0


@torch.no_grad()
def refit_rows(w: torch.Tensor, keep: torch.Tensor, block: tuple[int, int], gram: torch.Tensor,
               ridge: float = 0.01) -> torch.Tensor:
    """The masked weight with each block row's kept weights re-solved by ridge least squares (float32 [N, K])."""
    R, C = block
    N, K = w.shape
    wf = w.to(torch.float32)
    g = gram.to(torch.float64)
    out = torch.zeros_like(wf)
    keep_cols = keep.repeat_interleave(C, dim=1)  # [NB, K]
    for b in range(N // R):
        cols = keep_cols[b]
        if not bool(cols.any()):
            continue
        rows = wf[b * R:(b + 1) * R]  # [R, K]
        S = cols.nonzero().squeeze(1)
        P = (~cols).nonzero().squeeze(1)
        ws = rows[:, S].t().to(torch.float64)  # [|S|, R]
        if P.numel():
            rhs = g[S][:, P] @ rows[:, P].t().to(torch.float64)  # [|S|, R]
            ws = ws + ridge_solve(g[S][:, S], rhs, ridge)
        out[b * R:(b + 1) * R, S] = ws.t().to(torch.float32)
    return out


def output_error(w_new: torch.Tensor, w: torch.Tensor, gram: torch.Tensor) -> float:
    """Relative output error on the calibration inputs: tr(D G D^T) / tr(W G W^T), D = w_new - w."""
    d = (w_new.to(torch.float64) - w.to(torch.float64))
    g = gram.to(torch.float64)
    num = (d @ g * d).sum()
    den = (w.to(torch.float64) @ g * w.to(torch.float64)).sum().clamp_min(1e-30)
    return float(num / den)
