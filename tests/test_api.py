"""bitsmith.apply on an in-memory model: `rounding: gptq` (a packing model pass) leaves PackedLinear modules that
compute with the packed format, the same packed tensors as `compress` writes, on a tiny Llama with a byte tokenizer
and the bundled sample calibration text."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import bitsmith
from bitsmith.compress.errors import RecipeError
from bitsmith.compress.recipe import parse_recipe
from bitsmith.kernels.modules import PackedLinear
from bitsmith.quant.bcq import BCQ
from bitsmith.quant.bipolar import Bipolar
from bitsmith.quant.finequant import FineQuant
from bitsmith.quant.gptq import Calibration
from tests.prune.conftest import make_calibrated_llama

CAL = dict(samples=4, seq_len=32)  # text: None, the bundled sample
CASES = {
    "finequant": (FineQuant, dict(bits=4, group_size=32), "gwint"),
    "bipolar": (Bipolar, dict(bits=3, group_size=32), "bitplane"),
    "bcq": (BCQ, dict(bits=3, group_size=32, iters=3), "bitplane"),
}
TARGETS = 14  # 2 layers x (q, k, v, o, gate, up, down); lm_head ignored


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_calibrated_llama(tmp_path_factory.mktemp("api") / "m", seed=5)


def _ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(CASES))
def test_apply_gptq_leaves_packed_linears_like_compress(folder, tmp_path, name, monkeypatch):
    cls, kw, fmt = CASES[name]
    model = AutoModelForCausalLM.from_pretrained(folder)  # bf16, as saved
    original = AutoModelForCausalLM.from_pretrained(folder)
    cfg = cls(**kw, rounding="gptq", calibration=Calibration(**CAL))
    assert bitsmith.apply(model, [cfg], model_path=folder) is model
    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    assert len(packed) == TARGETS and all(m.format_name == fmt for m in packed.values())
    assert not any(type(m) is torch.nn.Linear for n, m in model.named_modules() if n != "lm_head")
    assert all(m.params["group_size"] == 32 for m in packed.values())

    # the same packed modules as `compress` then `load` give for the same recipe and folder (integer tensors as
    # written; float tensors in the model's dtype, as the loader casts them)
    body = ", ".join(f"{k}: {v}" for k, v in kw.items())
    recipe = (f"version: 1\npasses:\n  - {{type: {name}, {body}, rounding: gptq,"
              f" calibration: {{samples: {CAL['samples']}, seq_len: {CAL['seq_len']}}}}}\n")
    bitsmith.compress(parse_recipe(recipe), folder, tmp_path / "out", progress=False)
    written = load_file(tmp_path / "out" / "model.safetensors")
    loaded = dict(bitsmith.load(tmp_path / "out").named_modules())
    for n, m in packed.items():
        assert loaded[n].params == m.params, n
        for suffix, t in m.packed_tensors().items():
            assert t.dtype == loaded[n].packed_tensors()[suffix].dtype
            assert torch.equal(t, loaded[n].packed_tensors()[suffix]), f"{n}.{suffix}"
            if not t.is_floating_point():
                assert torch.equal(t, written[f"{n}.{suffix}"]), f"{n}.{suffix}"

    # computing with the packed format (no cached dense weight) matches the dequantized reference
    reference = AutoModelForCausalLM.from_pretrained(folder)
    ref_named = dict(reference.named_modules())
    with torch.no_grad():
        for n, m in packed.items():
            ref_named[n].weight.copy_(m.dequantized_weight())
    monkeypatch.setenv("BITSMITH_CPU_WEIGHT_CACHE", "0")
    ids = _ids()
    with torch.no_grad():
        out = model(input_ids=ids).logits.float()
        ref = reference(input_ids=ids).logits.float()
        orig = original(input_ids=ids).logits.float()
    assert torch.allclose(out, ref, atol=2e-2, rtol=0), float((out - ref).abs().max())
    # and the quantized model still resembles the original (a loose sanity bound, not a quality claim)
    assert float((out - orig).norm() / orig.norm()) < 0.5


def test_apply_gptq_without_a_tokenizer_says_so(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(RecipeError, match="tokenizer"):
        bitsmith.apply(model, [Bipolar(bits=3, group_size=32, rounding="gptq", calibration=Calibration(**CAL))])
    assert not any(isinstance(m, PackedLinear) for m in model.modules())


def test_apply_takes_a_recipe_and_the_calibration_tokenizer_setting(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    recipe = parse_recipe("version: 1\npasses:\n  - {type: bipolar, bits: 2, group_size: 32, rounding: gptq,"
                          f" calibration: {{samples: 2, seq_len: 16, tokenizer: '{folder}'}}}}\n")
    bitsmith.apply(model, recipe)
    q = model.model.layers[1].mlp.down_proj
    assert isinstance(q, PackedLinear) and q.params["bits"] == 2 and q.params["kind"] == "bipolar"
    with torch.no_grad():
        assert model(input_ids=_ids()).logits.isfinite().all()
