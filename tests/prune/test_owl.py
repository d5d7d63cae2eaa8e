"""block_sparse `allocation: owl`: per-layer sparsities from activation outliers at the same average sparsity."""

import copy

import pytest
import torch

from bitsmith.compress.errors import RecipeError
from bitsmith.kernels import bsr
from bitsmith.prune import owl
from bitsmith.prune import scores as S
from bitsmith.prune.block_sparse import BlockSparse, prune_model, targeted_linears
from tests.prune.test_block_sparse import recipe
from tests.prune.test_sequential import three_layers  # noqa: F401 (fixture)


def test_layer_of():
    assert owl.layer_of("model.layers.12.mlp.up_proj", "model.layers") == "model.layers.12"
    assert owl.layer_of("lm_head", "model.layers") is None
    assert owl.layer_of("model.layers_extra.1.x", "model.layers") is None


def test_outlier_ratio_counts_large_importances():
    w = torch.ones(4, 8)
    w[0, 0] = 100.0  # one outlier among 32 weights of layer a
    norms = {"a": torch.ones(8), "b": torch.ones(8)}
    r = owl.outlier_ratios({"a": w, "b": torch.ones(4, 8)}, norms, {"a": "A", "b": "B"}, m=5.0)
    assert r == {"A": pytest.approx(1 / 32), "B": 0.0}
    # the input norms weigh the columns: a large norm makes a column's weights outliers
    n2 = torch.ones(8)
    n2[3] = 1000.0
    r2 = owl.outlier_ratios({"b": torch.ones(4, 8)}, {"b": n2}, {"b": "B"}, m=5.0)
    assert r2["B"] == pytest.approx(4 / 32)


def test_layer_sparsities_order_span_and_weighted_mean():
    ratios = {"L0": 0.02, "L1": 0.01, "L2": 0.0, "L3": 0.005}
    sizes = {"L0": 100, "L1": 100, "L2": 300, "L3": 100}
    sp = owl.layer_sparsities(ratios, sizes, 0.5, 0.1)
    assert sp["L0"] < sp["L1"] < sp["L3"] < sp["L2"]  # more outliers, less pruning
    assert sp["L2"] - sp["L0"] == pytest.approx(0.2)  # the span is 2 lambda
    mean = sum(sp[g] * sizes[g] for g in sp) / sum(sizes.values())
    assert mean == pytest.approx(0.5)
    same = owl.layer_sparsities({"a": 0.1, "b": 0.1}, {"a": 1, "b": 1}, 0.4, 0.1)
    assert same == {"a": pytest.approx(0.4), "b": pytest.approx(0.4)}


@pytest.mark.parametrize("scope", ["row", "layer"])
def test_quantize_is_reachable_and_keeps_the_total(scope):
    shapes = {f"m{i}": (48, 80) for i in range(7)}  # 16x16 blocks: 3 block rows of 5 blocks
    targets = {n: 0.5 + 0.07 * (i - 3) for i, n in enumerate(shapes)}
    q = owl.quantize(targets, shapes, (16, 16), scope)
    units = 5 if scope == "row" else 15
    for n, s in q.items():
        assert s * units == pytest.approx(round(s * units))  # a whole number of blocks (per row)
        assert 0.0 <= s < 1.0
    want = sum(targets[n] * 48 * 80 for n in shapes)
    got = sum(q[n] * 48 * 80 for n in shapes)
    quantum = 48 * 16 if scope == "row" else 256
    assert abs(got - want) <= quantum / 2 + 1e-6
    # allocate reaches exactly these sparsities
    masks = S.allocate({n: torch.rand(3, 5) for n in shapes}, q, scope)
    for n in shapes:
        assert S.sparsity_of(masks[n]) == pytest.approx(q[n])


def test_quantize_never_empties_a_row():
    q = owl.quantize({"a": 0.99}, {"a": (16, 64)}, (16, 16), "row")
    assert q["a"] == pytest.approx(0.75)


def test_allocate_refuses_per_matrix_sparsity_with_global_scope():
    with pytest.raises(ValueError, match="one sparsity"):
        S.allocate({"a": torch.rand(2, 2)}, {"a": 0.5}, "global")


def _cfg(calib_text, **kw):
    kw = {"sparsity": 0.5, "block": (4, 4), "score": "activation", "refit": True, "text": str(calib_text),
          "samples": 8, "seq_len": 64, "scope": "row", "allocation": "owl", "owl_lambda": 0.2, "owl_m": 3.0, **kw}
    return BlockSparse(**kw)


@pytest.mark.parametrize("sequential", [True, False])
def test_owl_prunes_layers_unevenly_at_the_same_average(three_layers, calib_text, sequential):  # noqa: F811
    _, dense, tok = three_layers
    model = copy.deepcopy(dense)
    cfg = _cfg(calib_text, sequential=sequential)
    report = prune_model(model, cfg, tokenizer=tok)
    layers = report["owl"]["layers"]
    assert sorted(layers) == ["model.layers.0", "model.layers.1", "model.layers.2"]
    sp = {g: v["sparsity"] for g, v in layers.items()}
    ratio = {g: v["outlier_ratio"] for g, v in layers.items()}
    assert max(sp.values()) - min(sp.values()) == pytest.approx(0.4, abs=1e-3)  # 2 lambda
    most = max(ratio, key=ratio.get)
    assert sp[most] == min(sp.values())
    mods = targeted_linears(model, cfg, "test")
    total = sum(m.weight.numel() for m in mods.values())
    zeroed = 0
    per_layer: dict = {}
    for n, m in mods.items():
        keep = bsr.block_mask(m.weight, (4, 4))
        assert keep.any(dim=1).all(), n  # no block row emptied
        s = 1.0 - keep.float().mean().item()
        assert report["modules"][n]["sparsity"] == pytest.approx(s, abs=1e-4)
        zeroed += s * m.weight.numel()
        g = owl.layer_of(n, "model.layers")
        per_layer.setdefault(g, []).append((s, m.weight.numel()))
    achieved = zeroed / total
    assert report["sparsity"] == pytest.approx(achieved)
    assert abs(achieved - 0.5) < 0.01  # within a block row of the target
    mean = {g: sum(s * k for s, k in v) / sum(k for _, k in v) for g, v in per_layer.items()}
    assert mean[most] < 0.45 and max(mean.values()) > 0.55


def test_owl_options_are_validated():
    with pytest.raises(RecipeError, match="needs score: activation"):
        recipe("{type: block_sparse, allocation: owl, score: magnitude, refit: true}")
    with pytest.raises(RecipeError, match="scope global"):
        recipe("{type: block_sparse, allocation: owl, scope: global}")
    with pytest.raises(RecipeError, match="inside"):
        recipe("{type: block_sparse, allocation: owl, sparsity: 0.9, owl_lambda: 0.2}")
    with pytest.raises(RecipeError, match="owl_lambda"):
        recipe("{type: block_sparse, allocation: owl, owl_lambda: 0.6}")
    with pytest.raises(RecipeError, match="allocation"):
        recipe("{type: block_sparse, allocation: outliers}")
    recipe("{type: block_sparse, allocation: owl, scope: row, sequential: true, refit: true}")
