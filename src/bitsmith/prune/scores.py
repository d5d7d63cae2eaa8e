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
layer's outputs on the calibration inputs: min ||X (w' - w)||^2 + lambda ||w'_S - w_S||^2 with w'_pruned = 0, i.e.
w'_S = w_S + (G_SS + lambda I)^-1 G_SP w_P, G = X^T X (lambda: `ridge` times the mean diagonal of G).
Exactly (batched Cholesky; rows of one block row share their columns) or by a few conjugate-gradient steps on all
rows at once (`iters`): exact solves cost a K^3/3 factorization per block row, which for 1-row blocks and large K
takes minutes per matrix on a CPU; 25 CG steps cost 25 [N, K] x [K, K] products and reached the exact output
error to 4 digits on the matrices we checked (docs/results/blocksparse.md).
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


def allocate(scores: dict[str, torch.Tensor], sparsity: float | dict[str, float], scope: str = "layer", *,
             min_sparsity: float = 0.0, max_sparsity: float = 1.0, normalize: bool = True) -> dict[str, torch.Tensor]:
    """{name: keep-mask [NB, KB]} (see the module docstring). All blocks of all matrices have the same size.
    `sparsity` may be a {name: sparsity} (scopes layer and row: one per matrix, e.g. from `owl.owl_sparsities`)."""
    def of(n: str) -> float:
        return sparsity[n] if isinstance(sparsity, dict) else sparsity

    if scope == "layer":
        return {n: keep_lowest_pruned(s, round(of(n) * s.numel())) for n, s in scores.items()}
    if scope == "row":
        out = {}
        for n, s in scores.items():
            k = round(of(n) * s.shape[1])
            order = torch.argsort(s, dim=1, stable=True)
            keep = torch.ones_like(s, dtype=torch.bool)
            keep.scatter_(1, order[:, :k], False)
            out[n] = keep
        return out
    if scope != "global":
        raise ValueError(f"unknown scope {scope!r}")
    if isinstance(sparsity, dict):
        raise ValueError("scope global takes one sparsity for all matrices, not one per matrix")
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
               ridge: float = 0.01, iters: int = 0, inverse: torch.Tensor | None = None,
               chunk_bytes: int = 256 * 2**20) -> torch.Tensor:
    """The masked weight with each block row's kept weights re-solved by ridge least squares (float32 [N, K]).

    `iters` > 0: use `iters` steps of Jacobi-preconditioned conjugate gradients on all rows at once (`refit_cg`: one
    [N, K] x [K, K] product per step) when that costs less than the exact solution below, its flops weighted by
    `EXACT_FLOP_COST` (thin blocks); 0: always exact.

    Each block row (R output rows sharing one set S of kept columns, P pruned) solves the same problem in whichever
    form is smaller: with A = G + lambda I,
      S-form (|S| <= |P|):  w'_S = w_S + A_SS^-1 G_SP w_P;
      P-form (|P| < |S|):   w' = w - A^-1[:, P] (A^-1_PP)^-1 w_P   (the OBS update: same minimizer)
    Block rows of similar size are solved together (batched Cholesky, float64), padded with identity rows.
    `inverse` (A^-1, float64) can be passed when several weights share one Gram matrix.
    """
    R, C = block
    N, K = w.shape
    if iters > 0 and iters * 2 * N * K * K < EXACT_FLOP_COST * exact_flops(keep, block, K):
        return refit_cg(w, expand(keep, block), gram, ridge, iters)
    NB = N // R
    wf = w.to(torch.float64).reshape(NB, R, K)
    g = gram.to(torch.float64)
    lam = ridge * float(g.diagonal().mean().clamp_min(1e-12))
    A = g + lam * torch.eye(K, dtype=torch.float64, device=g.device)
    keep_cols = keep.repeat_interleave(C, dim=1)  # [NB, K]
    n_keep = keep_cols.sum(1)
    out = wf * keep_cols[:, None, :]
    use_p = (K - n_keep) < n_keep  # P-form for rows that prune less than they keep
    size = torch.where(use_p, K - n_keep, n_keep)  # m: the system size of each block row
    todo = (size > 0) & (n_keep > 0)
    if bool((todo & use_p).any()) and inverse is None:
        inverse = _spd_inverse(A)
    # S-form right-hand sides for every row at once: G w_P (one dense product)
    pruned = wf * (~keep_cols)[:, None, :]  # [NB, R, K]
    rhs_full = (pruned.reshape(N, K) @ g).reshape(NB, R, K) if bool((todo & ~use_p).any()) else None
    y_full = torch.zeros_like(wf) if bool((todo & use_p).any()) else None  # P-form multipliers, scattered
    for form_p in (False, True):
        rows = (todo & (use_p == form_p)).nonzero().squeeze(1)
        if not rows.numel():
            continue
        rows = rows[torch.argsort(size[rows], stable=True)]
        i = 0
        while i < rows.numel():
            j = i + 1  # grow the chunk (sizes ascending) while the padded systems stay under chunk_bytes
            while j < rows.numel() and (j - i + 1) * int(size[rows[j]]) ** 2 * 8 * 3 <= chunk_bytes:
                j += 1
            _solve_chunk(out, wf, keep_cols, rows[i:j], int(size[rows[j - 1]]), A if not form_p else inverse,
                         form_p, rhs_full, y_full)
            i = j
    if y_full is not None:  # w' = w - A^-1[:, P] y  for the P-form rows, as one dense product
        p_rows = (todo & use_p).nonzero().squeeze(1)
        upd = y_full[p_rows].reshape(-1, K) @ inverse  # [rows * R, K]
        out[p_rows] = (wf[p_rows] - upd.reshape(-1, R, K)) * keep_cols[p_rows][:, None, :]
    return out.reshape(N, K).to(torch.float32)


def _spd_inverse(A: torch.Tensor) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise ValueError("refit: the ridge-regularized Gram matrix is not positive definite; raise `ridge`")
    return torch.cholesky_solve(torch.eye(A.shape[0], dtype=A.dtype, device=A.device), L)


def _solve_chunk(out, wf, keep_cols, rows, m, mat, form_p: bool, rhs_full, y_full) -> None:
    """Solve the block rows `rows` (each with its own column set, padded to m) in one batch.

    S-form: mat = A; (A_SS) d = (G w_P)_S, out_S = w_S + d.  P-form: mat = A^-1; (A^-1_PP) y = w_P, y -> y_full.
    """
    sel = ~keep_cols[rows] if form_p else keep_cols[rows]  # [b, K]: the columns of each system
    order = torch.argsort((~sel).to(torch.int8), dim=1, stable=True)[:, :m]  # selected first, in column order
    valid = torch.gather(sel, 1, order)  # [b, m]
    idx = torch.where(valid, order, torch.zeros_like(order))
    vf = valid.to(torch.float64)
    M = mat[idx[:, :, None], idx[:, None, :]]  # [b, m, m]
    M = M * (vf[:, :, None] * vf[:, None, :]) + torch.diag_embed(1.0 - vf)
    L, info = torch.linalg.cholesky_ex(M)
    if bool((info != 0).any()):
        raise ValueError("refit: a sub-system is not positive definite; raise `ridge`")
    W = wf[rows]  # [b, R, K]
    gidx = idx[:, None, :].expand(-1, W.shape[1], -1)  # [b, R, m]
    if form_p:
        wp = torch.gather(W, 2, gidx) * vf[:, None, :]  # [b, R, m]
        y = torch.cholesky_solve(wp.transpose(1, 2), L).transpose(1, 2) * vf[:, None, :]  # [b, R, m]
        yf = torch.zeros_like(W)
        yf.scatter_add_(2, gidx, y)
        y_full[rows] = yf
    else:
        rhs = torch.gather(rhs_full[rows], 2, gidx) * vf[:, None, :]  # [b, R, m]
        d = torch.cholesky_solve(rhs.transpose(1, 2), L).transpose(1, 2)  # [b, R, m]
        new_s = (torch.gather(W, 2, gidx) + d) * vf[:, None, :]
        res = torch.zeros_like(W)
        res.scatter_add_(2, gidx, new_s)
        out[rows] = res


# The exact path's batched float64 factorizations run far fewer flops per second than CG's float32 products: on
# one CPU thread, a 1536 x 576 weight with 1x16 blocks at 50% took 9.1 s exact (9.3 GFLOP) and 0.7 s with 25 CG
# steps (25.5 GFLOP), the same output error to 5 digits (docs/results/blocksparse.md, "Sequential pruning"). A flop
# of the exact path is counted as this many of CG's when choosing.
EXACT_FLOP_COST = 10.0


def exact_flops(keep: torch.Tensor, block: tuple[int, int], K: int) -> float:
    """Rough flop count of the exact refit: a Cholesky of the smaller form per block row, plus its right-hand side."""
    R, C = block
    n_keep = keep.sum(1).to(torch.float64) * C
    m = torch.minimum(n_keep, K - n_keep)
    return float((m**3 / 3).sum()) + 2.0 * keep.shape[0] * R * K * K + K**3


@torch.no_grad()
def refit_cg(w: torch.Tensor, keep_el: torch.Tensor, gram: torch.Tensor, ridge: float = 0.01, iters: int = 25
             ) -> torch.Tensor:
    """min over u with u = 0 off `keep_el` of (u - w)^T (G + lambda I) (u - w), every row at once: preconditioned
    conjugate gradients (Jacobi), float32, starting from the masked weight (float32 [N, K])."""
    g = gram.to(torch.float32)
    K = g.shape[0]
    A = g + ridge * float(g.diagonal().mean().clamp_min(1e-12)) * torch.eye(K, dtype=torch.float32, device=g.device)
    wf = w.to(torch.float32)
    m = keep_el.to(torch.float32)
    u = wf * m
    dinv = 1.0 / A.diagonal().clamp_min(1e-30)
    r = -((u - wf) @ A) * m
    z = r * dinv
    p = z.clone()
    rz = (r * z).sum(1, keepdim=True)
    for _ in range(iters):
        ap = (p @ A) * m
        alpha = rz / (p * ap).sum(1, keepdim=True).clamp_min(1e-30)
        u += alpha * p
        r -= alpha * ap
        z = r * dinv
        rz_new = (r * z).sum(1, keepdim=True)
        p = z + (rz_new / rz.clamp_min(1e-30)) * p
        rz = rz_new
    return u * m


def output_error(w_new: torch.Tensor, w: torch.Tensor, gram: torch.Tensor) -> float:
    """Relative output error on the calibration inputs: tr(D G D^T) / tr(W G W^T), D = w_new - w."""
    wf = w.to(torch.float32)
    d = w_new.to(torch.float32) - wf
    g = gram.to(torch.float32)
    num = (d @ g * d).sum(dtype=torch.float64)
    den = (wf @ g * wf).sum(dtype=torch.float64).clamp_min(1e-30)
    return float(num / den)
