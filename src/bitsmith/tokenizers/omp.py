"""Batched Orthogonal Matching Pursuit: many targets at once, on the GPU when there is one, vectorised on the CPU.

For every target y (a row of `targets`, [m, d]) OMP picks k atoms (rows of `atoms`, [n, d]) greedily: at each step
the atom most correlated with the residual, |a_i . r| / ||a_i||, then the least-squares coefficients of y on all
atoms picked so far, and the new residual. A batch of targets advances together (on the CPU, between two
re-rankings of the screened search, each target goes through its steps in a small C function, `omp_native.py`, a
thread per core; the torch steps below are the fallback). Each target's least squares is an incremental Cholesky factorisation L of its growing Gram matrix G_SS, built by
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
Deterministic for a given device, batch size and CPU path (C or torch steps: sums in another order, so a near-tie
can go the other way; `use_native=False` or BITSMITH_OMP_NATIVE=0 takes the torch steps).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

try:
    from . import omp_native
except ImportError:  # loaded by file path (benchmarks/transplant_eval.py speed, where only torch is installed)
    omp_native = None

# An atom whose squared distance to the span of the atoms already picked is below this fraction of its squared norm
# counts as dependent (float32 round-off is ~1e-7).
_DEPENDENT = 1e-5
_CPU_SUB_BATCH = 16
_NATIVE_CHUNK = 32  # targets per call of the native CPU steps (threads take chunks as they come)


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
        progress: bool = False, use_native: bool = True) -> OMPResult:
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
    norm = sq.sqrt()
    inv_norm = torch.where(sq > 0, sq.rsqrt(), torch.zeros_like(sq))
    screened = candidates is not None and candidates < n
    if screened:
        Ab = A.to(torch.bfloat16)  # for the search only
        steps = refresh_steps(k)
    out_idx = torch.empty(m, k, dtype=torch.int64)
    out_coef = torch.empty(m, k, dtype=torch.float32)
    out_res = torch.empty(m, dtype=torch.float32)
    from tqdm.auto import tqdm

    native = screened and dev.type == "cpu" and use_native and omp_native is not None and omp_native.available()
    workers = torch.get_num_threads() if dev.type == "cpu" and screened else 1
    pool = ThreadPoolExecutor(workers, thread_name_prefix="omp") if workers > 1 else None
    with torch.no_grad(), tqdm(total=m, unit="tok", desc="omp", disable=not progress, leave=False) as bar:
        for start in range(0, m, batch_size):
            Y = targets[start:start + batch_size].to(dev, torch.float32)
            if screened:
                idx, coef = _omp_screened(A, sq, norm, inv_norm, Ab, Y, k, candidates, tol, steps, pool, native)
            else:
                idx, coef = _omp_exact(A, sq, norm, inv_norm, Y, k, tol)
            stop = start + len(Y)
            out_idx[start:stop] = idx.cpu()
            out_coef[start:stop] = coef.cpu()
            out_res[start:stop] = _residual(A, Y, idx, coef).cpu()
            bar.update(len(Y))
    if pool is not None:
        pool.shutdown()
    return OMPResult(out_idx, out_coef, out_res)


class _Factor:
    """Per-target Cholesky rows L (of G_SS) and z = L^-1 A_S y, for b targets and k slots, with the orthonormal
    bases Q, residuals R and chosen atoms idx; `group(sl)` gives views of the targets sl that steps update."""

    def __init__(self, Y: torch.Tensor, k: int, tol: float):
        b, d = Y.shape
        ynorm = Y.norm(dim=1)
        self.L = torch.zeros(b, k, k, device=Y.device)
        self.z = torch.zeros(b, k, device=Y.device)
        self.used = torch.zeros(b, k, dtype=torch.bool, device=Y.device)
        self.stop = tol * ynorm  # a target is done when no atom correlates with its residual above this
        self.active = ynorm > 0
        self.idx = torch.zeros(b, k, dtype=torch.int64, device=Y.device)
        self.Q = torch.zeros(b, k, d, device=Y.device)  # orthonormal bases, [b, k, d]
        self.R = Y.clone()  # residuals, [b, d]

    def group(self, sl: slice) -> "_Factor":
        """The same state for targets sl only: views (sliced once, not at every step), updated in place."""
        g = object.__new__(_Factor)
        for name in ("L", "z", "used", "stop", "active", "idx", "Q", "R"):
            setattr(g, name, getattr(self, name)[sl])
        return g

    def step(self, t: int, s: torch.Tensor, a_s: torch.Tensor, norm_s: torch.Tensor, sq_s: torch.Tensor) -> None:
        """Slot t gets atom s [b'] (rows a_s [b', d], norms norm_s, squared norms sq_s): Gram-Schmidt against the
        atoms already picked (w = L^-1 G[S, s] = Q a_s, twice, so that Q stays orthonormal), the new Cholesky row,
        z_t = (a_s . r) / L_tt, and the residual r <- r - q_t z_t. A slot is left unused (L_tt = 1, z_t = 0) where the
        target is done or the atom is (numerically) in the span of those already picked."""
        Q, R = self.Q, self.R
        self.idx[:, t] = s
        corr = (a_s * R).sum(1)  # exact a_s . r
        if t:
            Qt = Q[:, :t]  # [b', t, d]
            QtT = Qt.transpose(1, 2)  # row vector x matrix: several times faster than matrix x column on CPU
            a1 = a_s.unsqueeze(1)
            w = torch.bmm(a1, QtT)  # [b', 1, t]
            v = a1 - torch.bmm(w, Qt)
            w2 = torch.bmm(v, QtT)  # the second pass
            v = (v - torch.bmm(w2, Qt)).squeeze(1)
            w = (w + w2).squeeze(1)
            pivot = sq_s - (w * w).sum(1)
        else:  # the first atom: nothing to orthogonalise against
            v, pivot = a_s, sq_s
        active = self.active & (corr.abs() > self.stop * norm_s)
        ok = active & (pivot > _DEPENDENT * sq_s)
        diag = torch.where(ok, pivot.clamp_min(1e-30).sqrt(), 1.0)
        inv = ok / diag  # 1 / L_tt, 0 where the slot is not used
        if t:
            self.L[:, t, :t] = w * ok.unsqueeze(1)
        self.L[:, t, t] = diag
        zt = corr * inv
        self.z[:, t] = zt
        self.used[:, t] = ok
        self.active.copy_(active)
        q = v * inv.unsqueeze(1)
        Q[:, t] = q
        R -= q * zt.unsqueeze(1)

    def coefs(self, k: int, t: int) -> torch.Tensor:
        """x = L^-T z over the first t slots: [b, k] (zeros in unused slots)."""
        x = torch.linalg.solve_triangular(self.L[:, :t, :t].transpose(1, 2), self.z[:, :t].unsqueeze(-1),
                                          upper=True).squeeze(-1)
        x = x * self.used[:, :t]
        return x if t == k else torch.cat([x, x.new_zeros(x.shape[0], k - t)], 1)


def _omp_exact(A, sq, norm, inv_norm, Y, k, tol):
    """Search all n atoms each step: correlations by one GEMM."""
    f = _Factor(Y, k, tol)
    t = 0
    while t < k and (t == 0 or bool(f.active.any())):
        score = (f.R @ A.T).abs_().mul_(inv_norm)  # [b, n]
        if t:
            score.scatter_(1, f.idx[:, :t], -1.0)
        s = score.argmax(1)
        del score
        f.step(t, s, A[s], norm[s], sq[s])
        t += 1
    f.idx[:, t:] = f.idx[:, :1]
    return f.idx, f.coefs(k, t)


def _omp_screened(A, sq, norm, inv_norm, Ab, Y, k, M, tol, refresh, pool=None, native=False):
    """Search each target's M atoms most correlated with its residual, re-chosen at the steps in `refresh` by one
    bf16 GEMM over all atoms for the whole batch (all threads). Between refreshes a GPU takes the whole batch at
    once. On the CPU, with `native`, the top-M and the steps run in C (`omp_native`), chunks of targets spread over
    `pool` (a thread per core); without, the torch steps take the targets 16 at a time (their candidates' bf16 rows,
    [16, M, d], stay in cache for the steps of the segment), each group on one thread, the groups spread over
    `pool` (the many small per-step operations cost more in OpenMP barriers than in work when one group uses both)."""
    b = Y.shape[0]
    cpu = Y.device.type == "cpu"
    sub = _CPU_SUB_BATCH if cpu else b
    f = _Factor(Y, k, tol)
    bounds = sorted(refresh | {k})
    t = 0
    for r0, r1 in zip(bounds[:-1], bounds[1:]):
        if t < r0 or not bool(f.active.any()):
            break
        S = f.R.to(torch.bfloat16) @ Ab.T  # [b, n]
        if cpu and native:  # |S| / ||a||, picked atoms out, top M: fused, a thread per row chunk
            cand = torch.empty(b, M, dtype=torch.int64)
            _on_threads(lambda c: omp_native.top_candidates(c[0], c[1], S, inv_norm, f.idx, r0, cand),
                        [(lo, min(lo + _NATIVE_CHUNK, b)) for lo in range(0, b, _NATIVE_CHUNK)], pool)
        else:
            score = S.float().abs_().mul_(inv_norm)
            if r0:
                score.scatter_(1, f.idx[:, :r0], -1.0)
            cand = score.topk(M, dim=1, sorted=False).indices
            del score
            cand, _ = cand.sort(1)  # [b, M] in atom order
        del S
        if cpu and native:
            chunks = [(lo, min(lo + _NATIVE_CHUNK, b)) for lo in range(0, b, _NATIVE_CHUNK)]
            _on_threads(lambda c: omp_native.segment(c[0], c[1], r0, r1, A, Ab, norm, sq, inv_norm, cand, f,
                                                     _DEPENDENT), chunks, pool)
            t = r1
            continue
        groups = [slice(lo, min(lo + sub, b)) for lo in range(0, b, sub)]
        run = lambda sl: _segment(A, sq, norm, inv_norm, Ab, f.group(sl), cand[sl], r0, r1)  # noqa: E731
        if cpu:
            _on_cpu_threads(run, groups, pool)
        else:
            for sl in groups:
                run(sl)
        t = r1
    f.idx[:, t:] = f.idx[:, :1]
    return f.idx, f.coefs(k, t)


def _segment(A, sq, norm, inv_norm, Ab, g: _Factor, c: torch.Tensor, r0: int, r1: int) -> None:
    """Steps r0..r1-1 of the screened search for one group of targets g, each choosing among its candidates c [b', M]
    (scored in bf16, like the refresh)."""
    flat = c.reshape(-1)
    AcT = Ab.index_select(0, flat).view(c.shape[0], c.shape[1], -1).transpose(1, 2)  # [b', d, M] bf16
    inv_c = inv_norm.index_select(0, flat).view(c.shape[0], 1, c.shape[1])
    c3 = c.unsqueeze(1)
    taken = torch.zeros(c3.shape, dtype=torch.bool, device=c.device)
    for t in range(r0, r1):
        score = torch.bmm(g.R.to(torch.bfloat16).unsqueeze(1), AcT).float()  # [b', 1, M]
        score.abs_().mul_(inv_c).masked_fill_(taken, -1.0)
        j = score.argmax(2, keepdim=True)
        taken.scatter_(2, j, True)
        s = c3.gather(2, j).view(-1)
        g.step(t, s, A.index_select(0, s), norm.index_select(0, s), sq.index_select(0, s))


def _on_threads(run, items, pool) -> None:
    """run(x) for every item: on the pool's threads when there is a pool (run must release the GIL: ctypes does)."""
    if pool is None:
        for x in items:
            run(x)
    else:
        for fut in [pool.submit(run, x) for x in items]:
            fut.result()


def _on_cpu_threads(run, groups, pool) -> None:
    """run(g) for every group g: on the pool's threads (one intra-op thread each), else here on one thread."""
    saved = torch.get_num_threads()
    try:
        if pool is None:
            torch.set_num_threads(1)
            for g in groups:
                run(g)
        else:
            def task(g):
                if torch.get_num_threads() != 1:  # per worker thread (OpenMP keeps it per thread)
                    torch.set_num_threads(1)
                with torch.no_grad():  # grad mode is per thread too
                    run(g)

            for fut in [pool.submit(task, g) for g in groups]:
                fut.result()
    finally:
        torch.set_num_threads(saved)


def _residual(A, Y, idx, coef):
    """||y - sum_j coef_j a_idx_j|| / ||y||, computed directly."""
    R = Y - torch.bmm(coef.unsqueeze(1), A[idx]).squeeze(1)
    yn = Y.norm(dim=1)
    return torch.where(yn > 0, R.norm(dim=1) / yn.clamp_min(1e-30), torch.zeros_like(yn))
