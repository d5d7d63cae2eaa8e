"""Adaptive granularity (`group_size: auto`): a group size per matrix, from the weights only, under a bit budget.

The rule (evidence in docs/passes/finequant.md):

1. Profile. For every targeted matrix W [N, K] and every candidate group size g (default 16, 32, 64 and 128;
   sizes >= K collapse into per-channel; 256, 512 and "channel" only when listed), quantize W exactly as the pass
   will (same bits, scale rule -- with `scale_divisor: auto` each group's rule is chosen by `clipping.rule_search` --
   and clipping search) and record the squared reconstruction error E(W, g) and the cost in bits, b per weight plus
   16 bits per (group, row) for the scale (and 8 for a zero point when asymmetric). Only every `stride`-th row is
   quantized (at most PROFILE_ROWS rows): the error is a sum over rows, so the sample estimates it without bias.
2. Score. A matrix with n weights and relative error r = E(W, g) / ||W||^2 scores n * r^2: its size times the
   square of its relative error. The square makes the rule averse to concentrating error in a few matrices, which
   on the example models costs more perplexity than the plain error sum predicts.
3. Allocate. Minimise the sum of scores subject to sum of costs <= budget x number of weights: a multiple-choice
   knapsack. Two solutions are built and the lower total score wins: (a) the Lagrangian greedy -- each matrix's
   options reduced to the lower convex hull of (cost, score), the cheapest everywhere, then upgrades in order of
   score saved per bit while they fit; (b) the finest single group size that fits, then the leftover bits spent on
   the upgrades that save the most score per bit. So the result never scores worse than a uniform group size, and
   it never exceeds the budget.

No default candidate is coarser than 128 because the score cannot be trusted there: at the cost of g128 on both
example models, every allocation measured that paid for finer groups by sending matrices to 256, 512 or per channel
scored better than uniform 128 and lost perplexity to it (or tied). So at that cost, the cheapest default budget, the
rule is uniform 128; a lower budget is refused (list coarser candidates to allow it).

The budget is over the whole model's targeted weights, so step 3 needs every matrix's profile: in `bitsmith.compress`
the pass streams the input checkpoint once (one tensor at a time) before the first weight is quantized and caches the
allocation in the run's context; on an in-memory model the allocation is computed from the model's weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from ..compress.errors import PlanError
from .clipping import rule_search, search_clip
from .groupwise import SCALE_BITS, group_sq_error, pad_to_groups, storage_bits

# No default candidate coarser than 128 (see the module docstring); listing coarser ones is allowed.
DEFAULT_CANDIDATES: tuple = (16, 32, 64, 128)
ALL_CANDIDATES: tuple = (16, 32, 64, 128, 256, 512, "channel")  # the candidates before that change
PROFILE_ROWS = 64  # rows quantized per matrix and candidate when profiling (evenly strided)


@dataclass(frozen=True)
class Option:
    group_size: int  # effective: <= K; K means per channel
    cost: int  # bits for the whole matrix
    error: float  # squared reconstruction error over the whole matrix (estimated from the sampled rows)


@dataclass
class MatrixProfile:
    name: str
    shape: tuple[int, int]
    energy: float  # ||W||^2
    options: list[Option] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def score(self, option: Option) -> float:
        return _SCORES[_score](self, option)


# How a matrix's error counts in the allocation. "size_relative2" is the rule; the others are kept for the ablation in
# docs/passes/finequant.md (benchmarks/finequant_quality.py --score).
_SCORES = {
    "size_relative2": lambda p, o: p.numel * (o.error / max(p.energy, 1e-30)) ** 2,  # size x relative error squared
    "relative": lambda p, o: o.error / max(p.energy, 1e-30),  # every matrix counts once
    "sse": lambda p, o: o.error,  # absolute squared error: big-weight matrices count more
    "size_relative": lambda p, o: o.error / max(p.energy, 1e-30) * p.numel,  # relative error, weighted by size
}
_score = "size_relative2"


def set_score(name: str) -> None:
    """Switch the allocation's matrix score (for ablations); one of _SCORES."""
    global _score
    if name not in _SCORES:
        raise ValueError(f"unknown score {name!r} (known: {', '.join(_SCORES)})")
    _score = name


def effective_sizes(candidates: Iterable, in_features: int) -> list[int]:
    """Distinct effective group sizes for a K-wide matrix, ascending (anything >= K is per channel)."""
    return sorted({in_features if c == "channel" else min(int(c), in_features) for c in candidates})


def quant_error(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_divisor: str,
                scale_dtype: torch.dtype, clip_search: bool) -> float:
    """Squared reconstruction error of the whole of w [N, K] as the pass quantizes it
    (scale_divisor "auto": each group's scale rule chosen by `clipping.rule_search`)."""
    if scale_divisor == "auto":
        return float(rule_search(w, bits, group_size, symmetric, scale_dtype)[1].sum())
    if clip_search:
        return float(search_clip(w, bits, group_size, symmetric, scale_divisor, scale_dtype)[1].sum())
    wg, _ = pad_to_groups(w.to(torch.float32), group_size)
    return float(group_sq_error(wg, bits, symmetric, scale_divisor, scale_dtype, None).sum())


def profile_matrix(name: str, w: torch.Tensor, *, bits: int, symmetric: bool, scale_divisor: str,
                   scale_dtype: torch.dtype, clip_search: bool, candidates: Iterable = DEFAULT_CANDIDATES,
                   max_rows: int = PROFILE_ROWS) -> MatrixProfile:
    N, K = w.shape
    stride = max(1, math.ceil(N / max_rows))
    sample = w[::stride].to(torch.float32)  # every stride-th row; error scaled back up by N / rows
    factor = N / sample.shape[0]
    scale_bits = SCALE_BITS.get(scale_dtype, 16)
    prof = MatrixProfile(name, (N, K), float(w.to(torch.float32).square().sum()))
    for g in effective_sizes(candidates, K):
        err = quant_error(sample, bits, g, symmetric, scale_divisor, scale_dtype, clip_search) * factor
        prof.options.append(Option(g, storage_bits(N, K, bits, g, symmetric, scale_bits), err))
    return prof


def _hull(prof: MatrixProfile) -> list[Option]:
    """Options on the lower convex hull of (cost, score), cheapest first: the only ones a Lagrangian choice picks."""
    pts = sorted(prof.options, key=lambda o: (o.cost, prof.score(o)))
    hull: list[Option] = []
    for o in pts:
        if hull and prof.score(o) >= prof.score(hull[-1]):
            continue  # costs more and is no better
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above the segment a -> o: drop it
            sa, sb, so = prof.score(a), prof.score(b), prof.score(o)
            if (sb - sa) * (o.cost - a.cost) >= (so - sa) * (b.cost - a.cost):
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def budget_range(shapes: Iterable[tuple[int, int]], bits: int, symmetric: bool, scale_bits: int,
                 candidates: Iterable = DEFAULT_CANDIDATES) -> tuple[float, float]:
    """(cheapest, dearest) average bits per weight reachable with these candidates, from shapes alone."""
    cand = list(candidates)
    lo = hi = n = 0
    for N, K in shapes:
        sizes = effective_sizes(cand, K)
        lo += storage_bits(N, K, bits, sizes[-1], symmetric, scale_bits)
        hi += storage_bits(N, K, bits, sizes[0], symmetric, scale_bits)
        n += N * K
    return lo / max(n, 1), hi / max(n, 1)


def _greedy(profiles: list[MatrixProfile], limit: float) -> dict[str, Option]:
    """Lagrangian greedy: cheapest option everywhere, then hull upgrades by score saved per bit while they fit."""
    hulls = {p.name: _hull(p) for p in profiles}
    chosen = {name: 0 for name in hulls}  # index into the hull
    spent = sum(h[0].cost for h in hulls.values())
    by_name = {p.name: p for p in profiles}
    steps = []  # (score saved per bit, name, hull index reached)
    for name, h in hulls.items():
        p = by_name[name]
        for i in range(1, len(h)):
            gain = (p.score(h[i - 1]) - p.score(h[i])) / (h[i].cost - h[i - 1].cost)
            steps.append((gain, name, i))
    steps.sort(key=lambda s: (-s[0], s[1], s[2]))  # hull slopes fall along a matrix, so its steps stay in order
    blocked: set[str] = set()
    for gain, name, i in steps:
        if name in blocked or chosen[name] != i - 1:
            continue
        h = hulls[name]
        extra = h[i].cost - h[i - 1].cost
        if spent + extra > limit:
            blocked.add(name)  # its later steps cost even more
            continue
        chosen[name] = i
        spent += extra
    return {name: hulls[name][i] for name, i in chosen.items()}


def _uniform(profiles: list[MatrixProfile], limit: float) -> dict[str, Option] | None:
    """The finest single group size (min(g, K) per matrix) that fits, then upgrades that still fit, best first."""
    sizes = sorted({o.group_size for p in profiles for o in p.options})
    best = None
    for g in sizes:  # ascending: the first that fits is the finest
        choice = {p.name: max((o for o in p.options if o.group_size <= g), key=lambda o: o.group_size,
                              default=max(p.options, key=lambda o: o.group_size)) for p in profiles}
        if sum(o.cost for o in choice.values()) <= limit:
            best = choice
            break
    if best is None:
        return None
    spent = sum(o.cost for o in best.values())
    by_name = {p.name: p for p in profiles}
    while True:  # spend what is left on the upgrade with the most score saved per bit
        move, move_gain = None, 0.0
        for name, cur in best.items():
            p = by_name[name]
            for o in p.options:
                extra = o.cost - cur.cost
                saved = p.score(cur) - p.score(o)
                if extra > 0 and saved > 0 and spent + extra <= limit and saved / extra > move_gain:
                    move, move_gain = (name, o), saved / extra
        if move is None:
            return best
        spent += move[1].cost - best[move[0]].cost
        best[move[0]] = move[1]


def allocate(profiles: list[MatrixProfile], budget: float) -> dict[str, Option]:
    """{matrix name: chosen option} minimising the total score with average bits per weight <= budget.

    Two candidates, the one with the lower total score wins: the Lagrangian greedy over all options, and the finest
    uniform group size that fits with the leftover bits spent greedily. So the result is never worse, by the score,
    than one group size for every matrix.
    """
    total_weights = sum(p.numel for p in profiles)
    limit = budget * total_weights
    cheapest = sum(min(o.cost for o in p.options) for p in profiles)
    if cheapest > limit * (1 + 1e-12):
        raise PlanError(f"finequant: bits_budget {budget} is below the cheapest allocation"
                        f" ({cheapest / total_weights:.4f} bits per weight, every matrix at its coarsest candidate)")
    by_name = {p.name: p for p in profiles}

    def total(choice):
        return sum(by_name[n].score(o) for n, o in choice.items())

    greedy = _greedy(profiles, limit)
    uniform = _uniform(profiles, limit)
    if uniform is not None and total(uniform) <= total(greedy):
        return uniform
    return greedy


def allocation_bits(choice: dict[str, Option], profiles: list[MatrixProfile]) -> float:
    n = sum(p.numel for p in profiles)
    return sum(o.cost for o in choice.values()) / max(n, 1)


def local_choice(prof: MatrixProfile, budget: float) -> Option:
    """Without a view of the whole model: the least-error option whose own cost fits the budget."""
    fits = [o for o in prof.options if o.cost <= budget * prof.numel]
    if not fits:
        return max(prof.options, key=lambda o: o.group_size)
    return min(fits, key=lambda o: (o.error, o.cost))


def iter_model_weights(model: torch.nn.Module, cfg) -> Iterator[tuple[str, torch.Tensor]]:
    """(weight name, weight) of the modules a FineQuant config targets in a live model (the ones it will quantize)."""
    from ..compress.inventory import inventory_from_model, select

    named = dict(model.named_modules())
    chosen, skipped = select(inventory_from_model(model), cfg.targets, cfg.ignore, f"{cfg.type}")
    for info in chosen:
        if info.name in skipped or info.shape is None or len(info.shape) != 2:
            continue
        w = named[info.name].weight
        if w.dtype.is_floating_point:
            yield info.weight, w.detach()
