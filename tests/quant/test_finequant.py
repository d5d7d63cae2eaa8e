"""FineQuant: the group-wise grid (partial groups, per channel, asymmetric, both scale conventions), exact round trips
through gwint, the clipping search, the adaptive allocation, and user errors. Tiny shapes, built in the test."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bitsmith.api import apply, compress
from bitsmith.compress.errors import PlanError, RecipeError
from bitsmith.compress.passes import TensorState
from bitsmith.compress.recipe import parse_recipe
from bitsmith.kernels import gwint
from bitsmith.quant import adaptive
from bitsmith.quant.clipping import search_clip
from bitsmith.quant.finequant import FineQuant, apply_finequant
from bitsmith.quant.groupwise import dequantize_codes, quantize_groupwise, storage_bits
from tests.conftest import make_tiny_llama


def _weight(N, K, seed=0, dtype=torch.bfloat16, outliers=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    if outliers:  # heavy-tailed columns, like real LLM weights
        w[:, torch.randperm(K, generator=g)[: max(1, K // 16)]] *= 10
    return w.to(dtype)


def _quant(w, **kw):
    cfg = FineQuant(**kw)
    return apply_finequant(cfg, TensorState("m.weight", w.clone(), "m", "Linear"))


def _recipe(body: str):
    return parse_recipe("version: 1\npasses:\n  - type: finequant\n" + body)


# --- the grid -----------------------------------------------------------------------------------------------------

def test_partial_last_group_is_its_own_group():
    w = _weight(6, 80)  # g32: groups of 32, 32 and a partial 16
    codes, scales, zeros = quantize_groupwise(w, 4, 32, True, "pow2_minus_1", torch.bfloat16)
    assert zeros is None and scales.shape == (3, 6) and codes.shape == (6, 80)
    deq = dequantize_codes(codes, scales, None, 4, 32)
    for j, (lo, hi) in enumerate(((0, 32), (32, 64), (64, 80))):
        c, s, _ = quantize_groupwise(w[:, lo:hi], 4, hi - lo, True, "pow2_minus_1", torch.bfloat16)
        assert torch.equal(s[0], scales[j])  # the partial group's scale comes from its 16 weights only
        assert torch.equal(dequantize_codes(c, s, None, 4, hi - lo), deq[:, lo:hi])


def test_per_channel_has_one_scale_per_row():
    w = _weight(8, 72)
    state = _quant(w, bits=8, group_size="channel", clip_search=False)
    assert state.packed.params["group_size"] == 72
    assert state.packed.tensors["scales"].shape == (1, 8)
    assert state.packed.tensors["scales"].dtype == torch.bfloat16  # scales follow the model's dtype
    expected = w.float().abs().amax(dim=1) / 127
    assert torch.allclose(state.packed.tensors["scales"][0].float(), expected, rtol=1e-2)


def test_group_larger_than_width_is_per_channel():
    state = _quant(_weight(4, 48), bits=4, group_size=128)
    assert state.packed.params["group_size"] == 48 and state.packed.tensors["scales"].shape == (1, 4)


@pytest.mark.parametrize("divisor,levels", [("pow2", 8), ("pow2_minus_1", 7)])
def test_scale_divisors(divisor, levels):
    w = _weight(5, 64, dtype=torch.float32)
    codes, scales, _ = quantize_groupwise(w, 4, 64, True, divisor, torch.float32)
    amax = w.abs().amax(dim=1)
    assert torch.allclose(scales[0], amax / levels)
    q = codes.to(torch.int32) - 8
    assert q.min() >= -8 and q.max() <= 7
    if divisor == "pow2":  # the most negative weight reaches code -8; the positive max clips to 7
        assert (q == -8).any() or (q == 7).any()
    else:  # -8 is never used, and round-to-nearest stays within half a step everywhere
        assert q.min() >= -7
        deq = dequantize_codes(codes, scales, None, 4, 64)
        assert ((deq - w).abs() <= scales[0][:, None] / 2 + 1e-7).all()


def test_asymmetric_zero_points():
    w = _weight(6, 96, dtype=torch.float32) + 0.01  # shifted: asymmetric ranges
    codes, scales, zeros = quantize_groupwise(w, 3, 32, False, "pow2_minus_1", torch.float32)
    assert zeros is not None and zeros.shape == (3, 6) and zeros.dtype == torch.uint8
    assert codes.max() <= 7
    deq = dequantize_codes(codes, scales, zeros, 3, 32)
    step = scales.t().repeat_interleave(32, dim=1)  # [N, K]
    assert ((deq - w).abs() <= step / 2 + 1e-7).all()
    sym = dequantize_codes(*quantize_groupwise(w, 3, 32, True, "pow2_minus_1", torch.float32), 3, 32)
    assert (deq - w).square().sum() < (sym - w).square().sum()  # zero points pay off on shifted weights


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, "channel", True), (4, 32, True), (4, 48, False),
                                                       (3, 64, True), (3, 32, False), (2, 16, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_trip_through_gwint_is_exact(bits, group_size, symmetric, dtype):
    w = _weight(12, 100, seed=bits, dtype=dtype)  # K = 100: a partial last group for every size here
    state = _quant(w, bits=bits, group_size=group_size, symmetric=symmetric)
    t, p = state.packed.tensors, state.packed.params
    assert t["scales"].dtype == dtype and ("zeros" in t) == (not symmetric)
    back = gwint.dequantize(t["qweight"], t["scales"], t.get("zeros"), bits, p["group_size"], 100, dtype=dtype)
    assert torch.equal(back, state.tensor)  # the model computes with exactly what is stored
    assert state.facts["finequant"]["rel_error"] < {8: 0.03, 4: 0.2, 3: 0.35, 2: 0.7}[bits]


# --- clipping search --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,symmetric,divisor", [(4, True, "pow2_minus_1"), (4, True, "pow2"), (3, False, "pow2"),
                                                    (8, True, "pow2_minus_1"), (2, True, "pow2_minus_1")])
def test_clipping_never_increases_error(bits, symmetric, divisor):
    for seed in range(3):
        w = _weight(16, 200, seed=seed)
        for g in (32, 64, 200):
            clip, best, rtn = search_clip(w, bits, g, symmetric, divisor, torch.bfloat16)
            assert (best <= rtn).all() and ((clip > 0.49) & (clip <= 1)).all()
            # the error it reports is the error of what is stored
            c, s, z = quantize_groupwise(w, bits, g, symmetric, divisor, torch.bfloat16, clip)
            stored = (dequantize_codes(c, s, z, bits, g) - w.float()).square().sum()
            assert torch.isclose(stored, best.sum(), rtol=1e-4)
    assert best.sum() < rtn.sum()  # and on heavy-tailed weights it does find something


def test_clip_search_pass_beats_round_to_nearest():
    w = _weight(32, 128, seed=3)
    on = _quant(w, bits=4, group_size=64).facts["finequant"]["rel_error"]
    off = _quant(w, bits=4, group_size=64, clip_search=False).facts["finequant"]["rel_error"]
    assert on < off


# --- adaptive granularity -----------------------------------------------------------------------------------------

def _profiles():
    smooth = _weight(32, 128, seed=1, outliers=False)
    spiky = _weight(32, 128, seed=2)
    spiky[::3, ::7] *= 20  # scattered outliers: per-channel scales collapse, small groups rescue it
    wide = _weight(16, 200, seed=3)
    return [adaptive.profile_matrix(n, w, bits=4, symmetric=True, scale_divisor="pow2_minus_1",
                                    scale_dtype=torch.bfloat16, clip_search=True)
            for n, w in (("smooth", smooth), ("spiky", spiky), ("wide", wide))]


def test_allocation_respects_budget_and_spends_it_where_it_helps():
    profiles = _profiles()
    lo, hi = adaptive.budget_range([p.shape for p in profiles], 4, True, 16)
    previous = math.inf
    for budget in (lo, lo + 0.05, 4.2, 4.3, 4.5, 4.8, hi):
        choice = adaptive.allocate(profiles, budget)
        assert adaptive.allocation_bits(choice, profiles) <= budget + 1e-12
        total = sum(p.score(choice[p.name]) for p in profiles)
        assert total <= previous + 1e-15  # more bits never hurt
        previous = total
    assert all(o.group_size == 16 for o in adaptive.allocate(profiles, hi).values())
    mid = adaptive.allocate(profiles, 4.25)
    assert mid["spiky"].group_size < mid["smooth"].group_size


def test_allocation_budget_too_small():
    profiles = _profiles()
    with pytest.raises(PlanError, match="below the cheapest allocation"):
        adaptive.allocate(profiles, 4.01)


def test_storage_bits_counts_scales_and_zeros():
    assert storage_bits(10, 576, 4, 128, True) == 10 * (576 * 4 + 5 * 16)  # 5 groups, the last one partial
    assert storage_bits(10, 256, 4, 128, False) == 10 * (256 * 4 + 2 * 24)


def test_auto_in_a_recipe_fits_the_budget(tmp_path):
    model = make_tiny_llama(tmp_path / "tiny", hidden=80, intermediate=200)
    out = tmp_path / "out"
    recipe = _recipe("    bits: 4\n    group_size: auto\n    bits_budget: 4.3\n")
    compress(recipe, model, out, progress=False)
    mods = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    sizes = {e["group_size"] for e in mods.values()}
    assert len(sizes) > 1  # it did choose different sizes for different matrices
    bits = sum(storage_bits(e["out_features"], e["in_features"], 4, e["group_size"], True) for e in mods.values())
    weights = sum(e["out_features"] * e["in_features"] for e in mods.values())
    assert bits / weights <= 4.3
    # the same allocation as computed directly from the weights
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model)
    cfg = recipe.passes[0]
    direct = adaptive.allocate(
        [adaptive.profile_matrix(n, w, bits=4, symmetric=True, scale_divisor=cfg.scale_divisor,
                                 scale_dtype=w.dtype, clip_search=True)
         for n, w in adaptive.iter_model_weights(m, cfg)], 4.3)
    assert {n[: -len(".weight")]: o.group_size for n, o in direct.items()} == {k: e["group_size"]
                                                                               for k, e in mods.items()}


def test_auto_with_a_model_in_the_context(tmp_path):
    """A context carrying the model (extra["model"]) gets the whole-model allocation, computed once and cached."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path / "tiny", hidden=80, intermediate=200))
    cfg = FineQuant(bits=4, group_size="auto", bits_budget=4.3)
    ctx = SimpleNamespace(extra={"model": m}, progress=False, log=lambda msg: None)
    weights = dict(adaptive.iter_model_weights(m, cfg))
    states = [apply_finequant(cfg, TensorState(n, w.clone(), n[:-7], "Linear"), ctx) for n, w in weights.items()]
    bits = sum(storage_bits(*w.shape, 4, s.packed.params["group_size"], True) for s, w in zip(states, weights.values()))
    assert bits / sum(w.numel() for w in weights.values()) <= 4.3
    assert len({s.packed.params["group_size"] for s in states}) > 1
    assert len([k for k in ctx.extra if k != "model"]) == 1  # one cached allocation


def test_auto_on_an_in_memory_model(tmp_path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path / "tiny"))
    apply(m, [FineQuant(bits=4, group_size="auto", bits_budget=4.3)])
    layer = m.model.layers[0].mlp.down_proj
    assert type(layer).__name__ == "PackedLinear" and layer.params["group_size"] in (16, 32, 64, 96)
    with torch.no_grad():
        assert torch.isfinite(m(torch.randint(0, 128, (1, 8))).logits).all()


# --- user errors ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body,message", [
    ("    bits: 5\n", "bits"),
    ("    group_size: 8\n", "group_size must be >= 16"),
    ("    group_size: whole\n", "group_size"),
    ("    bits_budget: 4.5\n", "bits_budget needs group_size: auto"),
    ("    group_size: auto\n    bits_budget: 3.9\n", "bits_budget must be more than bits"),
    ("    group_size: auto\n    candidates: [8, 64]\n", "candidates must be group sizes >= 16"),
    ("    group_size: 64\n    candidates: [32, 64]\n", "candidates needs group_size: auto"),
    ("    bits: 4\n    clip: true\n", "unknown key"),
    ("    scale_divisor: 127\n", "scale_divisor"),
])
def test_bad_keys(body, message):
    with pytest.raises(RecipeError, match=message):
        _recipe(body)


def test_unreachable_budget_fails_at_plan_time(tmp_path):
    model = make_tiny_llama(tmp_path / "tiny")
    with pytest.raises(PlanError, match="below the cheapest allocation"):
        compress(_recipe("    group_size: auto\n    bits_budget: 4.05\n"), model, tmp_path / "o",
                          progress=False)
    assert not (tmp_path / "o").exists()


def test_allocation_never_scores_worse_than_one_group_size():
    profiles = _profiles()
    for g in (16, 32, 64, 128):
        uniform = {p.name: next(o for o in p.options if o.group_size == min(g, p.shape[1])) for p in profiles}
        budget = adaptive.allocation_bits(uniform, profiles)
        choice = adaptive.allocate(profiles, budget)
        assert adaptive.allocation_bits(choice, profiles) <= budget + 1e-12
        assert sum(p.score(choice[p.name]) for p in profiles) <= sum(p.score(uniform[p.name]) for p in profiles)


@pytest.mark.parametrize("name", ["finequant-w8", "finequant-w4", "finequant-w4-sda", "finequant-w3"])
def test_bundled_recipes_compress_a_tiny_model(name, tmp_path):
    from bitsmith.compress.recipe import load_recipe

    recipe = load_recipe(name)
    model = make_tiny_llama(tmp_path / "tiny", hidden=80, intermediate=200)
    compress(recipe, model, tmp_path / "out", progress=False)
    mods = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["modules"]
    cfg = recipe.passes[0]
    assert len(mods) == 14 and all(e["bits"] == cfg.bits for e in mods.values())
    bits = sum(storage_bits(e["out_features"], e["in_features"], cfg.bits, e["group_size"], True) for e in mods.values())
    weights = sum(e["out_features"] * e["in_features"] for e in mods.values())
    if cfg.group_size == "auto":
        assert bits / weights <= cfg.bits_budget
    else:  # a fixed size (the last group of a row may be partial) or one scale per row
        assert all(e["group_size"] == (e["in_features"] if cfg.group_size == "channel" else
                                       min(cfg.group_size, e["in_features"])) for e in mods.values())
