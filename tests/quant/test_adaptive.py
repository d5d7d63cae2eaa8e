"""`scale_divisor: auto` (each group's scale rule by least |error|^4) and the default candidates of `group_size: auto`:
the choice is never worse than any single rule, what is stored is what was measured, outliers are not clipped away,
no default allocation goes coarser than 128, and budgets hold. Tiny shapes (M = 1 rows, odd K, partial groups)."""

from __future__ import annotations

import pytest
import torch

from bitsmith.compress.errors import PlanError, RecipeError
from bitsmith.compress.passes import TensorState
from bitsmith.compress.recipe import parse_recipe
from bitsmith.kernels import gwint
from bitsmith.quant import adaptive
from bitsmith.quant.clipping import BASE_DIVISOR, RULE_POWER, group_errors, rule_search, search_clip
from bitsmith.quant.finequant import FineQuant, apply_finequant, quantize_matrix
from bitsmith.quant.groupwise import pad_to_groups, storage_bits


def _weight(N, K, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    w[:, torch.randperm(K, generator=g)[: max(1, K // 16)]] *= 10  # heavy-tailed columns
    return w.to(dtype)


def _rule_errors(w, bits, g, symmetric):
    """|error|^RULE_POWER per group [N, G] of each single rule, computed independently of rule_search."""
    wg, _ = pad_to_groups(w.float(), g)
    out = {}
    for divisor in ("pow2_minus_1", "pow2") if symmetric else ("pow2_minus_1",):
        out[divisor, "rtn"] = group_errors(wg, bits, symmetric, divisor, torch.bfloat16, None)[1]
        clip = search_clip(w, bits, g, symmetric, divisor, torch.bfloat16)[0]
        out[divisor, "clip"] = group_errors(wg, bits, symmetric, divisor, torch.bfloat16, clip)[1]
    return out


@pytest.mark.parametrize("N,K,g,bits,symmetric", [(1, 100, 32, 4, True), (7, 77, 16, 3, True), (5, 130, 64, 4, False),
                                                  (3, 50, 50, 2, True), (4, 96, 32, 8, True)])
def test_rule_search_is_never_worse_than_any_single_rule(N, K, g, bits, symmetric):
    w = _weight(N, K, seed=N + K)
    clip, e2, ep = rule_search(w, bits, g, symmetric, torch.bfloat16)
    G = -(-K // g)
    assert clip.shape == e2.shape == ep.shape == (N, G)
    assert bool(((clip > 0) & (clip <= 1)).all())
    for name, err in _rule_errors(w, bits, g, symmetric).items():
        # the chosen rule's error is recomputed under the base divisor: equal up to float rounding of the scale
        assert bool((ep <= err * (1 + 1e-4) + 1e-30).all()), name
    wg, _ = pad_to_groups(w.float(), g)
    again = group_errors(wg, bits, symmetric, BASE_DIVISOR, torch.bfloat16, clip)
    assert torch.equal(again[0], e2) and torch.equal(again[1], ep)  # the errors returned are the chosen clip's


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, True), (3, 48, True), (4, 64, False),
                                                       (4, "channel", True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scale_divisor_auto_round_trip_through_gwint(bits, group_size, symmetric, dtype):
    w = _weight(9, 100, seed=bits, dtype=dtype)  # K = 100: partial last groups
    cfg = FineQuant(bits=bits, group_size=group_size, symmetric=symmetric, scale_divisor="auto")
    state = apply_finequant(cfg, TensorState("m.weight", w.clone(), "m", "Linear"))
    t, p = state.packed.tensors, state.packed.params
    back = gwint.dequantize(t["qweight"], t["scales"], t.get("zeros"), bits, p["group_size"], 100, dtype=dtype)
    assert torch.equal(back, state.tensor)  # the model computes with exactly what is stored
    g = p["group_size"]
    _, e2, ep = rule_search(w, bits, g, symmetric, dtype)
    exact = gwint.dequantize(t["qweight"], t["scales"], t.get("zeros"), bits, g, 100, dtype=torch.float32)
    err = exact - w.float()  # what was measured is what was stored
    assert float(err.square().sum()) == pytest.approx(float(e2.sum()), rel=1e-4)
    assert float(err.abs().pow(RULE_POWER).sum()) == pytest.approx(float(ep.sum()), rel=1e-4)


def test_scale_divisor_auto_keeps_an_outlier_that_the_squared_error_clips():
    # one group of 64: a Gaussian bulk and one large weight. The squared-error search clips the large weight by 15%
    # (the bulk gets a finer grid, and the squared error falls); the fourth-power error keeps it exact.
    w = torch.randn(1, 64, generator=torch.Generator().manual_seed(0)) * 0.03
    w[0, 5] = 0.2
    assert float(search_clip(w, 4, 64, True, "pow2_minus_1", torch.float32)[0]) < 0.9
    d_auto = quantize_matrix(w, FineQuant(bits=4, group_size=64, scale_divisor="auto", scale_dtype="float32"), 64)[3]
    d_clip = quantize_matrix(w, FineQuant(bits=4, group_size=64, clip_search=True, scale_dtype="float32"), 64)[3]
    half_step = 0.2 / 7 / 2
    assert abs(float(d_auto[0, 5]) - 0.2) < 1e-6
    assert abs(float(d_clip[0, 5]) - 0.2) > half_step
    assert float((d_clip - w).square().sum()) < float((d_auto - w).square().sum())  # by squared error clip wins


def _profiles(candidates=adaptive.DEFAULT_CANDIDATES, divisor="auto"):
    mats = [("smooth", torch.randn(32, 128, generator=torch.Generator().manual_seed(1)) * 0.02),
            ("spiky", _weight(32, 128, seed=2).float()), ("wide", _weight(16, 600, seed=3).float()),
            ("row", _weight(1, 77, seed=4).float())]
    mats[1][1][::3, ::7] *= 20
    return [adaptive.profile_matrix(n, w.to(torch.bfloat16), bits=4, symmetric=True, scale_divisor=divisor,
                                    scale_dtype=torch.bfloat16, clip_search=False, candidates=candidates)
            for n, w in mats]


def test_default_candidates_never_go_coarser_than_128_and_budgets_hold():
    profiles = _profiles()
    assert all(o.group_size <= 128 for p in profiles for o in p.options)
    lo, hi = adaptive.budget_range([p.shape for p in profiles], 4, True, 16)
    assert lo == pytest.approx(sum(storage_bits(*p.shape, 4, min(128, p.shape[1]), True) for p in profiles)
                               / sum(p.numel for p in profiles))
    for budget in [lo + (hi - lo) * i / 8 for i in range(9)]:
        choice = adaptive.allocate(profiles, budget)
        assert adaptive.allocation_bits(choice, profiles) <= budget + 1e-12
        assert all(o.group_size <= 128 for o in choice.values())
    # at the cheapest budget every matrix has its coarsest default size: nothing can be paid for
    assert {n: o.group_size for n, o in adaptive.allocate(profiles, lo).items()} == {
        "smooth": 128, "spiky": 128, "wide": 128, "row": 77}
    with pytest.raises(PlanError, match="coarsest candidate"):
        adaptive.allocate(profiles, lo - 0.01)


def test_listed_coarse_candidates_are_still_allowed():
    profiles = _profiles(candidates=adaptive.ALL_CANDIDATES, divisor="pow2_minus_1")
    lo, _ = adaptive.budget_range([p.shape for p in profiles], 4, True, 16, adaptive.ALL_CANDIDATES)
    assert {o.group_size for o in adaptive.allocate(profiles, lo).values()} == {128, 600, 77}  # per channel


@pytest.mark.parametrize("body,message", [
    ("    scale_divisor: auto\n    clip_search: true\n", "leave clip_search unset"),
    ("    scale_divisor: auto\n    rounding: gptq\n", "scale_divisor auto needs rounding: nearest"),
])
def test_scale_divisor_auto_bad_keys(body, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe("version: 1\npasses:\n  - type: finequant\n" + body)


def test_profiles_and_allocations_are_deterministic_and_independent_of_order():
    a, b = _profiles(), _profiles()
    assert [p.options for p in a] == [p.options for p in b]  # the same weights profile the same, bit for bit
    lo, hi = adaptive.budget_range([p.shape for p in a], 4, True, 16)
    for budget in [lo + (hi - lo) * i / 6 for i in range(7)]:
        first = {n: o.group_size for n, o in adaptive.allocate(a, budget).items()}
        again = {n: o.group_size for n, o in adaptive.allocate(list(reversed(b)), budget).items()}
        assert first == again


def test_listed_non_power_of_two_candidates_keep_the_budget():
    cands = (16, 24, 32, 48, 64, 96, 128)  # gwint takes any group size; these were tried as candidates
    profiles = _profiles(candidates=cands)
    lo, hi = adaptive.budget_range([p.shape for p in profiles], 4, True, 16, cands)
    for budget in [lo + (hi - lo) * i / 10 for i in range(11)]:
        choice = adaptive.allocate(profiles, budget)
        assert adaptive.allocation_bits(choice, profiles) <= budget + 1e-12
        for p in profiles:
            assert choice[p.name].group_size in adaptive.effective_sizes(cands, p.shape[1])
