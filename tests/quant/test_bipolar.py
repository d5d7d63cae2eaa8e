"""bipolar-INT: levels, scale search, partial groups, per-layer bits (bits_spec), the pass end to end."""

import json

import pytest
import torch

import bitsmith
from bitsmith.compress.errors import PlanError, RecipeError
from bitsmith.compress.recipe import load_recipe, parse_recipe
from bitsmith.kernels import bitplane
from bitsmith.kernels.modules import PackedLinear
from bitsmith.quant import bits_spec
from bitsmith.quant.bipolar import Bipolar, column_importance, quantize_bipolar


def _deq(codes, scales, bits, g, K):
    return bitplane.dequantize(bitplane.pack_planes(codes, bits), scales, None, "bipolar", g, K, torch.float32)


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_levels_are_the_odd_integers(bits):
    torch.manual_seed(bits)
    w = torch.randn(16, 96)
    codes, scales = quantize_bipolar(w, bits, 32, scale_search=False, scale_dtype=torch.float32)
    assert codes.max() <= 2 ** bits - 1
    s = scales.t().repeat_interleave(32, dim=1)  # [N, K]
    q = _deq(codes, scales, bits, 32, 96) / s
    assert torch.allclose(q, 2 * codes.float() - (2 ** bits - 1))
    assert torch.all(q.round().remainder(2) == 1)  # odd, never zero
    # naive rule: s = max|w| / (2^b - 1), so the largest weight of each group is a level exactly
    amax = w.abs().view(16, 3, 32).amax(-1)
    assert torch.allclose(scales.t(), amax / (2 ** bits - 1))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_scale_search_is_never_worse(bits):
    torch.manual_seed(10 + bits)
    w = torch.randn(32, 256) * 0.02
    w[:, ::37] *= 8  # outliers make max-scaling coarse
    errs = []
    for search in (False, True):
        codes, scales = quantize_bipolar(w, bits, 64, search, torch.float32)
        errs.append(((_deq(codes, scales, bits, 64, 256) - w) ** 2).view(32, 4, 64).sum(-1))
    assert torch.all(errs[1] <= errs[0] * (1 + 1e-5))
    assert errs[1].sum() < 0.9 * errs[0].sum()


def test_error_falls_with_bits():
    torch.manual_seed(0)
    w = torch.randn(24, 128)
    errs = [float((_deq(*quantize_bipolar(w, b, 128), b, 128, 128) - w).norm()) for b in range(1, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:]))


def test_column_importance_weights_the_search():
    torch.manual_seed(3)
    w = torch.randn(64, 128) * 0.05
    w[:, :8] *= 0.05  # small columns: where trained models put their large-activation channels
    h = column_importance(w)
    assert h.mean().item() == pytest.approx(1.0) and h[:8].min() > 100 * h[8:].max()
    err = {}
    for name, cw in (("plain", None), ("columns", h)):
        codes, scales = quantize_bipolar(w, 3, 64, True, torch.float32, cw)
        err[name] = ((_deq(codes, scales, 3, 64, 128) - w) ** 2 * h).sum().item()
    assert err["columns"] < err["plain"]  # it minimises the weighted error it is given


def test_partial_last_group_uses_only_its_weights():
    w = torch.full((2, 200), 0.01)
    w[:, 192:] = 1.0  # the last group (8 real weights, 56 padding) is all ones
    codes, scales = quantize_bipolar(w, 2, 64, scale_search=True, scale_dtype=torch.float32)
    assert scales.shape == (4, 2)
    deq = _deq(codes, scales, 2, 64, 200)
    assert torch.allclose(deq[:, 192:], torch.ones(2, 8), rtol=1e-4)  # padding did not pull the scale down
    assert torch.allclose(deq[:, :192], w[:, :192], rtol=1e-3)


# ---------------------------------------------------------------------------------------------------- bits_spec

class _M:
    def __init__(self, name, cls="Linear", shape=(4, 8)):
        self.name, self.class_names, self.shape = name, (cls, "Module"), shape


def test_bits_spec_first_match_and_average():
    spec = bits_spec.validate_bits({"default": 3, "re:.*\\.0\\..*": 8, "down_proj": 4, "Conv": 2}, range(1, 9))
    mods = [_M("l.0.down_proj"), _M("l.1.down_proj"), _M("l.1.up_proj", shape=(8, 8)), _M("c", "Conv")]
    assert bits_spec.bits_by_module(spec, mods) == {"l.0.down_proj": 8, "l.1.down_proj": 4, "l.1.up_proj": 3,
                                                    "c": 2}
    assert bits_spec.average_bits(spec, mods) == pytest.approx((8 * 32 + 4 * 32 + 3 * 64 + 2 * 32) / 160)
    assert bits_spec.bits_for(5, "anything") == 5
    bits_spec.check_patterns(spec, mods)
    with pytest.raises(PlanError, match=r"'re:nothing' match none"):
        bits_spec.check_patterns({"default": 3, "re:nothing": 4}, mods)


@pytest.mark.parametrize("bad,msg", [
    ("bits: 0", "integer in 1..8"), ("bits: 9", "integer in 1..8"), ("bits: 3.5", "integer in 1..8"),
    ("bits: {v_proj: 4}", "needs a 'default'"), ("bits: {default: 3, 're:(': 4}", "bad regular expression"),
    ("bits: {default: 3, down_proj: 12}", r"bits\['down_proj'\]"), ("group_size: 48", "multiple of 32"),
    ("group_size: 16", "multiple of 32"), ("scale_serch: true", "did you mean 'scale_search'"),
])
def test_recipe_errors_name_the_line(bad, msg):
    with pytest.raises(RecipeError, match=rf"r.yaml:4: .*{msg}"):
        parse_recipe(f"version: 1\npasses:\n  - type: bipolar\n    {bad}\n", "r.yaml")


def test_bundled_recipes_parse():
    for name, bits in (("bipolar-w4", 4), ("bipolar-w3", 3), ("bipolar-w2", 2), ("bcq-w3", 3)):
        p = load_recipe(name).passes[0]
        assert p.bits == bits and p.group_size == 128
    mixed = load_recipe("bipolar-w3-mixed").passes[0]
    assert mixed.bits == {"default": 3, "v_proj": 4, "k_proj": 2}


# ---------------------------------------------------------------------------------------------------- the pass

def test_compress_mixed_bits_end_to_end(tiny_llama, tmp_path):
    recipe = parse_recipe("""
version: 1
passes:
  - type: bipolar
    bits: {default: 3, "re:.*down_proj": 4, v_proj: 2}
    group_size: 32
""", "mixed.yaml")
    out = tmp_path / "out"
    bitsmith.compress(recipe, tiny_llama, out, progress=False)
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert modules["model.layers.1.mlp.down_proj"]["bits"] == 4
    assert modules["model.layers.0.self_attn.v_proj"]["bits"] == 2
    assert modules["model.layers.0.self_attn.q_proj"] | {"bits": 0} == {
        "format": "bitplane", "format_version": 1, "in_features": 64, "out_features": 64, "bits": 0,
        "group_size": 32, "kind": "bipolar", "offset": False}
    assert modules["model.layers.0.self_attn.q_proj"]["bits"] == 3
    assert "lm_head" not in modules
    model = bitsmith.load(out)
    mod = model.model.layers[1].mlp.down_proj
    assert isinstance(mod, PackedLinear) and mod.params["bits"] == 4
    x = torch.randint(0, 128, (1, 10))
    assert torch.isfinite(model(x).logits).all()


def test_apply_matches_the_fake_quantized_weight():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    model = LlamaForCausalLM(cfg)
    w = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    bitsmith.apply(model, [Bipolar(bits=2, group_size=32)])
    mod = model.model.layers[0].mlp.up_proj
    assert isinstance(mod, PackedLinear)
    codes, scales = quantize_bipolar(w, 2, 32, True, torch.float16, column_importance(w))
    want = bitplane.dequantize(bitplane.pack_planes(codes, 2), scales, None, "bipolar", 32, 64, torch.float32)
    assert torch.equal(mod.dequantized_weight().float(), want)  # buffers take the model's dtype: fp16 -> fp32 exact


def test_plan_rejects_dead_bits_keys(tiny_llama, tmp_path):
    recipe = parse_recipe("version: 1\npasses:\n  - type: bipolar\n    bits: {default: 3, lm_head: 8}\n", "r.yaml")
    with pytest.raises(PlanError, match=r"bits keys 'lm_head' match none of the 14 modules"):
        bitsmith.compress(recipe, tiny_llama, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
