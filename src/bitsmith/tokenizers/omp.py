"""Batched Orthogonal Matching Pursuit: many targets at once, on the GPU when there is one, vectorised on the CPU.

For every target y (a row of `targets`, [m, d]) OMP picks k atoms (rows of `atoms`, [n, d]) greedily: at each step
the atom most correlated with the residual, |a_i . r| / ||a_i||, then the least-squares coefficients of y on all
atoms picked so far, and the new residual. A batch of targets advances together; nothing runs one target at a time.
Each target's least squares is an incremental Cholesky factorisation L of its growing Gram matrix G_SS, built by
Gram-Schmidt against the atoms already picked (an orthonormal basis q_1..q_t of their span, kept in R^d):

    new atom s:  w = L^-1 G[S, s] (= q_i . a_s),  L_tt = sqrt(||a_s||^2 - w.w),  z_t = (a_s . r) / L_tt
    coefficients x = L^-T z (one batched triangular solve at the end); residual r <- r - q_t z_t

Two ways to find the best atom, chosen by `candidates`:

- exact (`candidates=None`): the correlations of all n atoms with the residual, one [b, d] x [d, n] float32 GEMM
  per step: k n d multiply-adds per target. Right for a GPU.
- screened (`candidates=M`): at steps 0, 2, 6, 14, 30, 62 (`refresh_steps`) one bfloat16 GEMM ranks all n atoms
  against the current residual and keeps each target's M best; the steps in between search only those M (their
  correlations from a bf16 copy gathered per target). About log2(k) passes over the dictionary instead of k.
  The chosen atoms are then used in float32 (Gram-Schmidt, coefficients, residual): only the search is narrowed.
  Ranking only once, against y itself, loses much more (docs/results/transplant.md has the measurements).

An atom that is (numerically) in the span of those already picked takes its slot with coefficient 0; a target stops
early (its remaining slots get coefficient 0) when no atom correlates with its residual by more than `tol * ||y||`.
So a target that is an exact combination of at most k atoms is recovered exactly, with those atoms.
Deterministic for a given device and batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# An atom whose squared distance to the span of the atoms already picked is below this fraction of its squared norm
# counts as dependent (float32 round-off is ~1e-7).
_DEPENDENT = 1e-5
_CPU_SUB_BATCH = 16


def refresh_steps(k: int) -> frozenset[int]:
    """Steps at which the screened search re-ranks all atoms against the residual: 0, 2, 6, 14, 30, 62, ..."""
    out, t = set(), 0
    while t < k:
        out.add(t)
        t = 2 * t + 2
    return frozenset(out)


@dataclass
class OMPResult:
    indices: torch.Tensor  # [m, k] int64 atom indices
    coefs: torch.Tensor  # [m, k] float32 (0 in slots not used)
    residual: torch.Tensor  # [m] float32: ||y - sum_j coefs_j atoms[indices_j]|| / ||y|| (0 for a zero target)

    def combine(self, rows: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """sum_j coefs[i, j] * rows[indices[i, j]] for targets start:stop: rows [n, e] -> [stop - start, e] float32
        (rows [n] -> [stop - start])."""
        idx, c = self.indices[start:stop], self.coefs[start:stop]
        rows = rows.float()
        if rows.dim() == 1:
            return (rows[idx] * c).sum(1)
        return torch.bmm(c.unsqueeze(1), rows[idx]).squeeze(1)  # [b, 1, k] x [b, k, e]


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def omp(atoms: torch.Tensor, targets: torch.Tensor, k: int, *, candidates: int | None = None,
        batch_size: int = 256, device: str | torch.device | None = None, tol: float = 1e-5,
        progress: bool = False) -> OMPResult:
    """Sparse codes of `targets` [m, d] over `atoms` [n, d]: k atoms each (k is capped at n). CPU tensors back."""
    if atoms.dim() != 2 or targets.dim() != 2 or atoms.shape[1] != targets.shape[1]:
        raise ValueError(f"omp: atoms [n, d] and targets [m, d] needed, got {list(atoms.shape)} and "
                         f"{list(targets.shape)}")
    n, m = atoms.shape[0], targets.shape[0]
    if n == 0:
        raise ValueError("omp: no atoms")
    if k < 1:
        raise ValueError(f"omp: k must be at least 1, got {k}")
    if candidates is not None and candidates < 1:
        raise ValueError(f"omp: candidates must be at least 1 (or None for the exact search), got {candidates}")
    k = min(int(k), n)
    dev = torch.device(device) if device is not None else default_device()
    A = atoms.to(dev, torch.float32).contiguous()
    sq = (A * A).sum(1)  # [n]
    inv_norm = torch.where(sq > 0, sq.rsqrt(), torch.zeros_like(sq))
    screened = candidates is not None and candidates < n
    if screened:
        Ab = A.to(torch.bfloat16)  # for the search only
        steps = refresh_steps(k)
    out_idx = torch.empty(m, k, dtype=torch.int64)
    out_coef = torch.empty(m, k, dtype=torch.float32)
    out_res = torch.empty(m, dtype=torch.float32)
    from tqdm.auto import tqdm

    with torch.no_grad(), tqdm(total=m, unit="tok", desc="omp", disable=not progress, leave=False) as bar:
        for start in range(0, m, batch_size):
            Y = targets[start:start + batch_size].to(dev, torch.float32)
            if screened:
                idx, coef = _omp_screened(A, Ab, inv_norm, Y, k, candidates, tol, steps)
            else:
                idx, coef = _omp_exact(A, sq, inv_norm, Y, k, tol)
            stop = start + len(Y)
            out_idx[start:stop] = idx.cpu()
            out_coef[start:stop] = coef.cpu()
            out_res[start:stop] = _residual(A, Y, idx, coef).cpu()
            bar.update(len(Y))
    return OMPResult(out_idx, out_coef, out_res)


class _Factor:
    """Per-target Cholesky rows L (of G_SS) and z = L^-1 A_S y, for b targets and k slots; updated slot by slot,
    for all targets or a slice of them."""

    def __init__(self, b: int, k: int, ynorm: torch.Tensor, tol: float):
        self.L = torch.zeros(b, k, k, device=ynorm.device)
        self.z = torch.zeros(b, k, device=ynorm.device)
        self.used = torch.zeros(b, k, dtype=torch.bool, device=ynorm.device)
        self.stop = tol * ynorm  # a target is done when no atom correlates with its residual above this
        self.active = ynorm > 0

    def append(self, sl: slice, t: int, w: torch.Tensor, g_ss: torch.Tensor, corr: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot t of targets sl. w = L^-1 G[S, s] [b', t]; g_ss = ||a_s||^2 [b']; corr = a_s . r [b'].

        Returns (1 / L_tt, z_t) [b'], both 0 where the slot is not used (target done, or a dependent atom)."""
        active = self.active[sl] & (corr.abs() > self.stop[sl] * g_ss.sqrt())
        pivot = g_ss - (w * w).sum(1)
        ok = active & (pivot > _DEPENDENT * g_ss)
        diag = torch.where(ok, pivot.clamp_min(1e-30).sqrt(), torch.ones_like(pivot))
        inv = torch.where(ok, 1.0 / diag, torch.zeros_like(diag))
        self.L[sl, t, :t] = w * ok.unsqueeze(1)
        self.L[sl, t, t] = diag
        zt = corr * inv
        self.z[sl, t] = zt
        self.used[sl, t] = ok
        self.active[sl] = active
        return inv, zt

    def coefs(self, k: int, t: int) -> torch.Tensor:
        """x = L^-T z over the first t slots: [b, k] (zeros in unused slots)."""
        x = torch.linalg.solve_triangular(self.L[:, :t, :t].transpose(1, 2), self.z[:, :t].unsqueeze(-1),
                                          upper=True).squeeze(-1)
        x = x * self.used[:, :t]
        return x if t == k else torch.cat([x, x.new_zeros(x.shape[0], k - t)], 1)


def _gram_schmidt_step(f: _Factor, sl: slice, t: int, Q, R, a_s, g_ss) -> None:
    """Add atom a_s [b', d] at slot t to the bases Q [b', k, d] of targets sl; update their residuals R [b', d]."""
    corr = (a_s * R).sum(1)  # exact a_s . r
    Qt = Q[:, :t]  # [b', t, d]
    QtT = Qt.transpose(1, 2)  # products as row vector x matrix: several times faster than matrix x column on CPU
    w = torch.bmm(a_s.unsqueeze(1), QtT).squeeze(1)  # [b', t] = L^-1 G[S, s]
    v = a_s - torch.bmm(w.unsqueeze(1), Qt).squeeze(1)
    w2 = torch.bmm(v.unsqueeze(1), QtT).squeeze(1)  # second Gram-Schmidt pass keeps Q orthonormal
    v = v - torch.bmm(w2.unsqueeze(1), Qt).squeeze(1)
    inv, zt = f.append(sl, t, w + w2, g_ss, corr)
    q = v * inv.unsqueeze(1)
    Q[:, t] = q
    R -= q * zt.unsqueeze(1)


def _omp_exact(A, sq, inv_norm, Y, k, tol):
    """Search all n atoms each step: correlations by one GEMM."""
    b, d = Y.shape
    f = _Factor(b, k, Y.norm(dim=1), tol)
    idx = torch.zeros(b, k, dtype=torch.int64, device=Y.device)
    Q = torch.zeros(b, k, d, device=Y.device)  # orthonormal bases, [b, k, d]
    R = Y.clone()  # residuals, [b, d]
    everyone = slice(None)
    t = 0
    while t < k and (t == 0 or bool(f.active.any())):
        score = (R @ A.T).abs_().mul_(inv_norm)  # [b, n]
        if t:
            score.scatter_(1, idx[:, :t], -1.0)
        s = score.argmax(1)
        del score
        idx[:, t] = s
        _gram_schmidt_step(f, everyone, t, Q, R, A[s], sq[s])
        t += 1
    idx[:, t:] = idx[:, :1]
    return idx, f.coefs(k, t)


def _omp_screened(A, Ab, inv_norm, Y, k, M, tol, refresh):
    """Search each target's M atoms most correlated with its residual, re-chosen at the steps in `refresh` by one
    bf16 GEMM over all atoms for the whole batch. Between refreshes, on the CPU, targets go 16 at a time, so their
    candidates' bf16 rows ([16, M, d]) stay in cache for the steps of the segment; a GPU takes the whole batch."""
    b, d = Y.shape
    sub = _CPU_SUB_BATCH if Y.device.type == "cpu" else b
    f = _Factor(b, k, Y.norm(dim=1), tol)
    idx = torch.zeros(b, k, dtype=torch.int64, device=Y.device)
    Q = torch.zeros(b, k, d, device=Y.device)
    R = Y.clone()
    bounds = sorted(refresh | {k})
    t = 0
    for r0, r1 in zip(bounds[:-1], bounds[1:]):
        if t < r0 or not bool(f.active.any()):
            break
        score = (R.to(torch.bfloat16) @ Ab.T).float().abs_().mul_(inv_norm)  # [b, n]
        if r0:
            score.scatter_(1, idx[:, :r0], -1.0)
        cand = score.topk(M, dim=1, sorted=False).indices
        del score
        cand, _ = cand.sort(1)  # [b, M]; ties go to the lowest atom index
        with _single_thread(Y.device):
            for lo in range(0, b, sub):
                sl = slice(lo, lo + sub)
                c_sl = cand[sl]
                AcT = Ab[c_sl].transpose(1, 2)  # [b', d, M] bf16
                inv_c = inv_norm[c_sl]
                rows = torch.arange(c_sl.shape[0], device=Y.device)
                taken = torch.zeros(c_sl.shape, dtype=torch.bool, device=Y.device)
                Qs, Rs = Q[sl], R[sl]
                for t in range(r0, r1):
                    score = torch.bmm(Rs.to(torch.bfloat16).unsqueeze(1), AcT).squeeze(1).float()  # [b', M]
                    score = score.abs_().mul_(inv_c).masked_fill_(taken, -1.0)
                    j = score.argmax(1)
                    taken[rows, j] = True
                    s = c_sl[rows, j]
                    idx[sl, t] = s
                    a_s = A[s]
                    _gram_schmidt_step(f, sl, t, Qs, Rs, a_s, (a_s * a_s).sum(1))
        t = r1
    idx[:, t:] = idx[:, :1]
    return idx, f.coefs(k, t)


def _residual(A, Y, idx, coef):
    """||y - sum_j coef_j a_idx_j|| / ||y||, computed directly."""
    R = Y - torch.bmm(coef.unsqueeze(1), A[idx]).squeeze(1)
    yn = Y.norm(dim=1)
    return torch.where(yn > 0, R.norm(dim=1) / yn.clamp_min(1e-30), torch.zeros_like(yn))


class _single_thread:
    """On the CPU, run the many small per-step operations on one thread: on shared cores OpenMP's barriers cost more
    than the work (measured on the 2-core dev box under load: 1.1 ms vs 22 ms for a [64, 1, 32] x [64, 32, 1024] bmm)."""

    def __init__(self, device: torch.device):
        self.cpu = device.type == "cpu"

    def __enter__(self):
        if self.cpu:
            self.saved = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.cpu:
            torch.set_num_threads(self.saved)
