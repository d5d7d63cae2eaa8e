"""Non-uniform per-layer sparsity at a fixed average (`block_sparse` with `allocation: owl`).

OWL (Yin et al., "Outlier Weighed Layerwise sparsity", 2023) observes that the decoder layers whose activation-aware
importances |W_ij| * ||X_j|| hold more outliers are the ones that pruning hurts most, and gives them a lower sparsity.
Per decoder layer l (all its targeted matrices pooled):

    D_l    = fraction of its elementwise importances above `m` times their mean over the layer
    keep_l = (1 - s) + 2 * lam * (d_l - mean_w(d)),   d_l = (D_l - min D) / (max D - min D)

so keep ratios span 2 * lam around 1 - s, and mean_w (weighted by each layer's targeted weight count) keeps the
average sparsity over the layers' weights at s. Matrices outside the decoder layers keep s. The per-matrix
sparsities are then rounded to what the allocation scope can reach (`quantize`: a whole number of blocks per block
row for scope row, per matrix for scope layer), carrying each rounding error into the next matrix so that the
achieved average stays within one block row of s.
"""

from __future__ import annotations

import torch

from . import scores as S


def layer_of(name: str, stack: str) -> str | None:
    """The decoder layer prefix ("model.layers.3") of a module name, or None when it is outside the stack."""
    if not name.startswith(stack + "."):
        return None
    index = name[len(stack) + 1:].split(".", 1)[0]
    return f"{stack}.{index}" if index.isdigit() else None


@torch.no_grad()
def outlier_ratios(weights: dict[str, torch.Tensor], norms: dict[str, torch.Tensor], groups: dict[str, str],
                   m: float) -> dict[str, float]:
    """{layer: fraction of its elementwise importances |W| * ||X|| above m times the layer's mean importance}."""
    pooled: dict[str, list[torch.Tensor]] = {}
    for n, g in groups.items():
        pooled.setdefault(g, []).append(S.elementwise(weights[n], norms[n]).reshape(-1))
    out = {}
    for g, parts in pooled.items():
        e = torch.cat(parts)
        out[g] = float((e > m * e.mean()).float().mean())
    return out


def layer_sparsities(ratios: dict[str, float], sizes: dict[str, int], sparsity: float, lam: float
                     ) -> dict[str, float]:
    """{layer: sparsity}: more outliers -> lower sparsity, within s +- lam, size-weighted mean exactly s."""
    lo, hi = min(ratios.values()), max(ratios.values())
    d = {g: (r - lo) / (hi - lo) if hi > lo else 0.5 for g, r in ratios.items()}
    total = sum(sizes[g] for g in d)
    mean = sum(d[g] * sizes[g] for g in d) / total
    return {g: sparsity - 2 * lam * (d[g] - mean) for g in d}


def quantize(targets: dict[str, float], shapes: dict[str, tuple[int, int]], block: tuple[int, int], scope: str
             ) -> dict[str, float]:
    """Per-matrix sparsities that `scores.allocate` reaches exactly (a whole number of pruned blocks per block row,
    or per matrix), each matrix's rounding error carried into the next (module order) so that the pruned weight
    count stays within half a quantum of sum(target * size)."""
    R, C = block
    out, owed = {}, 0.0
    for n, s in targets.items():
        N, K = shapes[n]
        nb, kb = N // R, K // C
        per_step, steps = (nb * R * C, kb) if scope == "row" else (R * C, nb * kb)  # weights per unit, units
        want = s * N * K + owed
        k = min(max(round(want / per_step), 0), steps - 1)  # never empty a row (or matrix)
        owed = want - k * per_step
        out[n] = k / steps
    return out


def owl_sparsities(weights: dict[str, torch.Tensor], norms: dict[str, torch.Tensor], stack: str, sparsity: float,
                   lam: float, m: float, block: tuple[int, int], scope: str) -> tuple[dict[str, float], dict]:
    """({module: sparsity for `allocate`}, report) for the targeted `weights` [N, K] and their input norms [K]."""
    groups = {n: g for n in weights if (g := layer_of(n, stack)) is not None}
    targets = {n: sparsity for n in weights}
    report: dict = {"m": m, "lambda": lam, "layers": {}}
    if groups:
        ratios = outlier_ratios(weights, norms, groups, m)
        sizes: dict[str, int] = {}
        for n, g in groups.items():
            sizes[g] = sizes.get(g, 0) + weights[n].numel()
        per_layer = layer_sparsities(ratios, sizes, sparsity, lam)
        targets.update({n: per_layer[g] for n, g in groups.items()})
        report["layers"] = {g: {"outlier_ratio": round(ratios[g], 6), "sparsity": round(per_layer[g], 4)}
                            for g in ratios}
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    return quantize(targets, shapes, block, scope), report
