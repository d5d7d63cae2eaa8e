"""BCQ: greedy start + alternating least squares, offsets, partial groups, the pass end to end."""

import json

import pytest
import torch

import bitsmith
from bitsmith.compress.recipe import parse_recipe
from bitsmith.kernels import bitplane
from bitsmith.quant.bcq import BCQ, quantize_bcq
from bitsmith.quant.bipolar import quantize_bipolar


def _deq(codes, alphas, off, g, K):
    bits = alphas.shape[0]
    return bitplane.dequantize(bitplane.pack_planes(codes, bits), alphas, off, "bcq", g, K, torch.float32)


def _group_err(w, deq, g):
    N, K = w.shape
    pad = (-K) % g
    d = torch.nn.functional.pad(deq - w, (0, pad))
    return (d ** 2).view(N, -1, g).sum(-1)


def test_one_plane_is_the_sign_and_mean_abs():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    codes, alphas, off = quantize_bcq(w, 1, 32, iters=5, coef_dtype=torch.float32)
    assert off is None and alphas.shape == (1, 2, 8)
    assert torch.equal(codes.bool(), w >= 0)
    assert torch.allclose(alphas[0].t(), w.abs().view(8, 2, 32).mean(-1), rtol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_als_never_worse_than_its_start_and_beats_bipolar(bits):
    torch.manual_seed(bits)
    w = torch.randn(32, 200) * 0.02  # 200 = 3 groups of 64 + a partial one of 8

    def err(**kw):
        return _group_err(w, _deq(*quantize_bcq(w, bits, 64, coef_dtype=torch.float32, **kw), 64, 200), 64)

    greedy, als = err(iters=0, init="greedy"), err(iters=10, init="greedy")
    assert torch.all(als <= greedy * (1 + 1e-5))
    assert als.sum() < 0.95 * greedy.sum()
    codes, scales = quantize_bipolar(w, bits, 64, True, torch.float32)
    bip = _group_err(w, bitplane.dequantize(bitplane.pack_planes(codes, bits), scales, None, "bipolar", 64, 200,
                                            torch.float32), 64)
    both = err(iters=10, init="both")
    assert torch.all(both <= torch.minimum(als, bip) * (1 + 1e-5))  # never worse than either start's fit
    assert both.sum() < 0.99 * bip.sum()  # free alphas fit better than alpha_i = 2^i s


def test_recovers_an_exact_binary_code():
    torch.manual_seed(1)
    N, K, bits = 16, 128, 2
    d = torch.randint(0, 2, (bits, N, K)).float() * 2 - 1
    a = torch.tensor([0.7, 0.2]).view(bits, 1, 1) * (1 + torch.rand(1, N, 1))
    w = (a * d).sum(0)
    codes, alphas, _ = quantize_bcq(w, bits, 128, iters=10, coef_dtype=torch.float32)
    assert torch.allclose(_deq(codes, alphas, None, 128, K), w, atol=1e-5)


def test_offset_absorbs_a_shift_and_rounding_fits_the_stored_dtype():
    torch.manual_seed(2)
    w = torch.randn(16, 128) * 0.02
    shift = 0.05
    e0 = (_deq(*quantize_bcq(w, 2, 64, iters=10, offset=True, coef_dtype=torch.float32), 64, 128) - w).norm()
    codes, alphas, off = quantize_bcq(w + shift, 2, 64, iters=10, offset=True, coef_dtype=torch.float32)
    assert off.shape == (2, 16) and torch.allclose(off, torch.full_like(off, shift), atol=0.02)
    assert (_deq(codes, alphas, off, 64, 128) - (w + shift)).norm() == pytest.approx(float(e0), rel=0.05)
    # with fp16 coefficients the codes are re-assigned for the rounded values: never worse than keeping old codes
    codes, alphas, off = quantize_bcq(w, 3, 64, iters=5, coef_dtype=torch.float16)
    assert alphas.dtype == torch.float16
    assert torch.isfinite(_deq(codes, alphas, off, 64, 128)).all()


def test_pass_packs_bcq_with_offset(tiny_llama, tmp_path):
    recipe = parse_recipe("""
version: 1
passes:
  - type: bcq
    bits: {default: 2, "re:model\\\\.layers\\\\.0\\\\..*": 3}
    group_size: 32
    offset: true
    iters: 3
""", "bcq.yaml")
    out = tmp_path / "out"
    bitsmith.compress(recipe, tiny_llama, out, progress=False)
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert modules["model.layers.0.mlp.up_proj"]["bits"] == 3 and modules["model.layers.1.mlp.up_proj"]["bits"] == 2
    assert all(m["kind"] == "bcq" and m["offset"] for m in modules.values())
    model = bitsmith.load(out)
    mod = model.model.layers[0].mlp.up_proj
    assert mod.alphas.shape == (3, 2, 96) and mod.offset.shape == (2, 96)
    assert torch.isfinite(model(torch.randint(0, 128, (1, 8))).logits).all()


def test_apply_facts_and_config_validation():
    from transformers import LlamaConfig, LlamaForCausalLM

    from bitsmith.compress.passes import TensorState
    from bitsmith.quant.bcq import apply_bcq

    torch.manual_seed(0)
    w = torch.randn(48, 64).to(torch.bfloat16)
    state = apply_bcq(BCQ(bits=3, group_size=32, iters=4), TensorState("x.weight", w, "x", "Linear"))
    facts = state.facts["bcq"]
    assert facts["bits"] == 3 and facts["group_size"] == 32 and 0 < facts["rel_error"] < 0.3
    assert facts["bits_per_weight"] == pytest.approx(3 + 3 * 16 / 32)
    assert state.packed.tensors["alphas"].dtype == torch.bfloat16 and state.tensor.dtype == torch.bfloat16
    with pytest.raises(ValueError):
        BCQ(iters=-1)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    model = bitsmith.apply(LlamaForCausalLM(cfg), [BCQ(bits=2, group_size=64, iters=2)])
    assert model.model.layers[0].mlp.down_proj.params["kind"] == "bcq"
